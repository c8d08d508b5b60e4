# src/defectvad/models/stfpm/trainer.py
import torch
from torch import nn
from torch.utils.data import DataLoader

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.engine.devices import autocast
from defectvad.models.stfpm.loss import StfpmLoss
from defectvad.models.stfpm.torch_model import StfpmModel


class StfpmTrainer(BaseTrainer):
    # anomalib sets no epoch count for STFPM (Lightning would run 1000); 100 as in anomalib's former stfpm config
    trainer_arguments = {"max_epochs": 100, "gradient_clip_val": 0}

    def __init__(self, backbone="resnet18", layers=None, weights_path=None,
                 lr=0.4, momentum=0.9, weight_decay=0.001, recalibrate_batchnorm=False):
        super().__init__()
        self.model = StfpmModel(backbone=backbone, layers=layers, weights_path=weights_path)
        self.loss = StfpmLoss()
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.recalibrate_batchnorm = recalibrate_batchnorm
        self.train_loader = None
        self.val_loader = None

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.student_model.parameters(), lr=self.lr, momentum=self.momentum,
                               dampening=0.0, weight_decay=self.weight_decay)

    def fit(self, train_loader, val_loader=None):
        self.train_loader = train_loader
        self.val_loader = val_loader
        return super().fit(train_loader, val_loader)

    def training_step(self, batch, batch_idx):
        teacher_features, student_features = self.model(batch["image"])
        return {"loss": self.loss(teacher_features, student_features)}

    def on_train_epoch_end(self):
        # the statistics matter only where the student is used: before a validation and after the last epoch
        epoch = self.current_epoch + 1
        validates = self.val_loader is not None and epoch % self.check_val_every_n_epoch == 0
        last = epoch >= self.max_epochs or (self.max_steps is not None and self.global_step >= self.max_steps)
        if self.recalibrate_batchnorm and self.train_loader is not None and (validates or last):
            self.recalibrate_student(self.train_loader)

    @torch.no_grad()
    def recalibrate_student(self, train_loader):
        # at lr 0.4 the student's running BatchNorm statistics trail its weights by many steps, and evaluation
        # uses them; recompute them as a plain average over the training set with the weights as they are now.
        # Gradients never depend on running statistics, so the weights train exactly as in anomalib.
        norms = [m for m in self.model.student_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for module in norms:
            module.reset_running_stats()
            module.momentum = None
        was_training = self.model.student_model.training
        self.model.student_model.train()
        # a loader and generator of its own: the global RNG and the training loader's shuffling stay untouched
        loader = DataLoader(train_loader.dataset, batch_size=train_loader.batch_size,
                            num_workers=train_loader.num_workers, generator=torch.Generator())
        for batch in loader:
            with autocast(self.device, self.precision):
                self.model.student_model(batch["image"].to(self.device))
        for module, momentum in zip(norms, momenta):
            module.momentum = momentum
        self.model.student_model.train(was_training)

    def summary(self):
        return {"train_loss": self.train_losses[-1] if self.train_losses else None, "epochs": len(self.train_losses),
                "recalibrate_batchnorm": self.recalibrate_batchnorm}
