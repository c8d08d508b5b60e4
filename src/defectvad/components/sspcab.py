# src/defectvad/components/sspcab.py
import torch
from torch import nn
from torch.nn import functional as F


class AttentionModule(nn.Module):
    # squeeze-and-excitation over channels
    def __init__(self, in_channels, reduction_ratio=8):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, in_channels // reduction_ratio)
        self.fc2 = nn.Linear(in_channels // reduction_ratio, in_channels)

    def forward(self, inputs):
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(inputs.mean(dim=(2, 3))))))
        return inputs * weights[:, :, None, None]


class SSPCAB(nn.Module):
    # self-supervised predictive convolutional attentive block: four convolutions read only the corners
    # of a window whose centre they never see, then channel attention
    def __init__(self, in_channels, kernel_size=1, dilation=1, reduction_ratio=8):
        super().__init__()
        self.pad = kernel_size + dilation
        self.crop = kernel_size + 2 * dilation + 1
        self.masked_conv1 = nn.Conv2d(in_channels, in_channels, kernel_size)
        self.masked_conv2 = nn.Conv2d(in_channels, in_channels, kernel_size)
        self.masked_conv3 = nn.Conv2d(in_channels, in_channels, kernel_size)
        self.masked_conv4 = nn.Conv2d(in_channels, in_channels, kernel_size)
        self.attention_module = AttentionModule(in_channels, reduction_ratio)

    def forward(self, inputs):
        padded = F.pad(inputs, (self.pad,) * 4)
        crop = self.crop
        out = self.masked_conv1(padded[..., :-crop, :-crop])
        out = out + self.masked_conv2(padded[..., :-crop, crop:])
        out = out + self.masked_conv3(padded[..., crop:, :-crop])
        out = out + self.masked_conv4(padded[..., crop:, crop:])
        return self.attention_module(out)
