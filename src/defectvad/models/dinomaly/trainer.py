# src/defectvad/models/dinomaly/trainer.py
from torch import nn

from defectvad.components.stable_adamw import StableAdamW
from defectvad.components.warm_cosine_scheduler import WarmCosineScheduler
from defectvad.engine.base_trainer import BaseTrainer
from defectvad.errors import ConfigError
from defectvad.models.dinomaly.torch_model import DinomalyModel

SCHEDULER_INTERVALS = ("step", "epoch")


def init_trainable_modules(modules):
    # anomalib's initialisation of the bottleneck and decoder
    for module in modules.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.01, a=-0.03, b=0.03)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.LayerNorm):
            nn.init.constant_(module.bias, 0)
            nn.init.constant_(module.weight, 1.0)


class DinomalyTrainer(BaseTrainer):
    # anomalib's trainer_arguments: gradient clipping 0.1 and no step count (Lightning would run 1000 epochs; its
    # example config and benchmark: 5000 steps, experiment=dinomaly). One epoch: a ViT-B training step on 32 images
    # takes minutes on a CPU, so this default is a smoke run
    trainer_arguments = {"max_epochs": 1, "gradient_clip_val": 0.1}

    def __init__(self, backbone="dinov2_vitb14_reg4", weights_path=None, bottleneck_dropout=0.2, decoder_depth=8,
                 target_layers=None, fuse_layer_encoder=None, fuse_layer_decoder=None, remove_class_token=False,
                 use_context_recentering=False, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4,
                 amsgrad=True, final_value=2e-4, warmup_iters=100, scheduler_interval="step", p_final=0.9,
                 p_schedule_steps=1000, factor=0.1):
        super().__init__()
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ConfigError(f"model.scheduler_interval must be one of: {', '.join(SCHEDULER_INTERVALS)}; "
                              f"got {scheduler_interval!r}")
        self.model = DinomalyModel(backbone=backbone, weights_path=weights_path,
                                   bottleneck_dropout=bottleneck_dropout, decoder_depth=decoder_depth,
                                   target_layers=target_layers, fuse_layer_encoder=fuse_layer_encoder,
                                   fuse_layer_decoder=fuse_layer_decoder, remove_class_token=remove_class_token,
                                   use_context_recentering=use_context_recentering)
        self.model.loss_fn.p_final = p_final
        self.model.loss_fn.p_schedule_steps = p_schedule_steps
        self.model.loss_fn.factor = factor
        # only the bottleneck and the decoder learn; the encoder is frozen
        self.trainable_modules = nn.ModuleList([self.model.bottleneck, self.model.decoder])
        init_trainable_modules(self.trainable_modules)
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
        # Dinomaly's own schedule: one value per optimizer step
        self.step_scheduler = scheduler
        return optimizer

    def training_step(self, batch, batch_idx):
        return {"loss": self.model(batch["image"], global_step=self.global_step)}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.step_scheduler is not None:
            self.step_scheduler.step()

    def summary(self):
        return {"train_loss": self.train_losses[-1] if self.train_losses else None, "epochs": len(self.train_losses),
                "steps": self.global_step, "target_layers": self.model.target_layers,
                "scheduler_interval": self.scheduler_interval,
                "last_lr": self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None,
                "hard_mining_p": self.model.loss_fn.p}
