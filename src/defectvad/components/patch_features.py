# src/defectvad/components/patch_features.py
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F


class PatchMaker:
    # the patchsize x patchsize neighbourhood (zero-padded) of every feature vector, as PatchCore's original code
    # and the SimpleNet family (GLASS) build their patch features
    def __init__(self, patchsize, stride=None):
        self.patchsize = patchsize
        self.stride = patchsize if stride is None else stride

    def patchify(self, features, return_spatial_info=False):
        # (B, C, H, W) -> (B, h * w, C, patchsize, patchsize) and the patch grid (h, w)
        padding = (self.patchsize - 1) // 2
        unfolded = F.unfold(features, kernel_size=self.patchsize, padding=padding, stride=self.stride)
        grid = tuple((size + 2 * padding - self.patchsize) // self.stride + 1 for size in features.shape[-2:])
        unfolded = unfolded.reshape(*features.shape[:2], self.patchsize, self.patchsize, -1).permute(0, 4, 1, 2, 3)
        return (unfolded, grid) if return_spatial_info else unfolded

    @staticmethod
    def unpatch_scores(x, batchsize):
        return x.reshape(batchsize, -1, *x.shape[1:])

    @staticmethod
    def compute_score(x):
        # (B, N, 1) patch scores -> the largest per image
        return x[:, :, 0].amax(1)


def resize_patch_grid(patches, grid, target_grid):
    # (B, h * w, C, p, p) on grid (h, w) -> (B, H * W, C, p, p) on target_grid, each of the C * p * p values
    # interpolated bilinearly over the grid
    batch, _, channels, height, width = patches.shape
    patches = patches.reshape(batch, grid[0], grid[1], channels, height, width).permute(0, 3, 4, 5, 1, 2)
    resized = F.interpolate(patches.reshape(-1, 1, grid[0], grid[1]), size=tuple(target_grid), mode="bilinear",
                            align_corners=False)
    resized = resized.reshape(batch, channels, height, width, *target_grid).permute(0, 4, 5, 1, 2, 3)
    return resized.reshape(batch, -1, channels, height, width)


@lru_cache(maxsize=None)
def average_windows(length, size):
    # adaptive average pooling's windows: output i averages inputs floor(i * length / size) up to
    # ceil((i + 1) * length / size); as (size, width) gather indices and weights (0 pads the shorter windows)
    bounds = [((i * length) // size, -(-(i + 1) * length // size)) for i in range(size)]
    width = max(end - start for start, end in bounds)
    index = torch.tensor([[min(start + k, end - 1) for k in range(width)] for start, end in bounds])
    weight = torch.tensor([[1.0 / (end - start) if k < end - start else 0.0 for k in range(width)]
                           for start, end in bounds])
    return index, weight


def adaptive_average(features, size, length=None):
    # (N, length) -> (N, size); ONNX has no adaptive pooling, so an export gathers the same windows
    if length is None or not torch.onnx.is_in_onnx_export():
        return F.adaptive_avg_pool1d(features.reshape(features.shape[0], 1, -1), size).reshape(features.shape[0], -1)
    index, weight = average_windows(length, size)
    return (features.reshape(features.shape[0], -1)[:, index] * weight.to(features)).sum(-1)


class MeanMapper(nn.Module):
    # a flattened patch (input_feature_len = C * p * p values) averaged down (or repeated up) to dim values
    def __init__(self, dim, input_feature_len=None):
        super().__init__()
        self.preprocessing_dim = dim
        self.input_feature_len = input_feature_len

    def forward(self, features):
        return adaptive_average(features, self.preprocessing_dim, self.input_feature_len)


class Preprocessing(nn.Module):
    # one MeanMapper per layer: a list of (N, C_i, p, p) -> (N, layers, output_dim)
    def __init__(self, input_dims, output_dim, patchsize=3):
        super().__init__()
        self.input_dims = input_dims
        self.output_dim = output_dim
        self.preprocessing_modules = nn.ModuleList(MeanMapper(output_dim, dim * patchsize * patchsize)
                                                   for dim in input_dims)

    def forward(self, features):
        return torch.stack([module(feature) for module, feature in zip(self.preprocessing_modules, features)], dim=1)


class Aggregator(nn.Module):
    # (N, layers, D) -> (N, target_dim): the layers' vectors, concatenated, averaged down to target_dim
    def __init__(self, target_dim, input_len=None):
        super().__init__()
        self.target_dim = target_dim
        self.input_len = input_len

    def forward(self, features):
        return adaptive_average(features, self.target_dim, self.input_len)
