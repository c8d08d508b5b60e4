# src/defectvad/models/padim/trainer.py
from defectvad.engine.base_trainer import BaseTrainer
from defectvad.models.padim.torch_model import PadimModel


class PadimTrainer(BaseTrainer):
    trainer_arguments = {"max_epochs": 1}

    def __init__(self, backbone="resnet18", layers=("layer1", "layer2", "layer3"), weights_path=None, n_features=None):
        super().__init__()
        self.model = PadimModel(backbone=backbone, layers=layers, weights_path=weights_path, n_features=n_features)

    def training_step(self, batch, batch_idx):
        self.model(batch["image"])
        return None

    def on_train_epoch_end(self):
        self.model.fit()
