# src/defectvad/data/real_iad.py
# Real-IAD: images under <root>/<image_dir>/<category>/ (OK/S0001/<category>_0001_OK_C1_<time>.jpg,
# NG/<defect>/S0002/..._NG_C3_<time>.jpg and ..._mask.png), splits in <root>/<json_dir>/<category>.json:
# {"meta": {...}, "train": [...], "test": [...]}, each entry {"category", "anomaly_class" ("OK" or a defect code),
# "image_path", "mask_path" (null for OK)}, paths relative to the category's image folder. Each object is photographed
# from five views C1..C5 (one folder per object); multi_view judges each object by the largest score of its views
import json
import re
from pathlib import Path

from defectvad.data.base import AnomalyDataset, create_sample
from defectvad.errors import ConfigError, DatasetError

SETTINGS = ("single_view", "multi_view")
ENTRY_KEYS = ("anomaly_class", "image_path")
VIEW = re.compile(r"_(C[1-5])_")
# the object of a view, as Real-IAD's evaluation tool ADEval reads it from the file name (its --sample_key_pat):
# audiojack_0001_OK_C1_<time>.jpg -> audiojack_0001_OK
OBJECT = re.compile(r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_C[0-9]_")


def find_view(image_path):
    match = VIEW.search(Path(image_path).name)
    return match.group(1) if match else None


def find_object(image_path):
    # a file name without the pattern: the folder of its views
    match = OBJECT.search(Path(image_path).name)
    return match.group(1) if match else str(Path(image_path).parent)


class RealIADDataset(AnomalyDataset):
    CATEGORIES = ("audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts",
                  "pcb", "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator",
                  "rolled_strip_base", "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy",
                  "toy_brick", "transistor1", "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick",
                  "zipper")
    NAME = "Real-IAD"

    def __init__(self, root, category, split, transform=None, k_shot=None, seed=0, max_image_pixels=None,
                 resize_masks=False, image_dir="realiad_1024", json_dir="realiad_jsons/realiad_jsons",
                 setting="multi_view"):
        if setting not in SETTINGS:
            raise ConfigError(f"dataset.setting must be one of: {', '.join(SETTINGS)}; got {setting!r}")
        self.image_dir = str(image_dir)
        self.json_dir = str(json_dir)
        self.setting = setting
        super().__init__(root, category, split, transform, k_shot, seed, max_image_pixels, resize_masks)

    def describe_location(self):
        return str(self.root / self.json_dir / f"{self.category}.json")

    def read_split_file(self):
        json_dir = self.root / self.json_dir
        if not json_dir.is_dir():
            raise DatasetError(f"Real-IAD split folder not found: {json_dir}; set dataset.json_dir to the folder of "
                               f"<category>.json files below {self.root} (realiad_jsons/realiad_jsons for multi-view, "
                               f"realiad_jsons/realiad_jsons_sv for single-view)")
        path = json_dir / f"{self.category}.json"
        if not path.is_file():
            found = sorted(p.stem for p in json_dir.glob("*.json"))
            raise DatasetError(f"Real-IAD category '{self.category}' not found: no {path}; categories found there: "
                               f"{', '.join(found) or 'none'}")
        try:
            content = json.loads(path.read_text())
        except ValueError as error:
            raise DatasetError(f"{path} is not valid JSON ({error})") from None
        if not isinstance(content, dict) or not isinstance(content.get(self.split), list):
            keys = ", ".join(content) if isinstance(content, dict) else type(content).__name__
            raise DatasetError(f"{path} must hold a '{self.split}' list of images (Real-IAD's meta, train, test); "
                               f"found {keys}")
        return path, content

    def collect_samples(self):
        path, content = self.read_split_file()
        normal_class = (content.get("meta") or {}).get("normal_class", "OK")
        image_root = self.root / self.image_dir / str(self.category)
        if not image_root.is_dir():
            raise DatasetError(f"Real-IAD image folder not found: {image_root}; set dataset.image_dir to the folder "
                               f"below {self.root} that holds the category folders (realiad_256, realiad_512, "
                               f"realiad_1024 or realiad_raw)")
        samples = []
        for index, entry in enumerate(content[self.split]):
            if not isinstance(entry, dict) or not set(ENTRY_KEYS) <= set(entry):
                raise DatasetError(f"{path}, {self.split} entry {index} must have the keys category, anomaly_class, "
                                   f"image_path, mask_path; found {entry!r}")
            if entry.get("category", self.category) != self.category:
                continue
            image_path = image_root / entry["image_path"]
            if not image_path.is_file():
                raise DatasetError(f"image listed in {path} not found: {image_path}")
            label = int(entry["anomaly_class"] != normal_class)
            mask_path = None
            if label:
                mask_path = image_root / entry["mask_path"] if entry.get("mask_path") else None
                if mask_path is None or not mask_path.is_file():
                    raise DatasetError(f"test image {image_path} has no mask; expected "
                                       f"{mask_path or 'a mask_path in ' + str(path)}")
            sample = create_sample(image_path, mask_path, label, "good" if not label else entry["anomaly_class"])
            sample["object"] = find_object(entry["image_path"])
            sample["view"] = find_view(entry["image_path"])
            samples.append(sample)
        return samples

    def compute_extra_metrics(self, predictions, full_resolution=False):
        # per view: the usual metrics; per object (multi_view): its largest view score against "any view anomalous"
        if self.setting != "multi_view":
            return {}
        from defectvad.metrics.multi_view import compute_object_metrics

        return {"object_metrics": compute_object_metrics(predictions, self.samples)}
