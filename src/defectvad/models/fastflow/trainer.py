# src/defectvad/models/fastflow/trainer.py
import torch

from defectvad.data.transforms import to_size_pair
from defectvad.engine.base_trainer import BaseTrainer
from defectvad.models.fastflow.loss import FastflowLoss
from defectvad.models.fastflow.torch_model import FastflowModel


class FastflowTrainer(BaseTrainer):
    # anomalib 2.x sets no epoch count (Lightning would run 1000) and its 0.x config ran 500 with early
    # stopping; 20 keeps a CPU run to minutes
    trainer_arguments = {"max_epochs": 20, "gradient_clip_val": 0}

    def __init__(self, backbone="resnet18", weights_path=None, input_size=(256, 256), center_crop=None,
                 flow_steps=8, conv3x3_only=False, hidden_ratio=1.0, lr=0.001, weight_decay=0.00001):
        super().__init__()
        # the LayerNorm shapes follow the size the images reach the model with
        size = to_size_pair(center_crop if center_crop is not None else input_size, "model.input_size")
        self.model = FastflowModel(input_size=size, backbone=backbone, weights_path=weights_path,
                                   flow_steps=flow_steps, conv3x3_only=conv3x3_only, hidden_ratio=hidden_ratio)
        self.loss = FastflowLoss()
        self.lr = lr
        self.weight_decay = weight_decay

    def configure_optimizers(self):
        return torch.optim.Adam(params=self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def training_step(self, batch, batch_idx):
        hidden_variables, jacobians = self.model(batch["image"])
        return {"loss": self.loss(hidden_variables, jacobians)}

    def summary(self):
        return {"train_loss": self.train_losses[-1] if self.train_losses else None, "epochs": len(self.train_losses)}
