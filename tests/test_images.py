# tests/test_images.py
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from defectvad.data.folder import FolderDataset
from defectvad.data.images import (PIL_MAX_IMAGE_PIXELS, check_max_image_pixels, read_image, read_image_size,
                                   read_mask)
from defectvad.data.transforms import ImageTransform
from defectvad.errors import ConfigError, DatasetError

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
COLOUR = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)


def write_png16(path, array):
    # PIL writes 16 bits only for grey, so 16-bit colour and grey+alpha PNGs are written by hand
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def expected(array, maximum):
    # the rule computed apart: divide by the type's maximum, grey to 3 channels, (3, H, W)
    array = array.astype(np.float64) / maximum
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=2)
    return torch.from_numpy(array[:, :, :3].transpose(2, 0, 1).astype(np.float32))


def test_sixteen_bit_files_read_as_their_eight_bit_versions(tmp_path):
    eight = read_image(save(Image.fromarray(GREY), tmp_path / "grey8.png"))
    assert torch.equal(eight, expected(GREY, 255))
    wide = GREY.astype(np.uint16) * 257
    for name in ("grey16.png", "grey16.tif"):
        image = Image.fromarray(wide)
        assert image.mode == "I;16"
        assert torch.equal(read_image(save(image, tmp_path / name)), eight)
    # PIL gives 16-bit colour PNGs 8 bits a channel (the high byte), which for v * 257 is v itself
    colour = read_image(write_png16(tmp_path / "rgb16.png", COLOUR.astype(np.uint16) * 257))
    assert torch.equal(colour, expected(COLOUR, 255))
    alpha = np.dstack([COLOUR, np.zeros_like(GREY)]).astype(np.uint16) * 257
    assert torch.equal(read_image(write_png16(tmp_path / "rgba16.png", alpha)), colour)


def test_full_range_sixteen_bit_keeps_its_dynamic_range(tmp_path):
    # a dark 16-bit frame (values 0..1000 of 65535) is neither white nor flattened to a few 8-bit steps
    wide = RNG.integers(0, 1001, (6, 5)).astype(np.uint16)
    tensor = read_image(save(Image.fromarray(wide), tmp_path / "dark.png"))
    assert torch.equal(tensor, expected(wide, 65535))
    assert tensor.max().item() <= 1000 / 65535 + 1e-7
    assert len(tensor.unique()) == len(np.unique(wide))


def save(image, path, **options):
    image.save(path, **options)
    return path


def test_modes_and_formats_follow_one_rule(tmp_path):
    colour = expected(COLOUR, 255)
    assert torch.equal(read_image(save(Image.fromarray(COLOUR), tmp_path / "c.bmp")), colour)
    assert torch.equal(read_image(save(Image.fromarray(COLOUR), tmp_path / "c.tif")), colour)
    # alpha is dropped: the colour under a transparent pixel is kept, not blended with black
    rgba = np.dstack([COLOUR, np.where(GREY > 128, 255, 0).astype(np.uint8)])
    assert torch.equal(read_image(save(Image.fromarray(rgba), tmp_path / "a.png")), colour)
    grey_alpha = Image.fromarray(np.dstack([GREY, np.zeros_like(GREY)]), "LA")
    assert torch.equal(read_image(save(grey_alpha, tmp_path / "la.png")), expected(GREY, 255))
    palette = Image.fromarray(COLOUR).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    via_rgb = np.asarray(palette.convert("RGB"))
    assert torch.equal(read_image(save(palette, tmp_path / "p.png")), expected(via_rgb, 255))
    binary = Image.fromarray(GREY > 128)
    assert torch.equal(read_image(save(binary, tmp_path / "b.png")), expected((GREY > 128).astype(np.uint8), 1))
    jpeg = save(Image.fromarray(COLOUR), tmp_path / "c.jpg", quality=95)
    with Image.open(jpeg) as decoded:
        assert torch.equal(read_image(jpeg), expected(np.asarray(decoded.convert("RGB")), 255))


def test_float_and_wide_integer_tiffs_in_range_or_a_clear_error(tmp_path):
    values = RNG.random((6, 5)).astype(np.float32)
    tensor = read_image(save(Image.fromarray(values), tmp_path / "f.tif"))
    assert torch.equal(tensor, torch.from_numpy(np.stack([values] * 3)))
    with pytest.raises(DatasetError, match=r"float image .*hdr.tif has values in \[0, 4\]; .*\[0, 1\]"):
        read_image(save(Image.fromarray(np.where(values > 0.5, 4, 0).astype(np.float32)), tmp_path / "hdr.tif"))
    counts = (GREY.astype(np.int32) * 257)
    assert torch.equal(read_image(save(Image.fromarray(counts), tmp_path / "i.tif")), expected(GREY, 255))
    with pytest.raises(DatasetError, match=r"has values in \[0, 70000\]"):
        read_image(save(Image.fromarray(np.array([[0, 70000]], np.int32)), tmp_path / "big.tif"))


