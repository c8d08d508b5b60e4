# src/defectvad/models/draem/torch_model.py
import torch
from torch import nn

from defectvad.components.sspcab import SSPCAB
from defectvad.engine.inference_batch import InferenceBatch


def conv_block(in_channels, out_channels, middle_channels=None):
    # two 3x3 convolutions, each with BatchNorm and ReLU
    middle_channels = middle_channels or out_channels
    return nn.Sequential(
        nn.Conv2d(in_channels, middle_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(middle_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(middle_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def up_block(in_channels, out_channels):
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def max_pool():
    return nn.Sequential(nn.MaxPool2d(2))


class EncoderReconstructive(nn.Module):
    def __init__(self, in_channels, base_width, sspcab=False):
        super().__init__()
        w = base_width
        self.block1 = conv_block(in_channels, w)
        self.mp1 = max_pool()
        self.block2 = conv_block(w, 2 * w)
        self.mp2 = max_pool()
        self.block3 = conv_block(2 * w, 4 * w)
        self.mp3 = max_pool()
        self.block4 = conv_block(4 * w, 8 * w)
        self.mp4 = max_pool()
        self.block5 = SSPCAB(8 * w) if sspcab else conv_block(8 * w, 8 * w)

    def forward(self, x):
        x = self.mp1(self.block1(x))
        x = self.mp2(self.block2(x))
        x = self.mp3(self.block3(x))
        x = self.mp4(self.block4(x))
        return self.block5(x)


class DecoderReconstructive(nn.Module):
    def __init__(self, base_width, out_channels=1):
        super().__init__()
        w = base_width
        self.up1 = up_block(8 * w, 8 * w)
        self.db1 = conv_block(8 * w, 4 * w, middle_channels=8 * w)
        self.up2 = up_block(4 * w, 4 * w)
        self.db2 = conv_block(4 * w, 2 * w, middle_channels=4 * w)
        self.up3 = up_block(2 * w, 2 * w)
        self.db3 = conv_block(2 * w, w, middle_channels=2 * w)
        self.up4 = up_block(w, w)
        self.db4 = conv_block(w, w)
        self.fin_out = nn.Sequential(nn.Conv2d(w, out_channels, kernel_size=3, padding=1))

    def forward(self, x):
        x = self.db1(self.up1(x))
        x = self.db2(self.up2(x))
        x = self.db3(self.up3(x))
        x = self.db4(self.up4(x))
        return self.fin_out(x)


class ReconstructiveSubNetwork(nn.Module):
    # an autoencoder trained to turn a synthetically damaged image back into the clean one
    def __init__(self, in_channels=3, out_channels=3, base_width=128, sspcab=False):
        super().__init__()
        self.encoder = EncoderReconstructive(in_channels, base_width, sspcab=sspcab)
        self.decoder = DecoderReconstructive(base_width, out_channels=out_channels)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class EncoderDiscriminative(nn.Module):
    def __init__(self, in_channels, base_width):
        super().__init__()
        w = base_width
        self.block1 = conv_block(in_channels, w)
        self.mp1 = max_pool()
        self.block2 = conv_block(w, 2 * w)
        self.mp2 = max_pool()
        self.block3 = conv_block(2 * w, 4 * w)
        self.mp3 = max_pool()
        self.block4 = conv_block(4 * w, 8 * w)
        self.mp4 = max_pool()
        self.block5 = conv_block(8 * w, 8 * w)
        self.mp5 = max_pool()
        self.block6 = conv_block(8 * w, 8 * w)

    def forward(self, x):
        act1 = self.block1(x)
        act2 = self.block2(self.mp1(act1))
        act3 = self.block3(self.mp2(act2))
        act4 = self.block4(self.mp3(act3))
        act5 = self.block5(self.mp4(act4))
        act6 = self.block6(self.mp5(act5))
        return act1, act2, act3, act4, act5, act6


class DecoderDiscriminative(nn.Module):
    def __init__(self, base_width, out_channels=1):
        super().__init__()
        w = base_width
        self.up_b = up_block(8 * w, 8 * w)
        self.db_b = conv_block(16 * w, 8 * w)
        self.up1 = up_block(8 * w, 4 * w)
        self.db1 = conv_block(12 * w, 4 * w)
        self.up2 = up_block(4 * w, 2 * w)
        self.db2 = conv_block(6 * w, 2 * w)
        self.up3 = up_block(2 * w, w)
        self.db3 = conv_block(3 * w, w)
        self.up4 = up_block(w, w)
        self.db4 = conv_block(2 * w, w)
        self.fin_out = nn.Sequential(nn.Conv2d(w, out_channels, kernel_size=3, padding=1))

    def forward(self, act1, act2, act3, act4, act5, act6):
        # a U-Net: each upsampled map is joined with the encoder's map of the same scale
        x = self.db_b(torch.cat((self.up_b(act6), act5), dim=1))
        x = self.db1(torch.cat((self.up1(x), act4), dim=1))
        x = self.db2(torch.cat((self.up2(x), act3), dim=1))
        x = self.db3(torch.cat((self.up3(x), act2), dim=1))
        x = self.db4(torch.cat((self.up4(x), act1), dim=1))
        return self.fin_out(x)


class DiscriminativeSubNetwork(nn.Module):
    # segments the anomaly from the image and its reconstruction side by side
    def __init__(self, in_channels=3, out_channels=3, base_width=64):
        super().__init__()
        self.encoder_segment = EncoderDiscriminative(in_channels, base_width)
        self.decoder_segment = DecoderDiscriminative(base_width, out_channels=out_channels)

    def forward(self, x):
        return self.decoder_segment(*self.encoder_segment(x))


class DraemModel(nn.Module):
    # the widths are anomalib's (128 and 64); smaller ones only for quick experiments
    def __init__(self, sspcab=False, reconstructive_width=128, discriminative_width=64):
        super().__init__()
        self.reconstructive_subnetwork = ReconstructiveSubNetwork(base_width=reconstructive_width, sspcab=sspcab)
        self.discriminative_subnetwork = DiscriminativeSubNetwork(in_channels=6, out_channels=2,
                                                                  base_width=discriminative_width)

    def forward(self, images):
        reconstruction = self.reconstructive_subnetwork(images)
        prediction = self.discriminative_subnetwork(torch.cat([images, reconstruction], dim=1))
        if self.training:
            return reconstruction, prediction
        anomaly_map = torch.softmax(prediction, dim=1)[:, 1:]
        return InferenceBatch(torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1), anomaly_map,
                              {"reconstruction": reconstruction})
