# src/defectvad/models/uninet/trainer.py
import torch
from torch import nn

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.errors import ConfigError
from defectvad.models.uninet.loss import UniNetLoss
from defectvad.models.uninet.torch_model import UniNetModel


class UniNetTrainer(BaseTrainer):
    # anomalib sets no epoch count (Lightning would run 1000); 100 as its example config
    trainer_arguments = {"max_epochs": 100, "gradient_clip_val": 0}

    def __init__(self, backbone="wide_resnet50_2", student_backbone=None, weights_path=None, temperature=0.1,
                 lambda_weight=0.7, lr=0.005, teacher_lr=1e-6, betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-5,
                 amsgrad=True, milestone=0.8, gamma=0.2):
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"model.temperature={temperature} is not allowed: it must be greater than 0")
        if not 0 <= lambda_weight <= 1:
            raise ConfigError(f"model.lambda_weight={lambda_weight} is not allowed: it must lie in [0, 1]")
        self.model = UniNetModel(backbone=backbone, student_backbone=student_backbone, weights_path=weights_path)
        self.loss = UniNetLoss(lambda_weight=lambda_weight, temperature=temperature)
        self.bce_loss = nn.BCEWithLogitsLoss()
        self.lr = lr
        self.teacher_lr = teacher_lr
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay
        self.amsgrad = amsgrad
        self.milestone = milestone
        self.gamma = gamma

    def configure_optimizers(self):
        model = self.model
        optimizer = torch.optim.AdamW([
            {"params": model.student.parameters()},
            {"params": model.bottleneck.parameters()},
            {"params": model.dfs.parameters()},
            {"params": model.teachers.target_teacher.parameters(), "lr": self.teacher_lr},
        ], lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, eps=self.eps, amsgrad=self.amsgrad)
        # as anomalib: one milestone at 80% of max_steps when set, else of max_epochs; the scheduler steps once an
        # epoch either way (Lightning's default interval), so a max_steps milestone counts epochs
        limit = self.max_steps if self.max_steps is not None else self.max_epochs
        milestone = int(limit * self.milestone) if self.max_steps is not None else limit * self.milestone
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=self.gamma)
        return optimizer, scheduler

    def training_step(self, batch, batch_idx):
        student_features, teacher_features, predictions = self.model(batch["image"])
        # the training images' masks (all normal here) select the positions of the contrastive and margin terms
        loss = self.loss(student_features, teacher_features, mask=batch["mask"].float())
        labels = torch.as_tensor(batch["label"], device=predictions[0].device).float()
        loss = loss + (self.bce_loss(predictions[0], labels) + self.bce_loss(predictions[1], labels))
        return {"loss": loss}

    def summary(self):
        return {"train_loss": self.train_losses[-1] if self.train_losses else None, "epochs": len(self.train_losses)}
