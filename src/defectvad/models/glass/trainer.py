# src/defectvad/models/glass/trainer.py
import torch

from defectvad.components.textures import create_textures, describe_textures
from defectvad.engine.base_trainer import BaseTrainer
from defectvad.errors import ConfigError
from defectvad.models.glass.torch_model import GlassModel

SVD_CHOICES = (0, 1)


class OptimizerGroup:
    # several optimizers that step as one, as anomalib's manual optimisation of GLASS steps its own
    def __init__(self, optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()


class GlassTrainer(BaseTrainer):
    # anomalib sets no epoch count (Lightning would run 1000); 100 as its example config and benchmark
    trainer_arguments = {"max_epochs": 100, "gradient_clip_val": 0}

    def __init__(self, backbone="wide_resnet50_2", layers=None, weights_path=None, anomaly_source="dtd",
                 anomaly_source_path="datasets/dtd", pretrain_embed_dim=1536, target_embed_dim=1536, patchsize=3,
                 patchstride=1, pre_trained=True, pre_projection=1, discriminator_layers=2,
                 discriminator_hidden=1024, learning_rate=0.0001, step=20, svd=0, gaussian_noise_std=0.015,
                 radius_quantile=0.75, focal_loss_quantile_threshold=0.5, mining=True):
        super().__init__()
        if svd not in SVD_CHOICES:
            raise ConfigError(f"model.svd must be 0 (manifold) or 1 (hypersphere), got {svd!r}")
        self.anomaly_source = anomaly_source
        self.anomaly_source_path = str(anomaly_source_path)
        self.textures = create_textures(anomaly_source, anomaly_source_path, "GLASS")
        self.model = GlassModel(
            textures=self.textures, backbone=backbone, layers=layers, weights_path=weights_path,
            pretrain_embed_dim=pretrain_embed_dim, target_embed_dim=target_embed_dim, patchsize=patchsize,
            patchstride=patchstride, pre_trained=pre_trained, pre_projection=pre_projection,
            discriminator_layers=discriminator_layers, discriminator_hidden=discriminator_hidden, step=step, svd=svd,
            gaussian_noise_std=gaussian_noise_std, radius_quantile=radius_quantile,
            focal_loss_quantile_threshold=focal_loss_quantile_threshold, mining=mining,
        )
        self.learning_rate = learning_rate
        self.pre_trained = pre_trained
        self.pre_projection = pre_projection
        self.svd = svd
        self.train_loader = None
        self.last_losses = {}

    def configure_optimizers(self):
        # anomalib's: AdamW at twice the rate on the discriminator, Adam with weight decay on the adaptor,
        # AdamW on the backbone when it trains (pre_trained false)
        optimizers = [torch.optim.AdamW(self.model.discriminator.parameters(), lr=self.learning_rate * 2)]
        if self.pre_projection > 0:
            optimizers.append(torch.optim.Adam(self.model.projection.parameters(), lr=self.learning_rate,
                                               weight_decay=1e-5))
        if not self.pre_trained:
            optimizers.append(torch.optim.AdamW(
                self.model.forward_modules["feature_aggregator"].feature_extractor.parameters(),
                lr=self.learning_rate))
        return OptimizerGroup(optimizers)

    def fit(self, train_loader=None, val_loader=None):
        self.train_loader = train_loader
        if train_loader is not None:
            self.match_normalization(train_loader.dataset)
        return super().fit(train_loader, val_loader)

    def match_normalization(self, dataset):
        # the augmentor pastes textures in [0, 1] pixels: undo exactly the normalisation the images were given
        transform = getattr(dataset, "transform", None)
        if transform is None or not hasattr(transform, "normalize"):
            return
        mean, std = (transform.mean, transform.std) if transform.normalize else ((0.0,) * 3, (1.0,) * 3)
        self.model._img_mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
        self.model._img_std.copy_(torch.tensor(std).view(1, 3, 1, 1))

    def on_train_epoch_start(self):
        # as anomalib: the center is recomputed over the whole training set before every epoch
        self.model.calculate_center(self.train_loader, self.device)

    def training_step(self, batch, batch_idx):
        outputs = self.model(batch["image"])
        self.last_losses = {key: value.item() for key, value in outputs.items() if key != "loss"}
        return outputs

    def summary(self):
        return {
            **describe_textures(self.anomaly_source, self.anomaly_source_path, self.textures),
            "svd": self.svd,
            "train_loss": self.train_losses[-1] if self.train_losses else None,
            "last_step_losses": self.last_losses,
            "epochs": len(self.train_losses),
        }
