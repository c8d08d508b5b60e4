# src/defectvad/data/mvtec_loco.py
# MVTec LOCO AD: <category>/train/good, validation/good, test/{good,logical_anomalies,structural_anomalies}, and per
# anomalous image a folder ground_truth/<type>/<stem>/ of masks 000.png, 001.png, ..., one per defect, whose pixel
# value names the defect's entry in <category>/defects_config.json (its saturation threshold for sPRO)
import json

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from defectvad.data.base import check_mask_size, create_sample, find_category_dir
from defectvad.data.images import list_images, open_image, read_image_size
from defectvad.data.transforms import to_size_pair
from defectvad.data.validation_good import ValidationGoodDataset, check_held_out_split
from defectvad.errors import ConfigError, DatasetError

ANOMALY_TYPES = ("logical_anomalies", "structural_anomalies")
DEFECT_KEYS = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")


def describe_layout(category_dir):
    return (f"MVTec LOCO AD expects {category_dir}/train/good, {category_dir}/validation/good, "
            f"{category_dir}/test/{{good,logical_anomalies,structural_anomalies}} and "
            f"{category_dir}/ground_truth/<type>/<image stem>/000.png")


def read_defects_config(path):
    # pixel value -> {defect_name, pixel_value, saturation_threshold, relative_saturation}, checked as the official
    # evaluation checks it
    if not path.is_file():
        raise DatasetError(f"{path} not found; it ships with each MVTec LOCO AD category and gives each defect's "
                           f"saturation threshold for sPRO")
    try:
        entries = json.loads(path.read_text())
    except ValueError as error:
        raise DatasetError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(entries, list):
        raise DatasetError(f"{path} must hold a list of defects, each with {', '.join(DEFECT_KEYS)}")
    config = {}
    for index, entry in enumerate(entries):
        where = f"{path}, entry {index}"
        if not isinstance(entry, dict) or not set(DEFECT_KEYS) <= set(entry):
            raise DatasetError(f"{where} must have the keys {', '.join(DEFECT_KEYS)}; found {entry!r}")
        value, threshold, relative = entry["pixel_value"], entry["saturation_threshold"], entry["relative_saturation"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
            raise DatasetError(f"{where}: pixel_value must be an integer in 1..255, got {value!r}")
        if not isinstance(relative, bool):
            raise DatasetError(f"{where}: relative_saturation must be true or false, got {relative!r}")
        if relative and not (isinstance(threshold, float) and 0 < threshold <= 1):
            raise DatasetError(f"{where}: a relative saturation_threshold is a share in (0, 1], got {threshold!r}")
        if not relative and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1):
            raise DatasetError(f"{where}: an absolute saturation_threshold is a whole number of pixels, got "
                               f"{threshold!r}")
        if value in config:
            raise DatasetError(f"{where}: pixel_value {value} is listed twice")
        config[value] = {key: entry[key] for key in DEFECT_KEYS}
    return config


def read_region(path, defects, max_pixels=None):
    # one mask file: (bool (H, W), its defect's config); the file's one non-zero value names the defect
    image = open_image(path, "mask", max_pixels)
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.max(axis=2)
    values = np.unique(array[array > 0])
    if values.size != 1:
        raise DatasetError(f"mask {path} must hold one defect (one non-zero pixel value), found values "
                           f"{values.tolist() or 'none'}")
    value = int(values[0])
    if value not in defects:
        raise DatasetError(f"mask {path} has pixel value {value}, which defects_config.json does not list "
                           f"(values there: {', '.join(str(v) for v in sorted(defects))})")
    return array > 0, defects[value]


def resize_region(region, transform, map_size):
    # a mask as the transform brings masks to the model's input (nearest neighbour, centre crop), then to the map
    tensor = torch.from_numpy(region.astype(np.uint8))[None]
    tensor = TF.resize(tensor, list(to_size_pair(transform.image_size, "image_size")), InterpolationMode.NEAREST)
    if transform.center_crop is not None:
        tensor = TF.center_crop(tensor, list(to_size_pair(transform.center_crop, "center_crop")))
    if tuple(tensor.shape[-2:]) != tuple(map_size):
        tensor = TF.resize(tensor, list(map_size), InterpolationMode.NEAREST)
    return tensor[0].numpy() > 0


