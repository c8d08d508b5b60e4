# src/defectvad/components/tiler.py
# anomalib's Tiler: an image is grown (zero padding at the right and bottom, or a nearest-neighbour resize) to the
# smallest size that whole tiles cover with the given stride, cut into tiles row by row, and tiles are stitched back
# by averaging the overlaps, then cropped (padding) or resized (interpolation) to the input size
import math

import torch
from torch.nn import functional as F

MODES = ("padding", "interpolation")


def covered_size(size, tile, stride):
    # the smallest edge >= size that tiles of this size and stride cover exactly
    if (size - tile) % stride == 0:
        return size
    return math.ceil((size - tile) / stride) * stride + tile


def resize_to(images, size, mode):
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if mode == "padding":
        if images.shape[-2] > size[0] or images.shape[-1] > size[1]:
            return images[..., :size[0], :size[1]]
        return F.pad(images, [0, size[1] - images.shape[-1], 0, size[0] - images.shape[-2]])
    return F.interpolate(images, size=tuple(size))


class Tiler:
    def __init__(self, tile_size, stride=None, mode="padding"):
        self.tile_size = tuple(tile_size)
        self.stride = self.tile_size if stride is None else tuple(stride)
        self.mode = mode

    def grid(self, size):
        # the covered size and the tiles' top-left corners, row by row
        height, width = (covered_size(s, t, d) for s, t, d in zip(size, self.tile_size, self.stride))
        rows = range(0, height - self.tile_size[0] + 1, self.stride[0])
        columns = range(0, width - self.tile_size[1] + 1, self.stride[1])
        return (height, width), [(top, left) for top in rows for left in columns]

    def count(self, size):
        return len(self.grid(size)[1])

    def tile(self, images):
        # (B, C, H, W) -> (B * tiles, C, tile h, tile w), the tiles of each image together
        size = tuple(images.shape[-2:])
        if size[0] < self.tile_size[0] or size[1] < self.tile_size[1]:
            raise ValueError(f"tile size {list(self.tile_size)} exceeds the image size {list(size)}")
        covered, corners = self.grid(size)
        images = resize_to(images, covered, self.mode)
        height, width = self.tile_size
        tiles = torch.stack([images[..., top:top + height, left:left + width] for top, left in corners], dim=1)
        return tiles.flatten(0, 1)

    def untile(self, tiles, size):
        # (B * tiles, C, h, w) -> (B, C, *size): overlaps averaged; tiles may come back at another resolution than
        # they went out (a model's map), then the grid is scaled to it
        covered, corners = self.grid(size)
        scale = (tiles.shape[-2] / self.tile_size[0], tiles.shape[-1] / self.tile_size[1])
        tiles = tiles.unflatten(0, (-1, len(corners)))
        batch, channels, height, width = tiles.shape[0], tiles.shape[2], tiles.shape[-2], tiles.shape[-1]
        total = tiles.new_zeros(batch, channels, round(covered[0] * scale[0]), round(covered[1] * scale[1]))
        counts = tiles.new_zeros(1, 1, *total.shape[-2:])
        for index, (top, left) in enumerate(corners):
            top, left = round(top * scale[0]), round(left * scale[1])
            total[..., top:top + height, left:left + width] += tiles[:, index]
            counts[..., top:top + height, left:left + width] += 1
        stitched = total / counts
        output_size = (round(size[0] * scale[0]), round(size[1] * scale[1]))
        return resize_to(stitched, output_size, self.mode)
