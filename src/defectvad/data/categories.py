# src/defectvad/data/categories.py
# dataset.category=all (or a list): one data set over several categories, each sample tagged with its category
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from defectvad.errors import ConfigError

ALL = "all"


def resolve_categories(dataset_cfg):
    # None for one category; else the categories in order ("all": the data set's official list)
    category = dataset_cfg.get("category")
    if OmegaConf.is_config(category):
        category = OmegaConf.to_object(category)
    if category != ALL and not isinstance(category, (list, tuple)):
        return None
    dataset_class = get_class(dataset_cfg._target_)
    official = [str(name) for name in dataset_class.CATEGORIES]
    if category == ALL:
        if not official:
            raise ConfigError(f"dataset.category=all: {dataset_class.NAME} has no official category list; "
                              f"list the categories instead, e.g. 'dataset.category=[a,b]'")
        return official
    categories = [name if isinstance(name, str) else format_category(name, official) for name in category]
    if not categories:
        raise ConfigError("dataset.category is an empty list; give one category, a list of them, or all")
    unknown = [name for name in categories if official and name not in official]
    if unknown:
        raise ConfigError(f"unknown {dataset_class.NAME} categories: {', '.join(unknown)}; "
                          f"choose from {', '.join(official)} (or all)")
    if len(set(categories)) < len(categories):
        raise ConfigError(f"dataset.category lists a category twice: {', '.join(categories)}")
    return categories


def format_category(name, official):
    # YAML reads BTAD's 01 as the int 1
    padded = f"{name:02d}" if isinstance(name, int) and not isinstance(name, bool) else str(name)
    return padded if padded in official else str(name)


def build_dataset(dataset_cfg, **kwargs):
    categories = resolve_categories(dataset_cfg)
    if categories is None:
        return instantiate(dataset_cfg, **kwargs)
    return CategoryUnion({name: instantiate(dataset_cfg, category=name, **kwargs) for name in categories})


class CategoryUnion(Dataset):
    def __init__(self, parts):
        self.parts = parts
        first = next(iter(parts.values()))
        self.NAME, self.has_masks, self.transform = first.NAME, first.has_masks, first.transform
        self.categories = list(parts)
        # no single category: a model that reads the class name from the data set uses its generic one
        self.category = None
        self.samples = [{**sample, "category": name} for name, part in parts.items() for sample in part.samples]

    def describe_location(self):
        return ", ".join(part.describe_location() for part in self.parts.values())

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        return self.parts[sample["category"]].load_sample(sample)

    def load_full_resolution_mask(self, sample):
        return self.parts[sample["category"]].load_full_resolution_mask(sample)

    def compute_extra_metrics(self, predictions, full_resolution=False):
        # a data set's own metrics (MVTec LOCO's sPRO, Real-IAD's objects), category by category
        import torch

        result = {}
        count = len(predictions["image_path"])
        for name, part in self.parts.items():
            extra_metrics = getattr(part, "compute_extra_metrics", None)
            if extra_metrics is None:
                continue
            paths = {sample["image_path"] for sample in part.samples}
            chosen = [i for i, path in enumerate(predictions["image_path"]) if path in paths]
            index = torch.tensor(chosen, dtype=torch.long)
            subset = {key: value[index] if torch.is_tensor(value) and value.shape[:1] == (count,) else value
                      for key, value in predictions.items()}
            subset["image_path"] = [predictions["image_path"][i] for i in chosen]
            for key, value in extra_metrics(subset, full_resolution).items():
                result.setdefault(key, {})[name] = value
        return result
