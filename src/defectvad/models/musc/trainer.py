# src/defectvad/models/musc/trainer.py
import logging

import torch

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.engine.devices import autocast
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import DatasetError
from defectvad.models.musc.torch_model import BACKBONE, MuscModel

log = logging.getLogger(__name__)


class MuscTrainer(BaseTrainer):
    # the authors' MuSc: zero-shot and batch-level, nothing is trained. predict scores the loader's images as one
    # set: a first pass embeds every image (the patch tokens of all N images are held at once), the set is
    # scored, and the engine's own predict loop then reads each batch's rows from that result
    learning_type = "zero_shot"
    # the scoring of a set is no single traced graph with a free batch axis; tiles of one image are no set
    exportable = False
    tileable = False

    def __init__(self, backbone=BACKBONE, weights_path=None, layers=None, r_list=(1, 3, 5), k_list=(1, 2, 3),
                 topmin_min=0.0, topmin_max=0.3, clip_architecture=None, quick_gelu=None):
        super().__init__()
        self.model = MuscModel(backbone=backbone, layers=layers, weights_path=weights_path, r_list=r_list,
                               k_list=k_list, topmin_min=topmin_min, topmin_max=topmin_max,
                               clip_architecture=clip_architecture, quick_gelu=quick_gelu)
        # image path -> row of the scored set, while predict runs
        self.set_rows = None
        self.set_outputs = None

    @torch.no_grad()
    def predict(self, loader, hooks=False, **options):
        self.set_outputs, paths = self.score_loader(loader)
        self.set_rows = {path: row for row, path in enumerate(paths)}
        try:
            return super().predict(loader, hooks, **options)
        finally:
            self.set_rows = self.set_outputs = None

    def score_loader(self, loader):
        # every image embedded first, then the whole set scored at once
        self.model.to(self.device).eval()
        patches, class_tokens, paths = [], [], []
        grid = image_size = None
        for batch in self.create_progress_bar(loader, "embed"):
            images = batch["image"].to(self.device)
            with autocast(self.device, self.precision):
                embedding = self.model.embed(images)
            patches.append(embedding["patches"])
            class_tokens.append(embedding["class_tokens"])
            grid, image_size = embedding["grid"], images.shape[-2:]
            paths.extend(batch["image_path"])
        if len(paths) != len(set(paths)):
            raise DatasetError("MuSc matches its scores to the images by path, but the set names an image twice")
        log.info("MuSc: scoring %d images against each other", len(paths))
        embedding = {"patches": [torch.cat(layer) for layer in zip(*patches)],
                     "class_tokens": torch.cat(class_tokens), "grid": grid}
        del patches
        with autocast(self.device, self.precision):
            return self.model.score_set(embedding, image_size), paths

    def validation_step(self, batch, batch_idx):
        if self.set_rows is None:
            return self.model(batch["image"])
        rows = torch.tensor([self.set_rows[path] for path in batch["image_path"]], device=self.device)
        return InferenceBatch(self.set_outputs.pred_score[rows], self.set_outputs.anomaly_map[rows])

    def summary(self):
        return {"learning_type": self.learning_type, "backbone": self.model.backbone, "layers": self.model.layers,
                "r_list": list(self.model.r_list), "k_list": list(self.model.k_list),
                "topmin": [self.model.topmin_min, self.model.topmin_max],
                "scoring": "batch-level: each test image against all the other test images"}
