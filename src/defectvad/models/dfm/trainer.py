# src/defectvad/models/dfm/trainer.py
from defectvad.engine.one_pass_trainer import OnePassTrainer
from defectvad.models.dfm.torch_model import DFMModel


class DfmTrainer(OnePassTrainer):
    trainer_arguments = {"max_epochs": 1, "gradient_clip_val": 0}
    # its traced graph keeps the trace's batch size: onnxruntime fails on another batch size
    exportable = False

    def __init__(self, backbone="resnet50", layer=None, weights_path=None, pooling_kernel_size=4,
                 pca_level=0.97, score_type="fre"):
        super().__init__()
        self.model = DFMModel(backbone=backbone, layer=layer, weights_path=weights_path,
                              pooling_kernel_size=pooling_kernel_size, n_comps=pca_level, score_type=score_type)

    def summary(self):
        num_components = self.model.pca_model.num_components
        return {"pca_components": int(num_components.reshape(-1)[0]) if num_components.numel() else None}
