# src/defectvad/models/padim/trainer.py
from defectvad.engine.one_pass_trainer import OnePassTrainer
from defectvad.models.padim.torch_model import PadimModel


class PadimTrainer(OnePassTrainer):
    def __init__(self, backbone="resnet18", layers=None, weights_path=None, n_features=None):
        super().__init__()
        self.model = PadimModel(backbone=backbone, layers=layers, weights_path=weights_path, n_features=n_features)
