# src/defectvad/models/fastflow/loss.py
import torch
from torch import nn


class FastflowLoss(nn.Module):
    @staticmethod
    def forward(hidden_variables, jacobians):
        # negative log-likelihood under a standard normal, up to a constant, summed over the flow blocks
        loss = torch.tensor(0.0, device=hidden_variables[0].device)
        for hidden_variable, jacobian in zip(hidden_variables, jacobians):
            loss += torch.mean(0.5 * torch.sum(hidden_variable**2, dim=(1, 2, 3)) - jacobian)
        return loss