def test_multi_page_tiff_is_a_clear_error(tmp_path):
    pages = [Image.fromarray(GREY), Image.fromarray(255 - GREY)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.raises(DatasetError, match=r"image .*stack.tif has 2 pages; only single-page"):
        read_image(path)


def test_transform_sees_the_same_tensor_from_a_file_or_a_pil_image(tmp_path):
    wide = Image.fromarray(GREY.astype(np.uint16) * 257)
    transform = ImageTransform((4, 4), normalize=True)
    from_file, _ = transform(read_image(save(wide, tmp_path / "w.png")))
    from_pil, _ = transform(wide)
    from_eight, _ = transform(Image.fromarray(GREY))
    assert torch.equal(from_file, from_pil) and torch.equal(from_file, from_eight)


def write_bomb_header(path, width, height):
    # a PNG header claiming a huge 1-bit image; PIL stops at open, before any pixel is decoded
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)))
    return path


def test_pixel_limit_names_the_setting_and_restores_pils_global(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    huge = write_bomb_header(tmp_path / "huge.png", 10000, 10000)
    with pytest.raises(DatasetError, match=r"huge.png is over the limit on pixels, PIL's default .*"
                                           r"raise dataset.max_image_pixels"):
        read_image_size(huge, "image")
    assert read_image_size(huge, "image", 10 ** 8) == (10000, 10000)
    small = save(Image.fromarray(COLOUR), tmp_path / "small.png")
    with pytest.raises(DatasetError, match=r"over the limit on pixels, 29 .*30 pixels"):
        read_image(small, 29)
    assert torch.equal(read_image(small, 30), expected(COLOUR, 255))
    assert Image.MAX_IMAGE_PIXELS == before == PIL_MAX_IMAGE_PIXELS


def test_max_image_pixels_values():
    assert check_max_image_pixels(None) is None
    assert check_max_image_pixels(2e8) == 200000000
    for wrong in (0, -5, 1.5, True, "many"):
        with pytest.raises(ConfigError, match=r"dataset.max_image_pixels must be a positive number of pixels"):
            check_max_image_pixels(wrong)


def write_folder(root, mask_size, image_size=(24, 16)):
    # image_size and mask_size are (width, height), as PIL gives them
    for folder in ("good", "bad", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(3):
        Image.new("RGB", image_size, (90, 90, 90)).save(root / "good" / f"{index}.png")
    Image.new("RGB", image_size, (200, 90, 90)).save(root / "bad" / "b.png")
    mask = np.zeros(mask_size[::-1], np.uint8)
    mask[: mask_size[1] // 2, : mask_size[0] // 3] = 255
    Image.fromarray(mask).save(root / "masks" / "b.png")


def folder_test_set(root, **options):
    return FolderDataset(root, None, "test", ImageTransform((16, 24), normalize=False), abnormal_dir="bad",
                         mask_dir="masks", normal_test_ratio=0.34, **options)


def test_a_mask_of_another_size_names_both_sizes(tmp_path):
    write_folder(tmp_path, (12, 8))
    with pytest.raises(DatasetError, match=r"mask .*masks/b.png is 12x8 pixels \(width x height\) but its image "
                                           r".*bad/b.png is 24x16; .*dataset.resize_masks=true"):
        folder_test_set(tmp_path)
    dataset = folder_test_set(tmp_path, resize_masks=True)
    mask = next(s for s in dataset if s["label"] == 1)["mask"][0]
    # nearest neighbour doubles each mask pixel: the top-left 4x4 block becomes 8x8
    assert mask.sum().item() == 8 * 8 and mask[:8, :8].min().item() == 1.0


def test_a_mask_of_another_aspect_ratio_is_always_an_error(tmp_path):
    write_folder(tmp_path, (12, 12))
    with pytest.raises(DatasetError, match=r"is 12x12 pixels .* is 24x16, another aspect ratio"):
        folder_test_set(tmp_path, resize_masks=True)
    with pytest.raises(ConfigError, match="dataset.resize_masks must be true or false"):
        folder_test_set(tmp_path, resize_masks="yes")


def test_aspect_ratio_allows_one_pixel_of_rounding(tmp_path):
    # half of an odd size rounds down: 25x17 against 12x8 is the same picture at half size
    write_folder(tmp_path, (12, 8), image_size=(25, 17))
    dataset = folder_test_set(tmp_path, resize_masks=True)
    assert next(s for s in dataset if s["label"] == 1)["mask"].sum().item() > 0
    assert read_mask(tmp_path / "masks" / "b.png").size == (12, 8)


def test_draem_textures_follow_the_same_rule(tmp_path):
    from defectvad.components.textures import TextureFolder

    for folder, image in (("a", Image.fromarray(COLOUR)), ("b", Image.fromarray(GREY.astype(np.uint16) * 257))):
        (tmp_path / folder).mkdir()
        image.save(tmp_path / folder / "t.png")
    colour = TextureFolder(tmp_path / "a").sample(6, 5)
    assert colour.dtype == torch.uint8 and torch.equal(colour, torch.from_numpy(COLOUR.transpose(2, 0, 1)))
    assert torch.equal(TextureFolder(tmp_path / "b").sample(6, 5), torch.from_numpy(np.stack([GREY] * 3)))
