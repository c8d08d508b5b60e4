# src/defectvad/models/dfkde/trainer.py
from defectvad.engine.base_trainer import BaseTrainer
from defectvad.models.dfkde.torch_model import DfkdeModel


class DfkdeTrainer(BaseTrainer):
    trainer_arguments = {"max_epochs": 1, "gradient_clip_val": 0}

    def __init__(self, backbone="resnet18", layers=("layer4",), weights_path=None, n_pca_components=16,
                 feature_scaling_method="scale", max_training_points=40000):
        super().__init__()
        self.model = DfkdeModel(backbone=backbone, layers=layers, weights_path=weights_path,
                                n_pca_components=n_pca_components, feature_scaling_method=feature_scaling_method,
                                max_training_points=max_training_points)

    def training_step(self, batch, batch_idx):
        self.model(batch["image"])
        return None

    def on_train_epoch_end(self):
        self.model.fit()

    def summary(self):
        return {"kde_points": int(self.model.classifier.kde_model.dataset.shape[0])}