class MVTecLocoDataset(ValidationGoodDataset):
    CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
    NAME = "MVTec LOCO AD"

    def __init__(self, root, category, split, transform=None, k_shot=None, seed=0, max_image_pixels=None,
                 resize_masks=False, spro_fpr_limit=0.05, held_out_split=None):
        check_held_out_split(held_out_split)
        if isinstance(spro_fpr_limit, bool) or not isinstance(spro_fpr_limit, (int, float)) \
                or not 0 < spro_fpr_limit <= 1:
            raise ConfigError(f"dataset.spro_fpr_limit must lie in (0, 1], got {spro_fpr_limit!r}")
        self.spro_fpr_limit = float(spro_fpr_limit)
        self.defects = None
        super().__init__(root, category, split, transform, k_shot, seed, max_image_pixels, resize_masks)

    def collect_samples(self):
        category_dir = find_category_dir(self.root, self.category, self.NAME)
        if self.split == "train":
            return self.collect_normal_samples(category_dir, describe_layout(category_dir))
        for kind in ("good",) + ANOMALY_TYPES:
            if not (category_dir / "test" / kind).is_dir():
                raise DatasetError(f"folder {category_dir / 'test' / kind} not found; {describe_layout(category_dir)}")
        self.defects = read_defects_config(category_dir / "defects_config.json")
        samples = [create_sample(p, None, 0, "good") for p in list_images(category_dir / "test" / "good")]
        for kind in ANOMALY_TYPES:
            for image_path in list_images(category_dir / "test" / kind):
                mask_dir = category_dir / "ground_truth" / kind / image_path.stem
                files = list_images(mask_dir) if mask_dir.is_dir() else []
                if not files:
                    raise DatasetError(f"test image {image_path} has no mask; expected {mask_dir}/000.png "
                                       f"(one file per defect)")
                sample = create_sample(image_path, mask_dir, 1, kind)
                sample["mask_files"] = [str(p) for p in files]
                samples.append(sample)
        return samples

    def check_mask_sizes(self):
        for sample in self.samples:
            if sample["mask_path"] is None:
                continue
            image_size = read_image_size(sample["image_path"], "image", self.max_image_pixels)
            for path in sample["mask_files"]:
                check_mask_size(read_image_size(path, "mask", self.max_image_pixels), image_size, path,
                                sample["image_path"], self.resize_masks)

    def read_regions(self, sample, image_size):
        # each defect of the image at the image's (width, height)
        regions = []
        for path in sample["mask_files"]:
            region, defect = read_region(path, self.defects, self.max_image_pixels)
            if check_mask_size(region.shape[::-1], image_size, path, sample["image_path"], self.resize_masks):
                resized = Image.fromarray(region.astype(np.uint8)).resize(image_size, Image.NEAREST)
                region = np.asarray(resized) > 0
            regions.append((region, defect))
        return regions

    def load_mask(self, sample, image_size):
        # all the image's defects together
        if sample["mask_path"] is None:
            return None
        union = np.zeros(image_size[::-1], bool)
        for path in sample["mask_files"]:
            mask = open_image(path, "mask", self.max_image_pixels)
            if check_mask_size(mask.size, image_size, path, sample["image_path"], self.resize_masks):
                mask = mask.resize(image_size, Image.NEAREST)
            array = np.asarray(mask)
            union |= (array.max(axis=2) if array.ndim == 3 else array) > 0
        return Image.fromarray(np.where(union, 255, 0).astype(np.uint8))

    def compute_extra_metrics(self, predictions, full_resolution=False):
        # sPRO for logical and structural anomalies (each with the good images) and their mean, as the official
        # evaluation reports them; and image AUROC the same way
        from defectvad.metrics.spro import SproCurves, saturation_area

        samples = {sample["image_path"]: sample for sample in self.samples}
        curves = SproCurves()
        size = None
        for index, path in enumerate(predictions["image_path"]):
            sample = samples[path]
            anomaly_map = predictions["anomaly_map"][index, 0].float()
            width, height = read_image_size(path, "image", self.max_image_pixels)
            if full_resolution:
                anomaly_map = F.interpolate(anomaly_map[None, None], size=(height, width), mode="bilinear",
                                            align_corners=False)[0, 0]
            size = tuple(anomaly_map.shape)
            regions = []
            if sample["mask_path"] is not None:
                scale = size[0] * size[1] / (width * height)
                for region, defect in self.read_regions(sample, (width, height)):
                    if not full_resolution:
                        region = resize_region(region, self.transform, size)
                    area = saturation_area(int(region.sum()), defect["saturation_threshold"],
                                           defect["relative_saturation"], scale)
                    regions.append((region, area))
            curves.add(anomaly_map.numpy(), regions, None if sample["label"] == 0 else sample["defect_type"])
        spro = {kind: curves.area(kind, self.spro_fpr_limit) for kind in ANOMALY_TYPES}
        spro["mean"] = (spro[ANOMALY_TYPES[0]] + spro[ANOMALY_TYPES[1]]) / 2
        spro.update({
            "fpr_limit": self.spro_fpr_limit,
            "resolution": "full: each map resized (bilinear) to its image's own size" if full_resolution else
                          list(size),
            "regions": {kind: curves.count_regions(kind) for kind in ANOMALY_TYPES},
            "regions_too_small": {kind: curves.lost.get(kind, 0) for kind in ANOMALY_TYPES},
            "rule": "each mask file is one defect; sPRO = min(overlap / saturation area, 1), mean over defects; FPR "
                    "over the defect-free pixels of the good images and of that type's images; area up to fpr_limit "
                    "divided by it; absolute saturation thresholds scaled by the map's share of the image's pixels",
        })
        return {"spro": spro, "image_auroc_by_type": self.image_auroc_by_type(predictions)}

    def image_auroc_by_type(self, predictions):
        from defectvad.metrics.evaluation import sweep_metrics
        from defectvad.metrics.sweep import sort_labels

        types = {sample["image_path"]: sample["defect_type"] for sample in self.samples}
        kinds = np.array([types[path] for path in predictions["image_path"]])
        scores = predictions["pred_score"].float().numpy()
        result = {}
        for kind in ANOMALY_TYPES:
            chosen = (kinds == "good") | (kinds == kind)
            result[kind] = sweep_metrics(*sort_labels(scores[chosen], kinds[chosen] == kind))["auroc"]
        result["mean"] = (result[ANOMALY_TYPES[0]] + result[ANOMALY_TYPES[1]]) / 2
        return result
