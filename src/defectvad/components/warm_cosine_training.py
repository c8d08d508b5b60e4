# src/defectvad/components/warm_cosine_training.py
# the training of Dinomaly and INP-Former: StableAdamW over the trainable modules, a warm cosine schedule over the
# whole run, anomalib's truncated normal initialisation
from torch import nn

from defectvad.components.stable_adamw import StableAdamW
from defectvad.components.warm_cosine_scheduler import WarmCosineScheduler
from defectvad.engine.base_trainer import BaseTrainer
from defectvad.errors import ConfigError

SCHEDULER_INTERVALS = ("step", "epoch")


def init_trainable_modules(modules):
    for module in modules.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.01, a=-0.03, b=0.03)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.LayerNorm):
            nn.init.constant_(module.bias, 0)
            nn.init.constant_(module.weight, 1.0)


class WarmCosineTrainer(BaseTrainer):
    # a subclass sets self.trainable_modules and calls configure_schedule
    def configure_schedule(self, lr, betas, eps, weight_decay, amsgrad, final_value, warmup_iters,
                           scheduler_interval):
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ConfigError(f"model.scheduler_interval must be one of: {', '.join(SCHEDULER_INTERVALS)}; "
                              f"got {scheduler_interval!r}")
        self.lr = lr
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay
        self.amsgrad = amsgrad
        self.final_value = final_value
        self.warmup_iters = warmup_iters
        self.scheduler_interval = scheduler_interval
        self.steps_per_epoch = None
        self.step_scheduler = None

    def fit(self, train_loader=None, val_loader=None):
        self.steps_per_epoch = len(train_loader) if train_loader is not None else None
        return super().fit(train_loader, val_loader)

    def total_steps(self):
        # as anomalib: max_steps, or max_epochs times the batches of an epoch, whichever ends training first
        by_epochs = self.max_epochs * self.steps_per_epoch
        return by_epochs if self.max_steps is None else min(self.max_steps, by_epochs)

    def configure_optimizers(self):
        optimizer = StableAdamW([{"params": self.trainable_modules.parameters()}], lr=self.lr, betas=self.betas,
                                eps=self.eps, weight_decay=self.weight_decay, amsgrad=self.amsgrad)
        scheduler = WarmCosineScheduler(optimizer, base_value=self.lr, final_value=self.final_value,
                                        total_iters=self.total_steps(), warmup_iters=self.warmup_iters)
        if self.scheduler_interval == "epoch":
            # anomalib 2.7 returns its scheduler without an interval, so Lightning steps it once per epoch
            return optimizer, scheduler
        # the authors' schedule: one value per optimizer step
        self.step_scheduler = scheduler
        return optimizer

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.step_scheduler is not None:
            self.step_scheduler.step()

    def summary(self):
        return {"train_loss": self.train_losses[-1] if self.train_losses else None, "epochs": len(self.train_losses),
                "steps": self.global_step, "target_layers": self.model.target_layers,
                "scheduler_interval": self.scheduler_interval,
                "last_lr": self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None}
