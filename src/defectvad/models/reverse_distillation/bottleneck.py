# src/defectvad/models/reverse_distillation/bottleneck.py
import torch
from torch import nn
from torchvision.models.resnet import conv1x1, conv3x3

from defectvad.components.initialization import init_resnet_style


class OCBE(nn.Module):
    # one-class bottleneck embedding: the three encoder scales are brought to the coarsest one,
    # concatenated and compressed by a residual layer of stride 2 with 2 * c3 output channels
    def __init__(self, block, blocks, channels):
        super().__init__()
        c1, c2, c3 = channels
        out_channels = 2 * c3
        planes = out_channels // block.expansion
        downsample = nn.Sequential(conv1x1(3 * c3, out_channels, 2), nn.BatchNorm2d(out_channels))
        self.bn_layer = nn.Sequential(
            block(3 * c3, planes, 2, downsample),
            *[block(out_channels, planes) for _ in range(1, blocks)],
        )
        self.conv1 = conv3x3(c1, c2, 2)
        self.bn1 = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(c2, c3, 2)
        self.bn2 = nn.BatchNorm2d(c3)
        self.conv3 = conv3x3(c2, c3, 2)
        self.bn3 = nn.BatchNorm2d(c3)
        # unused by forward, as in anomalib: kept so that both state dicts hold the same tensors
        self.conv4 = conv1x1(4 * c3, out_channels, 1)
        self.bn4 = nn.BatchNorm2d(out_channels)
        init_resnet_style(self)

    def forward(self, features):
        first = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(features[0]))))))
        second = self.relu(self.bn3(self.conv3(features[1])))
        return self.bn_layer(torch.cat([first, second, features[2]], 1)).contiguous()
