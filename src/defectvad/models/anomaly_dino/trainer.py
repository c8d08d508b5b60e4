# src/defectvad/models/anomaly_dino/trainer.py
import time

from defectvad.components.k_center_greedy import check_sampling_ratio
from defectvad.engine.one_pass_trainer import OnePassTrainer
from defectvad.errors import ConfigError
from defectvad.models.anomaly_dino.torch_model import AnomalyDINOModel

# few_shot: dataset.k_shot reference images (the paper's setting); one_class: every normal training image
# (anomalib's, which declares AnomalyDINO one-class)
LEARNING_TYPES = ("few_shot", "one_class")


class AnomalyDINOTrainer(OnePassTrainer):
    learning_type = "few_shot"
    # the paper's headline setting (1-shot MVTec AD); anomalib itself trains on the whole split
    default_k_shot = 1

    def __init__(self, backbone="dinov2_vits14", layer=None, weights_path=None, num_neighbours=1, masking=False,
                 coreset_subsampling=False, sampling_ratio=0.1, learning_type="few_shot"):
        super().__init__()
        if learning_type not in LEARNING_TYPES:
            raise ConfigError(f"model.learning_type must be one of: {', '.join(LEARNING_TYPES)}; got '{learning_type}'")
        if not isinstance(masking, bool) or not isinstance(coreset_subsampling, bool):
            raise ConfigError(f"model.masking and model.coreset_subsampling must be true or false, got "
                              f"{masking!r} and {coreset_subsampling!r}")
        if coreset_subsampling:
            check_sampling_ratio(sampling_ratio)
        self.learning_type = learning_type
        # the background mask's PCA (an SVD per image) has no ONNX operator
        self.exportable = not masking
        self.coreset_seconds = None
        self.model = AnomalyDINOModel(backbone=backbone, layer=layer, weights_path=weights_path,
                                      num_neighbours=num_neighbours, masking=masking,
                                      coreset_subsampling=coreset_subsampling, sampling_ratio=sampling_ratio)

    def on_train_epoch_end(self):
        started = time.perf_counter()
        self.model.fit(progress_bar=self.progress_bar)
        self.coreset_seconds = round(time.perf_counter() - started, 3)

    def summary(self):
        return {"learning_type": self.learning_type, "layer": self.model.layer,
                "memory_bank_size": list(self.model.memory_bank.shape), "fit_bank_s": self.coreset_seconds}
