# src/defectvad/inference/mvtec_ad2_submission.py
# the folders MVTec's evaluation server reads (as MVTec AD 2's public code writes them): each test image
# <category>/<test set>/<name>.png gets anomaly_images/<category>/<test set>/<name>.tiff (the anomaly map, 2-D float16,
# at the image's own size) and anomaly_images_thresholded/<category>/<test set>/<name>.png (0 or 255, the map at the
# run's pixel threshold)
import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from defectvad.data.images import read_image_size
from defectvad.data.mvtec_ad2 import TEST_SETS, list_private_images
from defectvad.errors import ConfigError, DefectVADError
from defectvad.inference.predictions import predict_files

FLOAT16_MAX = float(np.finfo(np.float16).max)


def submission_paths(out, category, test_set, image_path):
    relative = f"{category}/{TEST_SETS[test_set]}/{image_path.stem}"
    return out / "anomaly_images" / f"{relative}.tiff", out / "anomaly_images_thresholded" / f"{relative}.png"


def full_size_map(anomaly_map, image_path, max_pixels=None):
    # the model's map resized (bilinear, as for full-resolution metrics) to the image's (height, width)
    width, height = read_image_size(image_path, "image", max_pixels)
    resized = F.interpolate(anomaly_map[None, None].float(), size=(height, width), mode="bilinear",
                            align_corners=False)
    return resized[0, 0].numpy()


def write_map_files(anomaly_map, pixel_threshold, tiff_path, png_path):
    try:
        import tifffile
    except ImportError:
        raise DefectVADError("writing the server's float16 TIFF maps needs the tifffile package (PIL writes no "
                             "float16): pip install tifffile, or pip install -e .[submission]") from None
    if np.abs(anomaly_map).max() > FLOAT16_MAX:
        raise ConfigError(f"the map of {tiff_path.stem} reaches {np.abs(anomaly_map).max():.6g}, beyond float16 "
                          f"(the server's format, at most {FLOAT16_MAX:g}); this model's scores need rescaling")
    tiff_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(tiff_path, anomaly_map.astype(np.float16))
    Image.fromarray(np.where(anomaly_map >= pixel_threshold, 255, 0).astype(np.uint8)).save(png_path)


def write_submission(run, root, category, test_sets, out, pixel_threshold, batch_size, skipped):
    # returns the number of images written per test set; unreadable images go to `skipped`
    counts = {}
    for test_set in test_sets:
        paths = list_private_images(root, category, test_set)
        counts[test_set] = 0
        with torch.no_grad():
            for path, _, _, anomaly_map in predict_files(run, paths, batch_size, skipped):
                tiff_path, png_path = submission_paths(out, category, test_set, path)
                write_map_files(full_size_map(anomaly_map, path, run.max_image_pixels), pixel_threshold, tiff_path,
                                png_path)
                counts[test_set] += 1
    return counts
