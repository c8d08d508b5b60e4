# src/defectvad/models/autoencoder/torch_model.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError
from defectvad.models.autoencoder.anomaly_map import AnomalyMapGenerator, check_score_mode, compute_score


def down_block(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def up_block(in_channels, out_channels):
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class AutoencoderModel(nn.Module):
    # a convolutional autoencoder with a spatial latent: depth stride-2 stages take the input to
    # latent_dim channels at 1 / 2**depth of its size, and as many transposed stages bring it back.
    # layer None: it reconstructs the raw image in [0, 1]; a layer name: that layer of a frozen backbone
    latent_channels = 1

    def __init__(self, backbone="resnet18", layer=None, weights_path=None, latent_dim=32, depth=4, base_width=16,
                 max_width=256, blur_sigma=4, score_mode="max", topk_ratio=0.01):
        super().__init__()
        check_score_mode(score_mode, topk_ratio)
        if int(depth) < 1 or int(latent_dim) < 1:
            raise ConfigError(f"model.depth and model.latent_dim must be at least 1, got {depth} and {latent_dim}")
        self.layer = layer
        self.score_mode = score_mode
        self.topk_ratio = topk_ratio
        if layer is None:
            in_channels = 3
        else:
            self.feature_extractor = FeatureExtractor(backbone, [layer], weights_path=weights_path).eval()
            in_channels = self.feature_extractor.out_dims[0]
            # per-channel standardisation of the features, averaged over every training batch
            self.feature_norm = nn.BatchNorm2d(in_channels, affine=False, momentum=None)
        widths = [min(base_width * 2**stage, max_width) for stage in range(depth)]
        self.encoder = nn.Sequential(
            *[down_block(c_in, c_out) for c_in, c_out in zip([in_channels] + widths[:-1], widths)],
            nn.Conv2d(widths[-1], latent_dim * self.latent_channels, kernel_size=3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_dim, widths[-1], kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            *[up_block(c_in, c_out) for c_in, c_out in zip(widths[::-1], widths[::-1][1:] + widths[:1])],
            nn.Conv2d(widths[0], in_channels, kernel_size=3, padding=1),
        )
        self.anomaly_map_generator = AnomalyMapGenerator(blur_sigma=blur_sigma)

    def target(self, images):
        if self.layer is None:
            return images
        features = self.feature_extractor(images)[self.layer]
        return self.feature_norm(features)

    def decode(self, latent, size):
        reconstruction = self.decoder(latent)
        if tuple(reconstruction.shape[-2:]) != tuple(size):
            # sizes that 2**depth does not divide come back a few pixels short
            reconstruction = F.interpolate(reconstruction, size=tuple(size), mode="bilinear", align_corners=False)
        # pixels live in [0, 1]; standardised features are unbounded
        return torch.sigmoid(reconstruction) if self.layer is None else reconstruction

    def encode(self, target):
        return {"latent": self.encoder(target)}

    def forward(self, images):
        target = self.target(images)
        encoded = self.encode(target)
        reconstruction = self.decode(encoded.pop("latent"), target.shape[-2:])
        if self.training:
            return {"target": target, "reconstruction": reconstruction, **encoded}
        anomaly_map = self.anomaly_map_generator(target, reconstruction, images.shape[-2:])
        return InferenceBatch(compute_score(anomaly_map, self.score_mode, self.topk_ratio), anomaly_map,
                              {"reconstruction": reconstruction})


class VaeModel(AutoencoderModel):
    # the same network with a Gaussian latent: the encoder gives a mean and a log-variance per latent value;
    # training samples from it, evaluation decodes the mean
    latent_channels = 2

    def encode(self, target):
        mu, logvar = self.encoder(target).chunk(2, dim=1)
        logvar = logvar.clamp(-10, 10)
        latent = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {"latent": latent, "mu": mu, "logvar": logvar}
