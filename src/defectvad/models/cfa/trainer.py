# src/defectvad/models/cfa/trainer.py
import torch

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.models.cfa.loss import CfaLoss
from defectvad.models.cfa.torch_model import CfaModel


class CfaTrainer(BaseTrainer):
    # anomalib 2.x sets no epoch count (Lightning would run 1000); 30 as in anomalib's 0.x cfa config
    trainer_arguments = {"max_epochs": 30, "gradient_clip_val": 0}
    # its traced graph keeps the trace's batch size: onnxruntime fails on another batch size
    exportable = False

    def __init__(self, backbone="wide_resnet50_2", weights_path=None, gamma_c=1, gamma_d=1, num_nearest_neighbors=3,
                 num_hard_negative_features=3, radius=1e-5, lr=1e-3, weight_decay=5e-4, amsgrad=True):
        super().__init__()
        self.model = CfaModel(backbone=backbone, weights_path=weights_path, gamma_c=gamma_c, gamma_d=gamma_d,
                              num_nearest_neighbors=num_nearest_neighbors,
                              num_hard_negative_features=num_hard_negative_features)
        self.loss = CfaLoss(num_nearest_neighbors=num_nearest_neighbors,
                            num_hard_negative_features=num_hard_negative_features, radius=radius)
        self.lr = lr
        self.weight_decay = weight_decay
        self.amsgrad = amsgrad
        self.train_loader = None

    def fit(self, train_loader, val_loader=None):
        # the memory bank is built from the training set when training starts, as anomalib's on_train_start
        self.train_loader = train_loader
        return super().fit(train_loader, val_loader)

    def on_train_start(self):
        self.model.initialize_centroid(self.train_loader)

    def configure_optimizers(self):
        return torch.optim.AdamW(params=self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                 amsgrad=self.amsgrad)

    def training_step(self, batch, batch_idx):
        return {"loss": self.loss(self.model(batch["image"]))}

    def summary(self):
        return {"train_loss": self.train_losses[-1] if self.train_losses else None, "epochs": len(self.train_losses),
                "memory_bank": list(self.model.memory_bank.shape)}
