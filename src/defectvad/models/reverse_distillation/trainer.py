# src/defectvad/models/reverse_distillation/trainer.py
import torch

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.models.reverse_distillation.loss import ReverseDistillationLoss
from defectvad.models.reverse_distillation.torch_model import ReverseDistillationModel


class ReverseDistillationTrainer(BaseTrainer):
    # anomalib sets no epoch count (Lightning would run 1000, hours on a CPU);
    # 200 as the paper and anomalib's former config
    trainer_arguments = {"max_epochs": 200, "gradient_clip_val": 0}

    def __init__(self, backbone="wide_resnet50_2", layers=None, weights_path=None,
                 anomaly_map_mode="add", lr=0.005, betas=(0.5, 0.99)):
        super().__init__()
        self.model = ReverseDistillationModel(backbone=backbone, layers=layers, weights_path=weights_path,
                                              anomaly_map_mode=anomaly_map_mode)
        self.loss = ReverseDistillationLoss()
        self.lr = lr
        self.betas = tuple(betas)

    def configure_optimizers(self):
        parameters = list(self.model.decoder.parameters()) + list(self.model.bottleneck.parameters())
        return torch.optim.Adam(parameters, lr=self.lr, betas=self.betas)

    def training_step(self, batch, batch_idx):
        return {"loss": self.loss(*self.model(batch["image"]))}

    def summary(self):
        return {"train_loss": self.train_losses[-1] if self.train_losses else None, "epochs": len(self.train_losses)}
