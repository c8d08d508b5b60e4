# src/defectvad/models/patchcore/trainer.py
import time

from defectvad.components.k_center_greedy import check_sampling_ratio
from defectvad.engine.one_pass_trainer import OnePassTrainer
from defectvad.models.patchcore.torch_model import PatchcoreModel


class PatchcoreTrainer(OnePassTrainer):
    def __init__(self, backbone="wide_resnet50_2", layers=None, weights_path=None,
                 coreset_sampling_ratio=0.1, num_neighbors=9):
        super().__init__()
        check_sampling_ratio(coreset_sampling_ratio)
        self.coreset_sampling_ratio = coreset_sampling_ratio
        self.coreset_seconds = None
        self.model = PatchcoreModel(backbone=backbone, layers=layers, weights_path=weights_path, num_neighbors=num_neighbors)

    def on_train_epoch_end(self):
        started = time.perf_counter()
        self.model.subsample_embedding(self.coreset_sampling_ratio, progress_bar=self.progress_bar)
        self.coreset_seconds = round(time.perf_counter() - started, 3)

    def summary(self):
        return {"memory_bank_size": list(self.model.memory_bank.shape), "coreset_s": self.coreset_seconds}
