# src/defectvad/models/afclip/trainer.py
# AF-CLIP learns its adapter and prompt on another data set's labelled test split (model.train_dataset), then
# detects zero-shot on dataset, or few-shot with dataset.k_shot normal reference images in its memory bank
import logging

import torch
from omegaconf import OmegaConf

from defectvad.backbones.registry import get_backbone
from defectvad.engine.base_trainer import BaseTrainer
from defectvad.errors import ConfigError, TrainingError
from defectvad.models.afclip.loss import AfClipLoss
from defectvad.models.afclip.torch_model import BACKBONE, AfClipModel
from defectvad.models.winclip.trainer import load_prompt_tokenizer

log = logging.getLogger(__name__)


def default_feature_layers(backbone, clip_architecture):
    if get_backbone(backbone).family != "clip":
        return []
    # the backbone's four stages as 1-based block numbers (ViT-L-14: 6, 12, 18, 24, the authors'); a CLIP
    # resized for tests takes its blocks at the same quarters
    layers = (clip_architecture or {}).get("vision_layers")
    if layers:
        return sorted({max(1, layers * k // 4) for k in (1, 2, 3, 4)})
    return [int(name.rsplit(".", 1)[1]) + 1 for name in get_backbone(backbone).stages]


def category_names(dataset):
    categories = getattr(dataset, "categories", None) or [getattr(dataset, "category", None)]
    return {str(name) for name in categories}


def check_train_category(train_dataset):
    # the model config's synthetic default (weave) stays when only the data set is swapped
    from hydra.utils import get_class

    dataset_class = get_class(train_dataset["_target_"])
    official = [str(name) for name in getattr(dataset_class, "CATEGORIES", [])]
    category = train_dataset.get("category")
    if official and isinstance(category, str) and category != "all" and category not in official:
        raise ConfigError(f"model.train_dataset.category={category} is not a {dataset_class.NAME} category; set "
                          f"model.train_dataset.category=all (the authors') or one of: {', '.join(official)}")


class AfClipTrainer(BaseTrainer):
    # the authors' schedule: 2 epochs at batch 8 of Adam (lr 1e-4, betas 0.5, 0.999)
    trainer_arguments = {"max_epochs": 2}
    learning_type = "zero_shot"
    exportable = False

    def __init__(self, backbone=BACKBONE, weights_path=None, k_shot=0, train_dataset=None, transform=None,
                 batch_size=8, num_workers=0, seed=0, feature_layers=None, memory_layers=None, prompt_len=12,
                 alpha=0.1, lambda1=1.0, lambda2=1.0, gamma=4.0, authors_gradient=True, lr=1e-4, betas=(0.5, 0.999),
                 kernel_sizes=(1, 3, 5), kernel_sigma=4.0, map_sigma=4.0, backbone_dir=None, clip_architecture=None):
        super().__init__()
        if k_shot is not None and (not isinstance(k_shot, int) or isinstance(k_shot, bool) or k_shot < 0):
            raise ConfigError(f"AF-CLIP's k_shot (dataset.k_shot) must be an integer >= 0 or null, got {k_shot!r}")
        if not train_dataset or "_target_" not in train_dataset:
            raise ConfigError("AF-CLIP learns on another data set's labelled test split: set model.train_dataset, "
                              "e.g. dataset@model.train_dataset=visa model.train_dataset.category=all")
        check_train_category(train_dataset)
        self.k_shot = k_shot or 0
        self.learning_type = "few_shot" if self.k_shot else "zero_shot"
        self.train_dataset = train_dataset
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.lr = lr
        self.betas = tuple(betas)
        self.train_set = None
        feature_layers = feature_layers or default_feature_layers(backbone, clip_architecture)
        tokenizer = load_prompt_tokenizer(backbone_dir, weights_path is not None)
        self.model = AfClipModel(backbone=backbone, weights_path=weights_path, feature_layers=feature_layers,
                                 memory_layers=memory_layers, prompt_len=prompt_len, alpha=alpha,
                                 kernel_sizes=kernel_sizes, kernel_sigma=kernel_sigma, map_sigma=map_sigma,
                                 tokenizer=tokenizer, architecture=clip_architecture)
        self.loss = AfClipLoss(lambda1, lambda2, gamma, authors_gradient)

    def configure_optimizers(self):
        return torch.optim.Adam([self.model.state_prompt_embedding, *self.model.adaptor.parameters()], lr=self.lr,
                                betas=self.betas)

    def create_train_loader(self):
        # the auxiliary data set's test split, with its labels and masks, through the run's own transform
        from defectvad.data.categories import build_dataset
        from defectvad.data.loaders import create_dataloader
        from defectvad.data.transforms import create_transform

        transform = create_transform(OmegaConf.create(self.transform), self.model.backbone, self.normalize_input)
        self.train_set = build_dataset(OmegaConf.create(self.train_dataset), split="test", transform=transform,
                                       seed=self.seed)
        if len(self.train_set) == 0:
            raise TrainingError("model.train_dataset's test split is empty")
        log.info("AF-CLIP learns on %s (%s) test split: %d images", self.train_set.NAME,
                 ", ".join(sorted(category_names(self.train_set))), len(self.train_set))
        return create_dataloader(self.train_set, self.batch_size, True, self.num_workers, self.seed)

    def training_step(self, batch, batch_idx):
        pred_score, pred_map, tokens = self.model(batch["image"])
        return {"loss": self.loss(pred_score, pred_map, tokens, batch["label"], batch["mask"])}

    def fit(self, train_loader=None, val_loader=None):
        # train_loader: the k reference images of dataset (few-shot), or None (zero-shot)
        if self.k_shot and (train_loader is None or len(train_loader.dataset) == 0):
            raise TrainingError("AF-CLIP is few-shot but has no reference images")
        if val_loader is not None:
            log.info("AF-CLIP does not validate while it trains (the authors' schedule is 2 fixed epochs)")
        loader = self.create_train_loader()
        self.model.to(self.device)
        self.setup_optimizers()
        self.on_fit_start()
        self.on_train_start()
        self.model.clear_text_features()
        while not self.should_stop and self.current_epoch < self.max_epochs:
            self.model.train()
            self.on_train_epoch_start()
            self.run_train_epoch(loader)
            self.on_train_epoch_end()
            if self.scheduler is not None:
                self.scheduler.step()
            self.current_epoch += 1
            if self.max_steps is not None and self.global_step >= self.max_steps:
                self.should_stop = True
        self.model.eval()
        self.model.clear_text_features()
        # the learned prompts' embeddings, kept with the weights
        self.model.state_text_features()
        if self.k_shot:
            self.collect_references(train_loader)
        self.on_train_end()
        self.on_fit_end()
        self.save_checkpoints()
        return self

    @torch.no_grad()
    def collect_references(self, loader):
        for batch in self.create_progress_bar(loader, "reference images"):
            self.model.collect(batch["image"].to(self.device))
        self.model.fit()

    def prepare(self, loader):
        # the state prompts are the same for every category: encoded once and kept with the weights
        dataset = loader.dataset
        if self.train_set is not None and getattr(dataset, "NAME", None) == self.train_set.NAME:
            shared = category_names(dataset) & category_names(self.train_set)
            if shared:
                log.warning("AF-CLIP learned on the test images of %s (%s): these results are not zero-shot",
                            dataset.NAME, ", ".join(sorted(shared)))
        self.model.to(self.device).eval()
        if self.model.text_features.numel() == 0:
            self.model.state_text_features()
            self.save_checkpoints()

    def summary(self):
        train_set = self.train_set
        return {"learning_type": self.learning_type, "k_shot": self.k_shot, "backbone": self.model.backbone,
                "train_dataset": None if train_set is None else train_set.NAME,
                "train_categories": None if train_set is None else sorted(category_names(train_set)),
                "train_images": 0 if train_set is None else len(train_set),
                "feature_layers": list(self.model.feature_layers), "memory_layers": list(self.model.memory_layers),
                "reference_images": self.k_shot}
