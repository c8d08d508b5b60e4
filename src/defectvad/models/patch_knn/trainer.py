# src/defectvad/models/patch_knn/trainer.py
from defectvad.engine.devices import autocast
from defectvad.engine.one_pass_trainer import OnePassTrainer
from defectvad.errors import ConfigError, DatasetError
from defectvad.models.patch_knn.torch_model import PatchKnnModel

LEARNING_TYPES = ("few_shot", "zero_shot")


class PatchKnnTrainer(OnePassTrainer):
    # no anomalib counterpart: the smallest model on the few-shot and zero-shot paths of the engine
    learning_type = "few_shot"
    default_k_shot = 4

    def __init__(self, backbone="resnet18", layers=None, weights_path=None, learning_type="few_shot"):
        super().__init__()
        if learning_type not in LEARNING_TYPES:
            raise ConfigError(f"model.learning_type must be one of: {', '.join(LEARNING_TYPES)}; got '{learning_type}'")
        self.learning_type = learning_type
        self.model = PatchKnnModel(backbone=backbone, layers=layers, weights_path=weights_path,
                                   exclude_self=learning_type == "zero_shot")

    def prepare(self, loader):
        # zero-shot: the unlabeled test set becomes the bank, so each image is scored against the others
        if self.learning_type != "zero_shot":
            return
        if len(loader.dataset) < 2:
            raise DatasetError("zero-shot mutual scoring needs at least 2 test images, got "
                               f"{len(loader.dataset)}")
        self.model.to(self.device).eval()
        for batch in self.create_progress_bar(loader, "bank"):
            with autocast(self.device, self.precision):
                self.model.collect(batch["image"].to(self.device))
        self.model.fit()
        self.save_checkpoints()

    def summary(self):
        return {"learning_type": self.learning_type, "bank_images": int(self.model.memory_bank.shape[0]),
                "memory_bank_size": list(self.model.memory_bank.shape)}
