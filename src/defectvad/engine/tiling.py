# src/defectvad/engine/tiling.py
# tiled runs: the model is built for, trained on and evaluated on tiles of each image (at transform.image_size);
# its maps are stitched back, one image at a time in evaluation
import math

import torch

from defectvad.components.tiler import MODES, Tiler
from defectvad.data.transforms import to_size_pair
from defectvad.errors import ConfigError

IMAGE_SCORES = ("tile", "map")


def create_tiler(settings, image_size):
    # settings: the config's tiling group; None when tiling is off
    if settings is None or settings.get("tile_size") is None:
        return None
    tile_size = to_size_pair(settings.tile_size, "tiling.tile_size")
    stride = tile_size if settings.get("stride") is None else to_size_pair(settings.stride, "tiling.stride")
    if settings.mode not in MODES:
        raise ConfigError(f"tiling.mode must be one of: {', '.join(MODES)}; got {settings.mode!r}")
    if settings.image_score not in IMAGE_SCORES:
        raise ConfigError(f"tiling.image_score must be one of: {', '.join(IMAGE_SCORES)}; got {settings.image_score!r}")
    if stride[0] > tile_size[0] or stride[1] > tile_size[1]:
        raise ConfigError(f"tiling.stride {list(stride)} is larger than tiling.tile_size {list(tile_size)}: pixels "
                          f"between tiles would never be seen; make it at most the tile size")
    size = to_size_pair(image_size, "transform.image_size")
    if size[0] < tile_size[0] or size[1] < tile_size[1]:
        raise ConfigError(f"tiling.tile_size {list(tile_size)} is larger than transform.image_size {list(size)}; "
                          f"tiles are cut from the image at transform.image_size")
    return Tiler(tile_size, stride, settings.mode)


def tiled_model_settings(cfg, tiler):
    # a model built for a fixed input size (model.input_size) is built for the tile; the same rule when a trained
    # run is rebuilt
    return {"input_size": list(tiler.tile_size)} if tiler is not None and "input_size" in cfg.model else {}


def tile_batch(batch, tiler, count):
    # every image-sized tensor is cut into tiles; per-image values and names repeat once per tile
    tiled = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() == 4:
            tiled[key] = tiler.tile(value)
        elif torch.is_tensor(value):
            tiled[key] = value.repeat_interleave(count, dim=0)
        elif isinstance(value, (list, tuple)):
            tiled[key] = [item for item in value for _ in range(count)]
        else:
            tiled[key] = value
    return tiled


def take(batch, start, stop):
    return {key: value[start:stop] if torch.is_tensor(value) or isinstance(value, list) else value
            for key, value in batch.items()}


class TiledDataset:
    # what a trainer may read of its training set (its length, one item): the tiles of every image
    def __init__(self, dataset, tiler, count):
        self.dataset = dataset
        self.tiler = tiler
        self.count = count

    def __len__(self):
        return len(self.dataset) * self.count

    def __getitem__(self, index):
        item = self.dataset[index // self.count]
        batch = {key: value.unsqueeze(0) if torch.is_tensor(value) else [value] for key, value in item.items()}
        tiles = tile_batch(batch, self.tiler, self.count)
        return {key: value[index % self.count] for key, value in tiles.items()}


class TiledLoader:
    # training batches of tiles: the image loader gives just enough images for one batch of tiles, whose tiles are
    # shuffled together (seeded) and handed out batch_size at a time, so memory holds a few images' tiles
    def __init__(self, loader, tiler, batch_size, seed=0):
        self.loader = loader
        self.tiler = tiler
        self.batch_size = batch_size
        self.count = tiler.count(tuple(loader.dataset[0]["image"].shape[-2:]))
        self.dataset = TiledDataset(loader.dataset, tiler, self.count)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        images, per_batch = len(self.loader.dataset), self.loader.batch_size
        full, rest = divmod(images, per_batch)
        batches = math.ceil(per_batch * self.count / self.batch_size)
        return full * batches + math.ceil(rest * self.count / self.batch_size)

    def __iter__(self):
        for batch in self.loader:
            tiles = tile_batch(batch, self.tiler, self.count)
            total = len(tiles["image"])
            order = torch.randperm(total, generator=self.generator)
            tiles = {key: value[order] if torch.is_tensor(value) else
                     [value[i] for i in order.tolist()] if isinstance(value, list) else value
                     for key, value in tiles.items()}
            for start in range(0, total, self.batch_size):
                yield take(tiles, start, start + self.batch_size)


def images_per_tile_batch(tiler, image_size, batch_size):
    # images the training loader must give for one batch of tiles
    return max(1, math.ceil(batch_size / tiler.count(to_size_pair(image_size, "transform.image_size"))))


def predict_tiles(step, batch, batch_idx, tiler, batch_size, image_score):
    # step: the trainer's validation_step on a batch of tiles; the maps of the batch's images are stitched back and
    # each image's score is the largest of its tiles' scores (image_score=tile) or of its stitched map (map); a
    # reconstruction model's tiles of its output are stitched the same way, for the reconstruction block
    size = tuple(batch["image"].shape[-2:])
    count = tiler.count(size)
    tiles = tile_batch(batch, tiler, count)
    scores, maps, reconstructions = [], [], []
    for start in range(0, len(tiles["image"]), batch_size):
        outputs = step(take(tiles, start, start + batch_size), batch_idx)
        scores.append(outputs["pred_score"].reshape(-1))
        maps.append(outputs["anomaly_map"])
        reconstruction = outputs.get("reconstruction")
        if reconstruction is not None and reconstruction.shape[-2:] == tiles["image"].shape[-2:]:
            reconstructions.append(reconstruction)
    anomaly_map = tiler.untile(torch.cat(maps), size)
    if image_score == "tile":
        pred_score = torch.cat(scores).reshape(-1, count).amax(dim=1)
    else:
        pred_score = anomaly_map.flatten(1).amax(dim=1)
    stitched = {"pred_score": pred_score, "anomaly_map": anomaly_map}
    if len(reconstructions) == len(maps):
        stitched["reconstruction"] = tiler.untile(torch.cat(reconstructions), size)
    return stitched
