# src/defectvad/models/afclip/loss.py
# the authors' objective: focal loss on the image probability, focal + L1 on the patch map, and the patch
# alignment term that pulls same-state patch tokens together and pushes normal from anomalous ones apart
import torch
from torch import nn
from torch.nn import functional as F


def focal_loss(inputs, targets, gamma=4.0):
    inputs, targets = inputs.float(), targets.float()
    ce = F.binary_cross_entropy(inputs, targets, reduction="none")
    p_t = inputs * targets + (1 - inputs) * (1 - targets)
    return (ce * (1 - p_t) ** gamma).mean()


def authors_map_gradient(inputs, targets, gamma):
    # d/d inputs of focal + L1 on the map as the authors' backward computes it: their patch_alignment_loss
    # overwrites the normal pixels' targets with -1 in place (copy.copy of a tensor shares its storage) after the
    # forward pass saved them, so backward reads -1 where the forward read 0 (the loss value is unchanged)
    inputs, targets = inputs.detach().float(), targets.float()
    seen = torch.where(targets == 0, -torch.ones_like(targets), targets)
    p_t = inputs * targets + (1 - inputs) * (1 - targets)
    ce = F.binary_cross_entropy(inputs, targets, reduction="none")
    d_ce = (inputs - seen) / (inputs * (1 - inputs)).clamp_min(1e-12)
    d_p_t = seen - (1 - targets)
    focal = d_ce * (1 - p_t) ** gamma - ce * gamma * (1 - p_t) ** (gamma - 1) * d_p_t
    return (focal + torch.sign(inputs - seen)) / inputs.numel()


def with_gradient(value, inputs, gradient):
    # value in the forward pass, `gradient` with respect to inputs in the backward pass
    surrogate = (inputs * gradient.detach()).sum()
    return value.detach() + (surrogate - surrogate.detach())


def downsample_masks(masks, size):
    # bilinear to the patch grid, then values below 0.5 are normal and above 0.5 anomalous (0.5 stays)
    masks = F.interpolate(masks.float(), size=tuple(size), mode="bilinear")
    return torch.where(masks < 0.5, torch.zeros_like(masks), torch.where(masks > 0.5, torch.ones_like(masks), masks))


def patch_alignment_loss(tokens, masks):
    # masks (B, 1, h, w) at the patch grid; tokens: (B, 1 + h * w, C) per smoothed layer
    signs = masks.reshape(masks.shape[0], -1)
    if not bool((signs == 0).any()):
        return signs.new_zeros(())
    signs = torch.where(signs == 0, -torch.ones_like(signs), signs)
    pairs = signs[:, :, None] * signs[:, None, :]
    different, same = pairs == -1, pairs == 1
    total = signs.new_zeros(())
    for layer_tokens in tokens:
        patches = F.normalize(layer_tokens[:, 1:], dim=-1)
        similarity = patches @ patches.transpose(1, 2)
        if not bool(different.any()):
            # the authors' mean over no pairs is NaN, which counts as 0
            continue
        total = total + (similarity[different].mean() - similarity[same].mean()).clamp(min=0)
    return total / len(tokens)


class AfClipLoss(nn.Module):
    def __init__(self, lambda1=1.0, lambda2=1.0, gamma=4.0, authors_gradient=True):
        super().__init__()
        self.authors_gradient = authors_gradient
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.gamma = gamma

    def forward(self, pred_score, pred_map, tokens, labels, masks):
        masks = downsample_masks(masks, pred_map.shape[-2:])
        segmentation = focal_loss(pred_map, masks, self.gamma) + F.l1_loss(pred_map, masks)
        if self.authors_gradient and bool((masks == 0).any()):
            segmentation = with_gradient(segmentation, pred_map, authors_map_gradient(pred_map, masks, self.gamma))
        return (focal_loss(pred_score, labels, self.gamma) + self.lambda1 * segmentation
                + self.lambda2 * patch_alignment_loss(tokens, masks))
