# src/defectvad/data/visa.py
import csv

from defectvad.data.base import AnomalyDataset, create_sample, find_category_dir
from defectvad.data.tree_layout import collect_tree_samples
from defectvad.errors import DatasetError

CSV_COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


class VisaDataset(AnomalyDataset):
    CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
                  "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
    NAME = "VisA"

    def collect_samples(self):
        category_dir = self.root / str(self.category)
        if (category_dir / "train").is_dir() or (category_dir / "test").is_dir():
            return collect_tree_samples(category_dir, self.split, "good", ("", "_mask"), self.NAME)
        if (self.root / "split_csv" / "1cls.csv").is_file():
            return self.collect_csv_samples()
        category_dir = find_category_dir(self.root, self.category, self.NAME)
        raise DatasetError(f"unknown VisA layout in {category_dir}; expected either the raw release "
                           f"({self.root}/split_csv/1cls.csv) or the converted tree "
                           f"({category_dir}/train/good, {category_dir}/test/good, {category_dir}/test/bad)")

    def collect_csv_samples(self):
        csv_path = self.root / "split_csv" / "1cls.csv"
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not set(CSV_COLUMNS) <= set(reader.fieldnames):
                raise DatasetError(f"{csv_path} must have the header {','.join(CSV_COLUMNS)}; "
                                   f"found {reader.fieldnames}")
            rows = list(reader)
        objects = sorted({row["object"] for row in rows})
        if self.category not in objects:
            raise DatasetError(f"VisA category '{self.category}' not found in {csv_path}; "
                               f"categories found there: {', '.join(objects) or 'none'}")
        samples = []
        for row in rows:
            if row["object"] != self.category or row["split"] != self.split:
                continue
            if row["label"] not in LABELS:
                raise DatasetError(f"{csv_path}: label must be 'normal' or 'anomaly', got {row['label']!r} "
                                   f"for {row['image']}")
            image_path = self.root / row["image"]
            if not image_path.is_file():
                raise DatasetError(f"image listed in {csv_path} not found: {image_path}")
            label = LABELS[row["label"]]
            if label == 0:
                samples.append(create_sample(image_path, None, 0, "good"))
                continue
            mask_path = self.root / row["mask"] if row["mask"] else None
            if mask_path is None or not mask_path.is_file():
                raise DatasetError(f"test image {image_path} has no mask; expected "
                                   f"{mask_path or 'a mask path in ' + str(csv_path)}")
            samples.append(create_sample(image_path, mask_path, 1, "bad"))
        return samples
