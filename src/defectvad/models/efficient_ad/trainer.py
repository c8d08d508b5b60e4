# src/defectvad/models/efficient_ad/trainer.py
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from defectvad.backbones.weights import load_state_dict
from defectvad.engine.base_trainer import BaseTrainer
from defectvad.errors import BackboneError, ConfigError
from defectvad.models.efficient_ad.imagenette import ImagenetteDataset, find_penalty_images
from defectvad.models.efficient_ad.torch_model import EfficientAdModel, reduce_tensor_elems

log = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 256
TEACHER_URL = ("https://github.com/open-edge-platform/anomalib/releases/download/"
               "efficientad_pretrained_weights/efficientad_pretrained_weights.zip")


class EfficientAdTrainer(BaseTrainer):
    # anomalib sets no epochs, so Lightning's 1000 apply; far too long on a CPU (see conf/model/efficient_ad.yaml)
    trainer_arguments = {"max_epochs": 1}
    # the networks normalise their input themselves
    normalize_input = False

    def __init__(self, model_size="small", teacher_out_channels=384, padding=False, pad_maps=True, lr=1e-4,
                 weight_decay=1e-5, teacher_dir="backbones/efficientad_pretrained_weights", pretrained_teacher=True,
                 imagenet_dir=None, backbone=None, weights_path=None):
        # backbone and weights_path come from the backbone group, which EfficientAD does not use
        super().__init__()
        self.model_size = model_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.teacher_dir = teacher_dir
        self.pretrained_teacher = pretrained_teacher
        self.imagenet_dir = imagenet_dir
        self.model = EfficientAdModel(teacher_out_channels, model_size, padding, pad_maps)
        self.teacher_path = self.load_teacher() if pretrained_teacher else None
        if imagenet_dir is not None:
            find_penalty_images(imagenet_dir)
        self.train_loader = None
        self.imagenet_loader = None
        self.imagenet_iterator = None
        self.image_size = None
        self.steps_per_epoch = None
        self.lr_scheduler = None
        self.quantiles_step = None

    def load_teacher(self):
        folder = Path(self.teacher_dir).expanduser().resolve()
        path = folder / f"pretrained_teacher_{self.model_size}.pth"
        if not path.is_file():
            raise BackboneError(
                f"EfficientAD teacher weights not found: expected {path.name} in {folder}; on a machine that is "
                f"online fetch {TEACHER_URL} and unzip it into {folder.parent}, or set model.pretrained_teacher=false "
                f"for a random teacher (smoke tests only)"
            )
        try:
            self.model.teacher.load_state_dict(load_state_dict(path))
        except RuntimeError:
            raise BackboneError(
                f"{path} does not hold a {self.model_size} EfficientAD teacher with "
                f"{self.model.teacher_out_channels} output channels; fetch it again from {TEACHER_URL}"
            ) from None
        return path

    def fit(self, train_loader, val_loader=None):
        transform = getattr(train_loader.dataset, "transform", None)
        if getattr(transform, "normalize", False):
            raise ConfigError("EfficientAD normalises images inside its networks; set transform.normalize=null")
        self.image_size = tuple(train_loader.dataset[0]["image"].shape[-2:])
        if min(self.image_size) < MIN_IMAGE_SIZE:
            raise ConfigError(f"EfficientAD needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} (its autoencoder "
                              f"ends in an 8x8 convolution on a 32 times smaller map), got {list(self.image_size)}; "
                              f"set transform.image_size=[256,256]")
        # the statistics passes keep the configured batch size; training takes one image per step (anomalib)
        self.train_loader = train_loader
        if train_loader.batch_size != 1:
            log.info("EfficientAD trains on one image per step; loader.train_batch_size=%s is used only for "
                     "the channel and quantile statistics", train_loader.batch_size)
            train_loader = DataLoader(
                train_loader.dataset, batch_size=1, sampler=train_loader.sampler, num_workers=train_loader.num_workers,
                collate_fn=train_loader.collate_fn, worker_init_fn=train_loader.worker_init_fn,
                persistent_workers=train_loader.persistent_workers,
            )
        self.steps_per_epoch = len(train_loader)
        return super().fit(train_loader, val_loader)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(
            list(self.model.student.parameters()) + list(self.model.ae.parameters()),
            lr=self.lr, weight_decay=self.weight_decay,
        )
        steps = self.max_epochs * self.steps_per_epoch
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        # the paper's decay after 95% of the steps; our engine steps schedulers per epoch, so this one is kept apart
        self.lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, int(0.95 * steps)), gamma=0.1)
        return optimizer

    def on_train_start(self):
        if self.imagenet_dir is not None:
            self.imagenet_loader = DataLoader(ImagenetteDataset(self.imagenet_dir, self.image_size), batch_size=1,
                                              shuffle=True)
            self.imagenet_iterator = iter(self.imagenet_loader)
        if not self.model.mean_std.is_set():
            self.model.mean_std.update(self.teacher_channel_mean_std(self.train_loader))

    def next_imagenet_batch(self):
        if self.imagenet_loader is None:
            return None
        try:
            images = next(self.imagenet_iterator)
        except StopIteration:
            self.imagenet_iterator = iter(self.imagenet_loader)
            images = next(self.imagenet_iterator)
        return images.to(self.device)

    def training_step(self, batch, batch_idx):
        loss_st, loss_ae, loss_stae = self.model(batch["image"], batch_imagenet=self.next_imagenet_batch())
        return {"loss": loss_st + loss_ae + loss_stae, "loss_st": loss_st, "loss_ae": loss_ae, "loss_stae": loss_stae}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.lr_scheduler.step()

    def on_validation_epoch_start(self):
        self.update_quantiles()

    def on_train_end(self):
        self.update_quantiles()

    def update_quantiles(self):
        # anomalib takes the normal images of its validation split, which is half the test set by default;
        # here the training images, so that no test image shapes the model
        if self.quantiles_step != self.global_step:
            training = self.model.training
            self.model.eval()
            self.model.quantiles.update(self.map_norm_quantiles(self.train_loader))
            self.model.train(training)
            self.quantiles_step = self.global_step

    @torch.no_grad()
    def teacher_channel_mean_std(self, loader):
        count, total, total_sqr = 0, 0.0, 0.0
        for batch in self.create_progress_bar(loader, "teacher channel mean and std"):
            y = self.model.teacher(batch["image"].to(self.device)).float()
            count += y[:, 0].numel()
            total = total + y.sum(dim=(0, 2, 3))
            total_sqr = total_sqr + (y**2).sum(dim=(0, 2, 3))
        mean = total / count
        std = torch.sqrt(total_sqr / count - mean**2)
        return {"mean": mean[None, :, None, None], "std": std[None, :, None, None]}

    @torch.no_grad()
    def map_norm_quantiles(self, loader):
        maps_st, maps_ae = [], []
        for batch in self.create_progress_bar(loader, "map quantiles"):
            normal = batch["label"] == 0
            if normal.any():
                map_st, map_ae = self.model.get_maps(batch["image"][normal].to(self.device), normalize=False)
                maps_st.append(map_st.float())
                maps_ae.append(map_ae.float())
        if not maps_st:
            raise ConfigError("EfficientAD found no normal images to compute its map quantiles")
        qa_st, qb_st = self.quantiles_of_maps(maps_st)
        qa_ae, qb_ae = self.quantiles_of_maps(maps_ae)
        return {"qa_st": qa_st, "qb_st": qb_st, "qa_ae": qa_ae, "qb_ae": qb_ae}

    @staticmethod
    def quantiles_of_maps(maps):
        values = reduce_tensor_elems(torch.cat(maps))
        return torch.quantile(values, 0.9), torch.quantile(values, 0.995)

    def summary(self):
        return {
            "model_size": self.model_size,
            "teacher": str(self.teacher_path) if self.teacher_path else "random (model.pretrained_teacher=false)",
            "imagenet_penalty": self.imagenet_dir is not None,
            "imagenet_dir": None if self.imagenet_dir is None else str(Path(self.imagenet_dir).expanduser().resolve()),
            "train_batch_size": 1,
            "map_quantiles_from": "training images",
            "lr_decay_step": self.lr_scheduler.step_size if self.lr_scheduler else None,
        }
