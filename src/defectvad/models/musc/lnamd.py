# src/defectvad/models/musc/lnamd.py
# MuSc's LNAMD (local neighbourhood aggregation with multiple degrees) on one layer: the patch map is
# layer-normalised over the whole map (channels and positions together, no affine), each patch becomes the
# per-channel mean of its r x r neighbourhood (zeros beyond the border count, as the authors' unfold and mean
# pooling do), and the result has unit length per patch
from torch.nn import functional as F


def aggregate_neighbourhood(patches, grid, r):
    # patches (B, L, C) in row-major order of the grid (h, w) -> (B, L, C)
    batch, _, channels = patches.shape
    x = patches.transpose(1, 2).reshape(batch, channels, *grid)
    x = F.layer_norm(x, x.shape[1:])
    if r > 1:
        x = F.avg_pool2d(x, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    x = x.flatten(2).transpose(1, 2)
    return x / x.norm(dim=-1, keepdim=True)
