# src/defectvad/models/fastflow/anomaly_map.py
import torch
from torch import nn
from torch.nn import functional as F


class AnomalyMapGenerator(nn.Module):
    def __init__(self, input_size):
        super().__init__()
        self.input_size = tuple(input_size)

    def forward(self, hidden_variables):
        flow_maps = []
        for hidden_variable in hidden_variables:
            log_prob = -torch.mean(hidden_variable**2, dim=1, keepdim=True) * 0.5
            # minus the likelihood under the standard normal: higher is more anomalous
            flow_map = F.interpolate(-torch.exp(log_prob), size=self.input_size, mode="bilinear", align_corners=False)
            flow_maps.append(flow_map)
        return torch.mean(torch.stack(flow_maps, dim=-1), dim=-1)
