# src/defectvad/models/glass/networks.py
from torch import nn


def init_weight(module):
    # Xavier-normal linear layers, BatchNorm scales around 1, Kaiming-normal convolutions, zero biases
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, mean=1.0, std=0.02)
        nn.init.zeros_(module.bias)
        return
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        nn.init.kaiming_normal_(module.weight, nonlinearity="leaky_relu")
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class Projection(nn.Module):
    # the feature adaptor: n_layers linear layers ("0fc", "1fc", ...), LeakyReLU between them if use_activation
    def __init__(self, in_planes, out_planes=None, n_layers=1, use_activation=False):
        super().__init__()
        out_planes = in_planes if out_planes is None else out_planes
        self.layers = nn.Sequential()
        for index in range(n_layers):
            self.layers.add_module(f"{index}fc", nn.Linear(in_planes if index == 0 else out_planes, out_planes))
            if use_activation and index < n_layers - 1:
                self.layers.add_module(f"{index}relu", nn.LeakyReLU(0.2))
        self.apply(init_weight)

    def forward(self, x):
        return self.layers(x)


class Discriminator(nn.Module):
    # n_layers - 1 blocks of linear, BatchNorm and LeakyReLU, then a linear layer and a sigmoid: the probability
    # that a patch feature is anomalous; hidden=None shrinks the width by 1.5 per block
    def __init__(self, in_planes, n_layers=2, hidden=None):
        super().__init__()
        width = in_planes if hidden is None else hidden
        self.body = nn.Sequential()
        for index in range(n_layers - 1):
            in_width = in_planes if index == 0 else width
            width = int(width // 1.5) if hidden is None else hidden
            self.body.add_module(f"block{index + 1}", nn.Sequential(
                nn.Linear(in_width, width), nn.BatchNorm1d(width), nn.LeakyReLU(0.2)))
        self.tail = nn.Sequential(nn.Linear(width, 1, bias=False), nn.Sigmoid())
        self.apply(init_weight)

    def forward(self, x):
        return self.tail(self.body(x))
