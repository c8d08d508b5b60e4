# src/defectvad/engine/positions.py
# per-position models (tiling.per_position, anomalib's tiled ensemble): one model for each tile position, trained
# on that position's tile of every training image; in evaluation each tile goes to its position's model and the
# maps are stitched back as in any tiled run. The models are one state dict (positions.<k>.<name>), so a run is
# saved, reloaded and fine-tuned as one model
import shutil

import torch
from torch import nn

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.engine.tiling import tile_batch
from defectvad.errors import ConfigError


def take_position(batch, position, count):
    # the tile at `position` of each image of an already tiled batch (tiles of an image are together)
    return {key: value[position::count] if torch.is_tensor(value) or isinstance(value, list) else value
            for key, value in batch.items()}


class PositionDataset:
    # what a trainer may read of its training set (its length, one item): one tile of every image
    def __init__(self, dataset, tiler, count, position):
        self.dataset = dataset
        self.tiler = tiler
        self.count = count
        self.position = position
        self.has_masks = getattr(dataset, "has_masks", True)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        batch = {key: value.unsqueeze(0) if torch.is_tensor(value) else [value] for key, value in item.items()}
        tiles = tile_batch(batch, self.tiler, self.count)
        return {key: value[self.position] for key, value in tiles.items()}


class PositionLoader:
    # the batches of an image loader, each image replaced by its tile at one position
    def __init__(self, loader, tiler, position):
        self.loader = loader
        self.tiler = tiler
        self.position = position
        self.count = tiler.count(tuple(loader.dataset[0]["image"].shape[-2:]))
        self.dataset = PositionDataset(loader.dataset, tiler, self.count, position)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield take_position(tile_batch(batch, self.tiler, self.count), self.position, self.count)


class PositionTrainer(BaseTrainer):
    exportable = False
    per_position = True

    def __init__(self, trainers):
        super().__init__()
        first = trainers[0]
        if not first.tileable:
            raise ConfigError(f"{type(first).__name__} scores the test images as a whole and cannot be tiled; set "
                              f"tiling.tile_size=null")
        self.trainers = trainers
        self.model = nn.ModuleDict({"positions": nn.ModuleList([trainer.model for trainer in trainers])})
        self.learning_type = first.learning_type
        self.default_k_shot = first.default_k_shot
        self.normalize_input = first.normalize_input
        self.trainer_arguments = first.trainer_arguments

    @property
    def efficiency_model(self):
        # one position's model: every tile goes through one of them
        return self.trainers[0].model

    def configure_engine(self, weights_dir=None, **engine):
        super().configure_engine(weights_dir=weights_dir, **engine)
        for position, trainer in enumerate(self.trainers):
            # with early stopping each keeps its best weights apart until fit puts them together
            inner = None if self.early_stopping is None or weights_dir is None else \
                self.weights_dir / "positions" / str(position)
            trainer.configure_engine(weights_dir=inner, **engine)
        return self

    def check_positions(self, loader):
        count = self.tiler.count(tuple(loader.dataset[0]["image"].shape[-2:]))
        if count != len(self.trainers):
            raise ConfigError(f"the images give {count} tile positions, but {len(self.trainers)} models were built")

    def fit(self, train_loader=None, val_loader=None):
        for loader in (train_loader, val_loader):
            if loader is not None:
                self.check_positions(loader)
        best = False
        for position, trainer in enumerate(self.trainers):
            trainer.holdout_loader = None if self.holdout_loader is None else \
                PositionLoader(self.holdout_loader, self.tiler, position)
            trainer.fit(None if train_loader is None else PositionLoader(train_loader, self.tiler, position),
                        None if val_loader is None else PositionLoader(val_loader, self.tiler, position))
            best = trainer.load_best_weights() is not None or best
        self.current_epoch = max(trainer.current_epoch for trainer in self.trainers)
        self.global_step = sum(trainer.global_step for trainer in self.trainers)
        self.train_losses = mean_losses([trainer.train_losses for trainer in self.trainers])
        self.save_checkpoints()
        if self.early_stopping is not None:
            # each position stopped on its own tiles' validation metric
            self.early_stopping.best = [trainer.early_stopping.best for trainer in self.trainers]
        if best:
            self.save_weights("best.safetensors")
        if self.weights_dir is not None:
            shutil.rmtree(self.weights_dir / "positions", ignore_errors=True)
        return self

    def prepare(self, loader):
        for trainer in self.trainers:
            trainer.prepare(loader)

    def summary(self):
        return {"tile_positions": len(self.trainers), "position_0": self.trainers[0].summary()}

    def evaluation_step(self, batch, batch_idx):
        return self.predict_positions(batch, lambda position, tiles: self.trainers[position].validation_step(
            tiles, batch_idx))

    def predict_positions(self, batch, step):
        # step(position, tiles): that position's outputs on its tiles (one per image); the maps stitched back
        size = tuple(batch["image"].shape[-2:])
        count = len(self.trainers)
        tiles = tile_batch(batch, self.tiler, count)
        scores, maps = [], []
        for position in range(count):
            outputs = step(position, take_position(tiles, position, count))
            scores.append(outputs["pred_score"].reshape(-1))
            maps.append(outputs["anomaly_map"])
        # (positions, images, ...) -> images first, their tiles together, as the tiler orders them
        maps = torch.stack(maps, dim=1).flatten(0, 1)
        anomaly_map = self.tiler.untile(maps, size)
        if self.tile_image_score == "tile":
            pred_score = torch.stack(scores, dim=1).amax(dim=1)
        else:
            pred_score = anomaly_map.flatten(1).amax(dim=1)
        return {"pred_score": pred_score, "anomaly_map": anomaly_map}


def mean_losses(histories):
    # the mean training loss of each epoch over the positions that trained that long
    epochs = max((len(history) for history in histories), default=0)
    return [sum(h[e] for h in histories if len(h) > e) / sum(len(h) > e for h in histories) for e in range(epochs)]


def build_trainer_for_tiling(build_one, settings, tiler, image_size):
    # build_one(): a fresh trainer of the run's model (built for the tile in a tiled run); with
    # tiling.per_position one for each tile position of an image at image_size, together as one trainer
    from defectvad.data.transforms import to_size_pair

    if settings is None or not settings.get("per_position"):
        return build_one()
    if tiler is None:
        raise ConfigError("tiling.per_position=true trains one model per tile position: set tiling.tile_size too")
    return PositionTrainer([build_one() for _ in range(tiler.count(to_size_pair(image_size, "transform.image_size")))])
