# src/defectvad/grading/run_model.py
# a finished run's grading (its grading.json) applied to new images: calibration, region threshold, cut-points
# and type classifier as the run fitted them
import json

import numpy as np
import torch
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as TF

from defectvad.engine.checkpoints import load_weights
from defectvad.grading.calibration import MapCalibration
from defectvad.grading.defect_types import TypeClassifier
from defectvad.grading.images import describe_regions, grade_regions, map_pixel_area_mm2, public_region
from defectvad.grading.region_features import RegionFeatures
from defectvad.grading.region_shape import describe_shape
from defectvad.grading.run_grading import FEATURE_WEIGHTS


class RunGrading:
    def __init__(self, run):
        model = json.loads((run.run_dir / "grading.json").read_text())["model"]
        self.settings = model["settings"]
        self.calibration = MapCalibration.from_dict(model["calibration"])
        self.threshold = model["threshold"]["calibrated"]
        self.cut_points = np.array(model["cut_points"])
        self.levels_from = model["levels_from"]
        self.classifier = None if model["classifier"] is None else TypeClassifier.from_dict(model["classifier"])
        self.transform = run.transform
        self.transform_settings = run.cfg.transform
        self.extractor = None
        if self.classifier is not None:
            # the run saved the backbone layers the classifier's features come from
            self.extractor = RegionFeatures(run.cfg.backbone.name, self.settings["feature_layers"], None, run.device)
            load_weights(self.extractor.extractor, run.run_dir / FEATURE_WEIGHTS)

    def __call__(self, picture, anomaly_map, original_size):
        # picture: (3, H, W) in [0, 1] as the model saw it, original_size: the file's (width, height);
        # (image level, image type, regions without masks)
        anomaly_map = torch.as_tensor(anomaly_map).double().numpy()
        shown = TF.resize(picture, list(anomaly_map.shape), antialias=True).permute(1, 2, 0).double().numpy()
        pixel_area = map_pixel_area_mm2(original_size, self.transform_settings, anomaly_map.shape,
                                        self.settings.get("pixel_mm", 0.1))
        regions = describe_regions(self.calibration(anomaly_map), shown, self.threshold, self.settings["min_area"],
                                   self.settings["ring_width"], self.settings.get("extent", 0.0), pixel_area)
        features = None
        if self.extractor is not None and regions:
            features = self.extractor(F.normalize(picture, self.transform.mean, self.transform.std),
                                      [region["mask"] for region in regions])
            if self.settings.get("shape_features"):
                features = np.concatenate([features, np.stack([describe_shape(r) for r in regions])], 1)
        level, defect_type = grade_regions(regions, features, self.settings["severity_score"], self.cut_points,
                                           self.classifier)
        return level, defect_type, [public_region(region) for region in regions]
