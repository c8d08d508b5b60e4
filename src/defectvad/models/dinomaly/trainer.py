# src/defectvad/models/dinomaly/trainer.py
from torch import nn

from defectvad.components.warm_cosine_training import WarmCosineTrainer, init_trainable_modules
from defectvad.models.dinomaly.torch_model import DinomalyModel


class DinomalyTrainer(WarmCosineTrainer):
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
        self.configure_schedule(lr, betas, eps, weight_decay, amsgrad, final_value, warmup_iters, scheduler_interval)
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

    def training_step(self, batch, batch_idx):
        return {"loss": self.model(batch["image"], global_step=self.global_step)}

    def summary(self):
        return {**super().summary(), "hard_mining_p": self.model.loss_fn.p}
