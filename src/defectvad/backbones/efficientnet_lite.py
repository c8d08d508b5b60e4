# src/defectvad/backbones/efficientnet_lite.py
import math

import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, out channels) per stage
LITE0_STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def same_padding(size, kernel, stride, dilation):
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    # TensorFlow "same" padding: computed from the input size, the extra pixel goes right/bottom
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, groups=groups, bias=bias)

    def forward(self, x):
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def batch_norm(channels):
    # timm's tf_efficientnet_lite0 (what anomalib trains) uses torch's default momentum 0.1, not the 0.01 of
    # TensorFlow's decay 0.99, so a student trained from scratch keeps the same running statistics
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.1)


class MBConvBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel, stride, expand_ratio):
        super().__init__()
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = batch_norm(out_channels)
        self._act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        y = x
        if hasattr(self, "_expand_conv"):
            y = self._act(self._bn0(self._expand_conv(y)))
        y = self._act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.residual:
            y = y + x
        return y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        self._act = nn.ReLU6(inplace=True)
        blocks = []
        in_channels = STEM_CHANNELS
        for repeats, kernel, stride, expand_ratio, out_channels in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(in_channels, out_channels, kernel, stride if i == 0 else 1, expand_ratio))
                in_channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_channels, HEAD_CHANNELS, 1)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self._act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._act(self._bn1(self._conv_head(x)))
        x = self._dropout(self._avg_pooling(x).flatten(1))
        return self._fc(x)
