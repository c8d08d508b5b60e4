# src/defectvad/models/uninet/bottleneck.py
import torch
from torch import nn
from torchvision.models.resnet import conv1x1

from defectvad.models.reverse_distillation.bottleneck import OCBE


def conv3x3(in_channels, out_channels, stride=1, bias=False):
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


class AttentionBottleneck(nn.Module):
    # a residual block whose input is split in two halves, each through two convolutions, then joined by a 1x1
    # convolution. anomalib builds the second branch with 7x7 kernels and at once replaces them (merge_kernel) by
    # 3x3 convolutions with a bias, which starts at zero; that is the block that trains, so it is built directly.
    # bn7 is never used, kept so that both state dicts hold the same tensors.
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        half = width // 2
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.bn4 = nn.BatchNorm2d(half)
        self.bn5 = nn.BatchNorm2d(half)
        self.bn6 = nn.BatchNorm2d(half)
        self.bn7 = nn.BatchNorm2d(width)
        self.conv3x3 = conv3x3(inplanes // 2, half, stride)
        self.conv3x3_ = conv3x3(half, half)
        self.conv7x7 = conv3x3(inplanes // 2, half, stride, bias=True)
        self.conv7x7_ = conv3x3(half, half, bias=True)
        nn.init.zeros_(self.conv7x7.bias)
        nn.init.zeros_(self.conv7x7_.bias)

    def forward(self, x):
        first, second = torch.split(x, [x.shape[1] // 2, x.shape[1] // 2], dim=1)
        first = self.bn5(self.conv3x3_(self.relu(self.bn2(self.conv3x3(first)))))
        second = self.bn6(self.conv7x7_(self.relu(self.bn4(self.conv7x7(second)))))
        out = self.bn3(self.conv3(torch.cat([first, second], dim=1)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class BottleneckLayer(OCBE):
    # Reverse Distillation's bottleneck with attention blocks; anomalib nests its residual layer one level
    # deeper (bn_layer.0.<block>)
    def __init__(self, channels, blocks=3):
        super().__init__(AttentionBottleneck, blocks, channels)
        self.bn_layer = nn.Sequential(self.bn_layer)
