# src/defectvad/components/initialization.py
from torch import nn


def init_resnet_style(module):
    # torchvision's ResNet initialisation: He-normal convolutions, BatchNorm as identity
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            nn.init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(child, nn.BatchNorm2d):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)
