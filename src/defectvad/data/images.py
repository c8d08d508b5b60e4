# src/defectvad/data/images.py
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from defectvad.errors import ConfigError, DatasetError

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


# PIL's own decompression-bomb limit (about 89 million pixels), what dataset.max_image_pixels=null keeps
PIL_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
# how a file becomes the model's [0, 1] RGB input, the same in training, test, predict and export
PIXEL_RULE = ("RGB in [0, 1]: integer pixels divided by their type's maximum (255 for 8-bit, 65535 for 16-bit), "
              "float pixels as they are, grey repeated to 3 channels, alpha dropped, palettes through RGB")
# 16-bit grey files; PIL gives 16-bit colour PNGs and TIFFs as 8 bits a channel (their high byte)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def check_max_image_pixels(value):
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"dataset.max_image_pixels must be a positive number of pixels, or null for PIL's "
                          f"default ({PIL_MAX_IMAGE_PIXELS}); got {value!r}")
    return value


@contextmanager
def pixel_limit(max_pixels):
    # PIL reads its limit from a global: set it for this one file only, and make its warning an error
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = PIL_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@contextmanager
def opened_image(path, what, max_pixels=None):
    try:
        with pixel_limit(max_pixels), Image.open(path) as image:
            pages = getattr(image, "n_frames", 1)
            if pages > 1:
                raise DatasetError(f"{what} {path} has {pages} pages; only single-page images are read: save the "
                                   f"page to use as its own file")
            yield image
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        limit = "PIL's default" if max_pixels is None else str(max_pixels)
        raise DatasetError(f"{what} {path} is over the limit on pixels, {limit} ({error}); if you trust the file, "
                           f"raise dataset.max_image_pixels (tools/predict.py: --max-image-pixels)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read {what} {path}: the file is corrupt or truncated ({error}); "
                           f"replace or remove it") from None


def open_image(path, what, max_pixels=None):
    with opened_image(path, what, max_pixels) as image:
        image.load()
        return image.copy()


def read_image_size(path, what, max_pixels=None):
    # (width, height) from the file's header, without decoding its pixels
    with opened_image(path, what, max_pixels) as image:
        return image.size


def scale_pixels(array, maximum):
    # in float64, so that v / 255 and (v * 257) / 65535 round to the same float32
    return (np.asarray(array, dtype=np.float64) / maximum).astype(np.float32)


def image_to_tensor(image, path="image"):
    # float32 (3, H, W) in [0, 1] by PIXEL_RULE
    mode = image.mode
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        if not (0.0 <= low and high <= 1.0):
            raise DatasetError(f"float image {path} has values in [{low:g}, {high:g}]; float images must lie in "
                               f"[0, 1]: rescale it, or save it as an 8- or 16-bit integer image")
    elif mode in SIXTEEN_BIT_MODES:
        array = scale_pixels(image, 65535)
    elif mode == "I":
        # 32-bit integers, as older PIL versions give 16-bit PNGs: read as 16-bit when they fit
        array = np.asarray(image)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise DatasetError(f"32-bit integer image {path} has values in [{low}, {high}]; only values in "
                               f"[0, 65535] (16-bit) are read: save it as an 8- or 16-bit image")
        array = scale_pixels(array, 65535)
    elif mode == "1":
        array = np.asarray(image, dtype=np.float32)
    elif mode in ("L", "LA", "RGB", "RGBA", "RGBX"):
        array = scale_pixels(image, 255)
    else:
        # palette, CMYK, YCbCr, LAB, HSV, premultiplied alpha: PIL's conversion to 8-bit RGB
        array = scale_pixels(image.convert("RGB"), 255)
    if array.ndim == 2:
        array = array[:, :, None]
    # grey (with or without alpha) repeats its one channel; colour keeps three; alpha is dropped
    array = np.repeat(array[:, :, :1], 3, axis=2) if array.shape[2] < 3 else array[:, :, :3]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def read_image(path, max_pixels=None):
    return image_to_tensor(open_image(path, "image", max_pixels), path)


def read_mask(path, max_pixels=None):
    # any non-zero value marks a defect, whatever the file's mode (L, 1, P, I;16, RGB)
    image = open_image(path, "mask", max_pixels)
    if len(image.getbands()) == 1:
        array = np.asarray(image)
    else:
        array = np.asarray(image.convert("RGB")).max(axis=2)
    return Image.fromarray(np.where(array > 0, 255, 0).astype(np.uint8))
