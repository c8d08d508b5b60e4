# src/defectvad/data/images.py
from pathlib import Path

import numpy as np
from PIL import Image

from defectvad.errors import DatasetError

# the endings torchvision's ImageFolder reads, which anomalib uses too
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(path):
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder):
    return sorted(p for p in Path(folder).iterdir() if is_image_file(p))


def index_images_by_stem(folder):
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in list_images(folder)}


def find_mask(index, stem, suffixes):
    for suffix in suffixes:
        if stem + suffix in index:
            return index[stem + suffix]
    return None


def open_image(path, what):
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read {what} {path}: the file is corrupt or truncated ({error}); "
                           f"replace or remove it") from None


def read_image(path):
    return open_image(path, "image").convert("RGB")


def read_mask(path):
    # any non-zero value marks a defect, whatever the file's mode (L, 1, P, I;16, RGB)
    image = open_image(path, "mask")
    if len(image.getbands()) == 1:
        array = np.asarray(image)
    else:
        array = np.asarray(image.convert("RGB")).max(axis=2)
    return Image.fromarray(np.where(array > 0, 255, 0).astype(np.uint8))
