# tests/test_benchmark_union.py
import numpy as np
import torch

from defectvad.data.categories import CategoryUnion
from defectvad.data.mvtec_loco import MVTecLocoDataset
from test_benchmark_layouts import SMALL, write_loco


def test_loco_spro_per_category_in_a_run_over_several(tmp_path):
    write_loco(tmp_path, "pushpins")
    write_loco(tmp_path, "screw_bag")
    parts = {name: MVTecLocoDataset(tmp_path, name, "test", SMALL) for name in ("pushpins", "screw_bag")}
    union = CategoryUnion(parts)
    rng = np.random.default_rng(1)
    maps = torch.from_numpy((rng.integers(0, 30, (8, 1, 16, 16)) / 8).astype(np.float32))
    predictions = {"image_path": [s["image_path"] for s in union.samples], "anomaly_map": maps,
                   "pred_score": torch.arange(8.0), "label": torch.tensor([s["label"] for s in union.samples])}
    result = union.compute_extra_metrics(predictions)
    for offset, name in ((0, "pushpins"), (4, "screw_bag")):
        own = {"image_path": predictions["image_path"][offset:offset + 4], "anomaly_map": maps[offset:offset + 4],
               "pred_score": predictions["pred_score"][offset:offset + 4]}
        assert result["spro"][name] == parts[name].compute_extra_metrics(own)["spro"]
    assert set(result) == {"spro", "image_auroc_by_type"}
