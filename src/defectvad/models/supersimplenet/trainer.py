# src/defectvad/models/supersimplenet/trainer.py
import logging
from pathlib import Path

import torch

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.errors import ConfigError
from defectvad.models.supersimplenet.loss import SSNLoss
from defectvad.models.supersimplenet.torch_model import SupersimplenetModel

log = logging.getLogger(__name__)

# torchvision's IMAGENET1K_V2 wide_resnet50_2; the noise std is set for the V1 weights' feature scale
V2_WEIGHTS = "9ba9bcbe"


class SupersimplenetTrainer(BaseTrainer):
    # anomalib sets no epoch count (Lightning would run 1000); 300 as its README's benchmark. No gradient
    # clipping in the unsupervised setting (anomalib's norm_clip_val 0)
    trainer_arguments = {"max_epochs": 300, "gradient_clip_val": 0}

    def __init__(self, backbone="wide_resnet50_2", layers=None, weights_path=None, perlin_threshold=0.2,
                 supervised=False, adapt_cls_features=False, noise_mean=0.0, noise_std=0.015, truncation_term=0.5,
                 adaptor_lr=0.0001, adaptor_weight_decay=0.01, segdec_lr=0.0002, segdec_weight_decay=0.00001,
                 milestones=(0.8, 0.9), gamma=0.4):
        super().__init__()
        if supervised:
            raise ConfigError(
                "model.supervised=true trains SuperSimpleNet on labelled anomalous images with their masks, which "
                "the one-class training split does not hold; leave model.supervised=false (anomalib's default)"
            )
        if not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in milestones):
            raise ConfigError(f"model.milestones are fractions of trainer.max_epochs in (0, 1], e.g. [0.8, 0.9]; "
                              f"got {list(milestones)}")
        if weights_path is not None and V2_WEIGHTS in Path(weights_path).name:
            log.warning("SuperSimpleNet's noise std (%s) suits torchvision's V1 weights; %s holds V2 weights",
                        noise_std, weights_path)
        self.supervised = supervised
        self.model = SupersimplenetModel(perlin_threshold=perlin_threshold, backbone=backbone, layers=layers,
                                         stop_grad=not supervised, adapt_cls_features=adapt_cls_features,
                                         weights_path=weights_path, noise_mean=noise_mean, noise_std=noise_std)
        self.loss = SSNLoss(truncation_term=truncation_term)
        self.adaptor_lr = adaptor_lr
        self.adaptor_weight_decay = adaptor_weight_decay
        self.segdec_lr = segdec_lr
        self.segdec_weight_decay = segdec_weight_decay
        self.milestones = list(milestones)
        self.gamma = gamma

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([
            {"params": self.model.adaptor.parameters(), "lr": self.adaptor_lr,
             "weight_decay": self.adaptor_weight_decay},
            {"params": self.model.segdec.parameters(), "lr": self.segdec_lr, "weight_decay": self.segdec_weight_decay},
        ])
        # milestones are fractions of the epoch count, as anomalib's int(max_epochs * 0.8), int(max_epochs * 0.9)
        milestones = [int(self.max_epochs * fraction) for fraction in self.milestones]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=self.gamma)
        return optimizer, scheduler

    def training_step(self, batch, batch_idx):
        anomaly_map, anomaly_score, masks, labels = self.model(batch["image"], masks=batch.get("mask"),
                                                               labels=batch.get("label"))
        loss = self.loss(pred_map=anomaly_map, pred_score=anomaly_score, target_mask=masks, target_label=labels)
        return {"loss": loss}

    def summary(self):
        return {"train_loss": self.train_losses[-1] if self.train_losses else None, "epochs": len(self.train_losses)}
