# src/defectvad/models/autoencoder/trainer.py
import torch

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.models.autoencoder.loss import AutoencoderLoss, VaeLoss
from defectvad.models.autoencoder.torch_model import AutoencoderModel, VaeModel


class AutoencoderTrainer(BaseTrainer):
    # no anomalib counterpart: our baseline; 30 epochs take minutes on a CPU for a few hundred 256x256 images
    trainer_arguments = {"max_epochs": 30}

    def __init__(self, backbone="resnet18", weights_path=None, layer=None, latent_dim=32, depth=4, base_width=16,
                 max_width=256, blur_sigma=4, score_mode="max", topk_ratio=0.01, lr=0.001):
        super().__init__()
        self.model = self.create_model(backbone=backbone, layer=layer, weights_path=weights_path, latent_dim=latent_dim,
                                       depth=depth, base_width=base_width, max_width=max_width, blur_sigma=blur_sigma,
                                       score_mode=score_mode, topk_ratio=topk_ratio)
        self.loss = AutoencoderLoss()
        # raw pixels in [0, 1]; a backbone's features need the ImageNet normalisation it was trained with
        self.normalize_input = layer is not None
        self.lr = lr

    def create_model(self, **kwargs):
        return AutoencoderModel(**kwargs)

    def configure_optimizers(self):
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(parameters, lr=self.lr)

    def training_step(self, batch, batch_idx):
        outputs = self.model(batch["image"])
        return {"loss": self.loss(outputs["target"], outputs["reconstruction"])}

    def summary(self):
        return {"input": self.model.layer or "pixels", "epochs": len(self.train_losses),
                "train_loss": self.train_losses[-1] if self.train_losses else None}


class VaeTrainer(AutoencoderTrainer):
    def __init__(self, beta=0.01, **kwargs):
        super().__init__(**kwargs)
        self.loss = VaeLoss(beta=beta)
        self.beta = beta

    def create_model(self, **kwargs):
        return VaeModel(**kwargs)

    def training_step(self, batch, batch_idx):
        outputs = self.model(batch["image"])
        return {"loss": self.loss(outputs["target"], outputs["reconstruction"], outputs["mu"], outputs["logvar"])}

    def summary(self):
        return {**super().summary(), "beta": self.beta}
