# src/defectvad/models/inp_former/trainer.py
from torch import nn

from defectvad.components.warm_cosine_training import WarmCosineTrainer, init_trainable_modules
from defectvad.models.inp_former.torch_model import InpFormerModel


class InpFormerTrainer(WarmCosineTrainer):
    # anomalib's trainer_arguments: gradient clipping 0.1 (its 200 epochs are removed there so that the user sets
    # them: experiment=inp_former). One epoch: a ViT-B step on 32 images takes minutes on a CPU, a smoke run
    trainer_arguments = {"max_epochs": 1, "gradient_clip_val": 0.1}

    def __init__(self, backbone="dinov2_vitb14_reg4", weights_path=None, inp_num=6, target_layers=None,
                 fuse_layer_encoder=None, fuse_layer_decoder=None, remove_class_token=True, lr=1e-3,
                 betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-4, amsgrad=True, final_value=1e-4, warmup_iters=100,
                 scheduler_interval="step"):
        super().__init__()
        self.configure_schedule(lr, betas, eps, weight_decay, amsgrad, final_value, warmup_iters, scheduler_interval)
        self.model = InpFormerModel(backbone=backbone, weights_path=weights_path, inp_num=inp_num,
                                    target_layers=target_layers, fuse_layer_encoder=fuse_layer_encoder,
                                    fuse_layer_decoder=fuse_layer_decoder, remove_class_token=remove_class_token)
        # the encoder is frozen; the prototypes' queries, the extractor, the bottleneck and the decoder learn
        self.trainable_modules = nn.ModuleList([self.model.bottleneck, self.model.decoder, self.model.aggregation,
                                                self.model.prototype_token])
        init_trainable_modules(self.trainable_modules)

    def training_step(self, batch, batch_idx):
        return {"loss": self.model(batch["image"])}
