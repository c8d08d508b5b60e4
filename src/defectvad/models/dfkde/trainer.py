# src/defectvad/models/dfkde/trainer.py
from defectvad.engine.one_pass_trainer import OnePassTrainer
from defectvad.models.dfkde.torch_model import DfkdeModel


class DfkdeTrainer(OnePassTrainer):
    trainer_arguments = {"max_epochs": 1, "gradient_clip_val": 0}

    def __init__(self, backbone="resnet18", layers=None, weights_path=None, n_pca_components=16,
                 feature_scaling_method="scale", max_training_points=40000):
        super().__init__()
        self.model = DfkdeModel(backbone=backbone, layers=layers, weights_path=weights_path,
                                n_pca_components=n_pca_components, feature_scaling_method=feature_scaling_method,
                                max_training_points=max_training_points)

    def summary(self):
        return {"kde_points": int(self.model.classifier.kde_model.dataset.shape[0])}
