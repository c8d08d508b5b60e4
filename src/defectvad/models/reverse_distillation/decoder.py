# src/defectvad/models/reverse_distillation/decoder.py
from torch import nn
from torchvision.models.resnet import conv1x1, conv3x3

from defectvad.components.initialization import init_resnet_style


def upsample2x(in_channels, out_channels, groups=1):
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, groups=groups, bias=False)


class DecoderBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, upsample=None, base_width=64):
        super().__init__()
        self.conv1 = upsample2x(inplanes, planes) if stride == 2 else conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.upsample = upsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # the shortcut last, as anomalib: the same values, and gradients summed in the same order
        identity = x if self.upsample is None else self.upsample(x)
        return self.relu(out + identity)


class DecoderBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, upsample=None, base_width=64):
        super().__init__()
        width = int(planes * base_width / 64)
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = upsample2x(width, width) if stride == 2 else conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.upsample is None else self.upsample(x)
        return self.relu(out + identity)


class ResNetDecoder(nn.Module):
    # the encoder read backwards: each layer doubles the resolution with transposed convolutions;
    # channels are the encoder's (c1, c2, c3), the input has 2 * c3 channels (the bottleneck's output)
    def __init__(self, block, layers, channels, width_per_group=64):
        super().__init__()
        self.base_width = width_per_group
        self.inplanes = 2 * channels[2]
        self.layer1 = self.make_layer(block, channels[2] // block.expansion, layers[0])
        self.layer2 = self.make_layer(block, channels[1] // block.expansion, layers[1])
        self.layer3 = self.make_layer(block, channels[0] // block.expansion, layers[2])
        init_resnet_style(self)

    def make_layer(self, block, planes, blocks):
        out_channels = planes * block.expansion
        upsample = nn.Sequential(upsample2x(self.inplanes, out_channels), nn.BatchNorm2d(out_channels))
        layers = [block(self.inplanes, planes, 2, upsample, self.base_width)]
        self.inplanes = out_channels
        layers += [block(out_channels, planes, base_width=self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        feature_a = self.layer1(x)
        feature_b = self.layer2(feature_a)
        feature_c = self.layer3(feature_b)
        # finest first, in the encoder's order
        return [feature_c, feature_b, feature_a]
