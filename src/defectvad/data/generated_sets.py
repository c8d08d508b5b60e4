# src/defectvad/data/generated_sets.py
# data sets the library writes itself (synthetic, panel): each category's folder is written once, whole, on first use
from pathlib import Path

from defectvad.atomic_files import write_folder_atomic
from defectvad.errors import DatasetError


def generate_categories(root, categories, known, kind, write_category, seed):
    # categories: None (all of known), one name or a list; write_category(folder, name, seed) fills a new folder.
    # Returns the names
    root = Path(root)
    categories = list(known) if categories is None else [categories] if isinstance(categories, str) else categories
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise DatasetError(f"unknown {kind} categories: {', '.join(map(str, unknown))}; "
                           f"choose from {', '.join(known)}")
    root.mkdir(parents=True, exist_ok=True)
    for name in categories:
        if not (root / name).exists():
            write_folder_atomic(root / name, lambda folder: write_category(folder, name, seed))
    return categories
