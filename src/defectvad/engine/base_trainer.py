# src/defectvad/engine/base_trainer.py
import logging
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from defectvad.engine.checkpoints import load_weights, save_weights
from defectvad.engine.devices import autocast
from defectvad.engine.early_stopping import EarlyStopping
from defectvad.engine.tiling import predict_tiles
from defectvad.errors import ConfigError, TrainingError
from defectvad.metrics.evaluation import compute_metrics

log = logging.getLogger(__name__)


class BaseTrainer:
    # loop defaults of the model, as anomalib's `trainer_arguments`; the trainer config group overrides them
    trainer_arguments = {"max_epochs": 1}
    # whether inputs are ImageNet-normalised for this model (transform.normalize=null picks this)
    normalize_input = True
    # one_class: trained on normal images; few_shot: dataset.k_shot reference images (default_k_shot when null);
    # zero_shot: no training images, and fit only prepares the model
    learning_type = "one_class"
    default_k_shot = None
    # whether tools/export.py can write the evaluation forward as one ONNX graph with a free batch axis
    exportable = True
    # whether evaluation may cut images into tiles (not for a model that scores the test set as a whole)
    tileable = True

    def __init__(self):
        self.model = None
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.max_epochs = self.trainer_arguments.get("max_epochs", 1)
        self.max_steps = self.trainer_arguments.get("max_steps")
        self.gradient_clip_val = self.trainer_arguments.get("gradient_clip_val")
        self.check_val_every_n_epoch = 1
        self.early_stopping = None
        self.weights_dir = None
        self.progress_bar = None
        self.current_epoch = 0
        self.global_step = 0
        self.should_stop = False
        self.optimizer = None
        self.scheduler = None
        self.validation_metrics = {}
        self.train_losses = []
        # weights file name -> the epoch whose finite state it holds, as saved by this run
        self.saved_weights = {}
        # tiled runs (configure_tiling): evaluation cuts each image into tiles and stitches the maps back
        self.tiler = None
        self.tile_batch_size = None
        self.tile_image_score = "tile"
        # the loader of held-out normal images (evaluation.holdout), set before fit for a model that calibrates
        # on them (model=ensemble); None without a holdout
        self.holdout_loader = None

    def configure_engine(self, device="cpu", precision="fp32", max_epochs=None, max_steps=None,
                         gradient_clip_val=None, check_val_every_n_epoch=1, early_stopping=None,
                         weights_dir=None, progress_bar=None):
        self.device = torch.device(device)
        self.precision = precision
        if max_epochs is not None:
            self.max_epochs = max_epochs
        if max_steps is not None:
            self.max_steps = max_steps
        if gradient_clip_val is not None:
            self.gradient_clip_val = gradient_clip_val
        self.check_val_every_n_epoch = check_val_every_n_epoch
        if early_stopping and early_stopping.get("monitor"):
            self.early_stopping = EarlyStopping(**early_stopping)
        self.weights_dir = Path(weights_dir) if weights_dir else None
        # None: a bar on a terminal, quiet in logs
        self.progress_bar = progress_bar
        return self

    # hooks, in the order they fire (see fit)
    def on_fit_start(self): pass
    def on_train_start(self): pass
    def on_train_epoch_start(self): pass
    def on_train_batch_start(self, batch, batch_idx): pass
    def on_train_batch_end(self, outputs, batch, batch_idx): pass
    def on_train_epoch_end(self): pass
    def on_validation_epoch_start(self): pass
    def on_validation_batch_start(self, batch, batch_idx): pass
    def on_validation_batch_end(self, outputs, batch, batch_idx): pass
    def on_validation_epoch_end(self): pass
    def on_train_end(self): pass
    def on_fit_end(self): pass

    def summary(self):
        # model facts worth keeping in metrics.json (e.g. a memory bank's size)
        return {}

    def configure_optimizers(self):
        # None (nothing learned by gradient), an optimizer, or (optimizer, scheduler)
        return None

    def configure_tiling(self, tiler, batch_size, image_score="tile"):
        if tiler is not None and not self.tileable:
            raise ConfigError(f"{type(self).__name__} scores the test images as a whole and cannot be tiled; "
                              f"set tiling.tile_size=null")
        self.tiler = tiler
        self.tile_batch_size = batch_size
        self.tile_image_score = image_score
        return self

    def training_step(self, batch, batch_idx):
        raise NotImplementedError

    def validation_step(self, batch, batch_idx):
        return self.model(batch["image"])

    def evaluation_step(self, batch, batch_idx):
        # validation_step on the batch, or on its tiles with the maps stitched back
        if self.tiler is None:
            return self.validation_step(batch, batch_idx)
        return predict_tiles(self.validation_step, batch, batch_idx, self.tiler, self.tile_batch_size,
                             self.tile_image_score)

    def fit(self, train_loader=None, val_loader=None):
        learns = self.learning_type != "zero_shot"
        if learns and (train_loader is None or len(train_loader.dataset) == 0):
            raise TrainingError("the training set is empty")
        self.model.to(self.device)
        self.setup_optimizers()
        self.on_fit_start()
        self.on_train_start()
        while learns and not self.should_stop and self.current_epoch < self.max_epochs:
            self.model.train()
            self.on_train_epoch_start()
            self.run_train_epoch(train_loader)
            self.on_train_epoch_end()
            if self.scheduler is not None:
                self.scheduler.step()
            if val_loader is not None and (self.current_epoch + 1) % self.check_val_every_n_epoch == 0:
                self.run_validation(val_loader)
            self.save_checkpoints()
            self.current_epoch += 1
            if self.max_steps is not None and self.global_step >= self.max_steps:
                self.should_stop = True
        self.on_train_end()
        self.on_fit_end()
        if not learns:
            # nothing learned, but a later predict rebuilds the model from the run's weights
            self.save_checkpoints()
        return self

    def prepare(self, loader):
        # called once with the test loader before it is scored: a zero-shot model reads what it needs here,
        # e.g. the class name (loader.dataset.category) or the whole unlabeled test set at once (MuSc);
        # a model whose state changes here saves it (self.save_checkpoints()) for a later predict
        pass

    def load_best_weights(self):
        # after early stopping: the weights of the best validation epoch, if one was saved
        path = None if self.weights_dir is None else self.weights_dir / "best.safetensors"
        if self.early_stopping is None or path is None or not path.is_file():
            return None
        load_weights(self.model, path)
        return path

    def setup_optimizers(self):
        configured = self.configure_optimizers()
        if isinstance(configured, (tuple, list)):
            self.optimizer, self.scheduler = configured
        else:
            self.optimizer, self.scheduler = configured, None
        if self.optimizer is not None:
            check_learning_rates(self.optimizer)

    def run_train_epoch(self, train_loader):
        bar = self.create_progress_bar(train_loader, f"epoch {self.current_epoch + 1}/{self.max_epochs}")
        epoch_losses = []
        for batch_idx, batch in enumerate(bar):
            batch = self.move_batch(batch)
            self.on_train_batch_start(batch, batch_idx)
            with autocast(self.device, self.precision):
                outputs = self.training_step(batch, batch_idx)
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None and self.optimizer is not None:
                self.backward_and_step(loss)
                epoch_losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}")
            self.global_step += 1
            self.on_train_batch_end(outputs, batch, batch_idx)
            if self.max_steps is not None and self.global_step >= self.max_steps:
                break
        if epoch_losses:
            self.train_losses.append(sum(epoch_losses) / len(epoch_losses))
            log.info("epoch %d: train_loss %.5f", self.current_epoch + 1, self.train_losses[-1])

    def backward_and_step(self, loss):
        if not math.isfinite(loss.item()):
            raise TrainingError(
                f"the loss became {loss.item()} at epoch {self.current_epoch + 1}, step {self.global_step + 1}; "
                f"training stopped; {self.describe_saved_weights()}; try a lower learning rate or precision fp32"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.gradient_clip_val)
        self.optimizer.step()
        self.check_updated_weights()

    def check_updated_weights(self):
        # an exploding gradient can give inf weights before the loss turns NaN: one norm per updated tensor,
        # and the exact test only when a norm is not finite (a norm of huge finite values can overflow)
        parameters = [parameter for group in self.optimizer.param_groups for parameter in group["params"]]
        norm = getattr(torch, "_foreach_norm", lambda tensors: [torch.linalg.vector_norm(t) for t in tensors])
        if not parameters or bool(torch.stack(norm(parameters)).isfinite().all()):
            return
        names = find_non_finite(self.model.named_parameters())
        if names:
            raise TrainingError(
                f"the weights became inf or NaN ({names[0]}) after the optimizer step at epoch "
                f"{self.current_epoch + 1}, step {self.global_step + 1}; training stopped; "
                f"{self.describe_saved_weights()}; try a lower learning rate, trainer.gradient_clip_val or "
                f"precision fp32"
            )

    def describe_saved_weights(self):
        # what this run has kept, for a message that stops training
        if not self.saved_weights:
            return "no weights were saved"
        return "; ".join(f"{self.weights_dir / name} holds the finite weights of epoch {self.saved_weights[name]}"
                         for name in ("last.safetensors", "best.safetensors") if name in self.saved_weights)

    def run_validation(self, val_loader):
        predictions = self.predict(val_loader, hooks=True)
        self.validation_metrics = compute_metrics(
            predictions["pred_score"], predictions["label"],
            predictions["anomaly_map"][:, 0], predictions["mask"][:, 0] if predictions["has_masks"] else None,
        )
        if self.train_losses:
            self.validation_metrics["train_loss"] = self.train_losses[-1]
        if self.early_stopping is not None:
            value = self.validation_metrics.get(self.early_stopping.monitor)
            if value is None:
                valid = ", ".join(sorted(self.validation_metrics))
                raise ConfigError(f"early stopping monitors '{self.early_stopping.monitor}', which is not computed; choose one of: {valid}")
            if self.early_stopping.update(value):
                self.save_weights("best.safetensors")
            self.should_stop = self.should_stop or self.early_stopping.should_stop

    @torch.no_grad()
    def predict(self, loader, hooks=False, pixel_sink=None, stored_size=None, observe=None):
        # pixel_sink: takes each batch's maps as they come (StreamedPixels); stored_size: the maps and masks kept
        # for the run are max-pooled to it (a small defect stays visible), so a tiled run's memory stays bounded
        self.model.to(self.device)
        self.model.eval()
        if hooks:
            self.on_validation_epoch_start()
        scores, maps, labels, masks, paths = [], [], [], [], []
        for batch_idx, batch in enumerate(self.create_progress_bar(loader, "predict")):
            batch = self.move_batch(batch)
            if hooks:
                self.on_validation_batch_start(batch, batch_idx)
            with autocast(self.device, self.precision):
                outputs = self.evaluation_step(batch, batch_idx)
            if hooks:
                self.on_validation_batch_end(outputs, batch, batch_idx)
            if pixel_sink is not None:
                pixel_sink.add(outputs["anomaly_map"], batch)
            if observe is not None:
                # observe(batch, outputs): e.g. ReconstructionMeter, which reads the model's extras
                observe(batch, outputs)
            scores.append(outputs["pred_score"].float().cpu().reshape(-1))
            maps.append(shrink(outputs["anomaly_map"].float(), stored_size).cpu())
            labels.append(batch["label"].cpu())
            masks.append(shrink(batch["mask"], stored_size).cpu())
            paths.extend(batch["image_path"])
        if hooks:
            self.on_validation_epoch_end()
        return {
            "pred_score": torch.cat(scores),
            "anomaly_map": torch.cat(maps),
            "label": torch.cat(labels),
            "mask": torch.cat(masks),
            "image_path": paths,
            "has_masks": getattr(loader.dataset, "has_masks", True),
        }

    def save_checkpoints(self):
        self.save_weights("last.safetensors")

    def save_weights(self, name):
        # only a finite state is written, so a file this run wrote always holds usable weights
        if self.weights_dir is None:
            return
        names = find_non_finite(self.model.state_dict().items())
        if names:
            more = f" and {len(names) - 1} more tensors" if len(names) > 1 else ""
            raise TrainingError(
                f"the model's state after epoch {self.current_epoch + 1} holds inf or NaN ({names[0]}{more}), so it "
                f"was not saved to {self.weights_dir / name}; {self.describe_saved_weights()}; try a lower learning "
                f"rate or precision fp32"
            )
        save_weights(self.model, self.weights_dir / name)
        self.saved_weights[name] = self.current_epoch + 1

    def move_batch(self, batch):
        return {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in batch.items()}

    def create_progress_bar(self, loader, description):
        disable = not sys.stderr.isatty() if self.progress_bar is None else not self.progress_bar
        return tqdm(loader, desc=description, leave=False, disable=disable, dynamic_ncols=True)


def check_learning_rates(optimizer):
    # a rate the weights' float type cannot hold would stop the first step with torch's overflow error
    largest = torch.finfo(torch.float32).max
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 <= lr <= largest):
            raise ConfigError(f"the learning rate {lr} is not allowed: it must be a finite number from 0 to "
                              f"{largest:.3g} (set model.lr, or the model's learning-rate key, to a usual value "
                              f"such as 0.001)")


def shrink(maps, size):
    if size is None or tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return torch.nn.functional.adaptive_max_pool2d(maps, tuple(size))


def find_non_finite(named_tensors):
    # names of the floating-point tensors that hold an inf or a NaN; the smallest and largest value carry both
    # (a NaN propagates into them), so no mask the size of a tensor is made
    return [name for name, value in named_tensors
            if torch.is_tensor(value) and value.is_floating_point() and value.numel()
            and not bool(torch.isfinite(torch.stack(torch.aminmax(value.detach()))).all())]
