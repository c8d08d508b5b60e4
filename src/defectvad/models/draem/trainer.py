# src/defectvad/models/draem/trainer.py
import torch
from torch import nn

from defectvad.components.perlin import PerlinAnomalyGenerator
from defectvad.components.textures import create_textures, describe_textures
from defectvad.engine.base_trainer import BaseTrainer
from defectvad.errors import ConfigError
from defectvad.models.draem.loss import DraemLoss
from defectvad.models.draem.torch_model import DraemModel

class DraemTrainer(BaseTrainer):
    # anomalib sets no epoch count (Lightning would run 1000); 700 as the paper, whose schedule steps at 400 and 600
    trainer_arguments = {"max_epochs": 700, "gradient_clip_val": 0}
    normalize_input = False

    def __init__(self, backbone=None, weights_path=None, anomaly_source="dtd", anomaly_source_path="datasets/dtd",
                 beta=(0.1, 1.0), enable_sspcab=False, sspcab_lambda=0.1, focal_alpha=None, lr=0.0001,
                 milestones=(400, 600), gamma=0.1, reconstructive_width=128, discriminative_width=64):
        # backbone and weights_path are given to every model; DRAEM learns from raw pixels and uses neither
        super().__init__()
        self.anomaly_source = anomaly_source
        self.anomaly_source_path = str(anomaly_source_path)
        self.textures = create_textures(anomaly_source, anomaly_source_path, "DRAEM")
        self.augmenter = PerlinAnomalyGenerator(self.textures, blend_factor=beta)
        self.model = DraemModel(sspcab=enable_sspcab, reconstructive_width=reconstructive_width,
                                discriminative_width=discriminative_width)
        self.loss = DraemLoss(focal_alpha=focal_alpha)
        self.focal_alpha = focal_alpha
        self.sspcab = enable_sspcab
        self.sspcab_lambda = sspcab_lambda
        self.lr = lr
        self.milestones = list(milestones)
        self.gamma = gamma
        self.sspcab_activations = {}
        if enable_sspcab:
            self.sspcab_loss = nn.MSELoss()
            encoder = self.model.reconstructive_subnetwork.encoder
            encoder.mp4.register_forward_hook(self.keep_activation("input"))
            encoder.block5.register_forward_hook(self.keep_activation("output"))

    def keep_activation(self, name):
        def hook(module, inputs, output):
            self.sspcab_activations[name] = output
        return hook

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=self.milestones, gamma=self.gamma)
        return optimizer, scheduler

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == 0 and self.current_epoch == 0 and batch["image"].min() < -1e-3:
            raise ConfigError("DRAEM learns from raw pixels in [0, 1], but the images are ImageNet-normalised; "
                              "leave transform.normalize=null (the model's choice) or set it to false")

    def training_step(self, batch, batch_idx):
        images = batch["image"]
        augmented, anomaly_mask = self.augmenter(images)
        reconstruction, prediction = self.model(augmented)
        loss = self.loss(images, reconstruction, anomaly_mask, prediction)
        if self.sspcab:
            loss = loss + self.sspcab_lambda * self.sspcab_loss(self.sspcab_activations["input"],
                                                                self.sspcab_activations["output"])
        return {"loss": loss}

    def summary(self):
        return {
            **describe_textures(self.anomaly_source, self.anomaly_source_path, self.textures),
            "focal_alpha": self.focal_alpha,
            "train_loss": self.train_losses[-1] if self.train_losses else None,
            "epochs": len(self.train_losses),
        }
