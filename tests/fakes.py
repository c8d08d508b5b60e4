# tests/fakes.py
import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class StripesDataset(Dataset):
    # normal images are noisy stripes with a random phase; anomalous ones carry a bright square
    def __init__(self, count, anomalous_every=0, seed=0, size=64):
        generator = torch.Generator().manual_seed(seed)
        coords = torch.arange(size).float()
        self.items = []
        for index in range(count):
            phase = torch.rand(1, generator=generator).item() * 2 * math.pi
            stripes = torch.sin(coords / 3.0 + phase).reshape(1, 1, size).expand(3, size, size)
            image = 0.5 * stripes + 0.1 * torch.randn(3, size, size, generator=generator)
            mask = torch.zeros(1, size, size)
            label = int(anomalous_every > 0 and index % anomalous_every == 0)
            if label:
                top, left = torch.randint(4, size - 20, (2,), generator=generator).tolist()
                image[:, top:top + 16, left:left + 16] = 2.0
                mask[:, top:top + 16, left:left + 16] = 1.0
            self.items.append({"image": image, "label": label, "mask": mask, "image_path": f"img{index}.png"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def write_square_panels(root, normal_count, squares, grey=120, seed=0):
    # 32x32 grey noise panels in good/; in bad/ one per (top, colour) with an 8-pixel square of that colour at
    # (top, top), its mask in masks/
    rng = np.random.default_rng(seed)
    for folder in ("good", "bad", "masks"):
        (root / folder).mkdir(parents=True)
    for index in range(normal_count):
        image = rng.normal(grey, 8, (32, 32, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "good" / f"{index}.png")
    for index, (top, colour) in enumerate(squares):
        image = rng.normal(grey, 8, (32, 32, 3)).clip(0, 255).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        image[top:top + 8, top:top + 8], mask[top:top + 8, top:top + 8] = colour, 255
        Image.fromarray(image).save(root / "bad" / f"b{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"b{index}.png")
    return root


def write_image(path, value=128, size=(32, 32)):
    # a flat RGB image of (width, height) size
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 30)).save(path)
    return path


def write_mask(path, box=(8, 8, 24, 24), value=255, size=(32, 32)):
    # box (x0, y0, x1, y1) set to value in a mask of (width, height) size
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros(size[::-1], dtype=np.uint8)
    array[box[1]:box[3], box[0]:box[2]] = value
    Image.fromarray(array).save(path)
    return path
