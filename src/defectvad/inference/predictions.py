# src/defectvad/inference/predictions.py
import glob
from pathlib import Path

import torch
from torchvision.transforms import functional as F

from defectvad.data.images import IMAGE_EXTENSIONS, is_image_file, read_image
from defectvad.engine.devices import autocast
from defectvad.engine.tiling import predict_tiles
from defectvad.errors import ConfigError, DatasetError


def find_images(source):
    # an image file, a folder (searched recursively) or a glob pattern
    path = Path(source)
    if path.is_dir():
        found = [p for p in path.rglob("*") if is_image_file(p)]
    elif path.is_file():
        found = [path]
    else:
        found = [Path(p) for p in glob.glob(str(source), recursive=True)]
        found = [p for p in found if is_image_file(p)]
    if not found:
        raise ConfigError(f"no images found at {source}; give an image, a folder or a glob pattern of "
                          f"{', '.join(IMAGE_EXTENSIONS)} files")
    return sorted(found)


def load_input(path, transform, normalize, max_pixels=None):
    # (picture in [0, 1] as the model sees it, model input); corrupt files raise DatasetError
    picture, _ = transform(read_image(path, max_pixels))
    return picture, F.normalize(picture, transform.mean, transform.std) if normalize else picture


@torch.no_grad()
def predict_batch(model, inputs, device, precision):
    with autocast(device, precision):
        outputs = model(inputs.to(device))
    return outputs["pred_score"].float().cpu().reshape(-1), outputs["anomaly_map"].float().cpu()


def predict_run_batch(run, inputs):
    # a tiled run cuts each image into tiles, as in its evaluation, and stitches the maps back
    if run.tiler is None:
        return predict_batch(run.model, inputs, run.device, run.precision)
    if getattr(run.trainer, "per_position", False):
        # each position's tiles through its own model
        positions = run.trainer.trainers
        outputs = run.trainer.predict_positions({"image": inputs}, lambda position, tiles: dict(zip(
            ("pred_score", "anomaly_map"), predict_batch(positions[position].model, tiles["image"], run.device,
                                                         run.precision))))
        return outputs["pred_score"], outputs["anomaly_map"]
    settings = run.cfg.tiling
    batch_size = settings.batch_size or run.cfg.loader.eval_batch_size
    step = lambda tiles, _: dict(zip(("pred_score", "anomaly_map"),  # noqa: E731
                                     predict_batch(run.model, tiles["image"], run.device, run.precision)))
    outputs = [predict_tiles(step, {"image": image.unsqueeze(0)}, 0, run.tiler, batch_size, settings.image_score)
               for image in inputs]
    return (torch.cat([output["pred_score"] for output in outputs]),
            torch.cat([output["anomaly_map"] for output in outputs]))


def predict_files(run, paths, batch_size, skipped):
    # yields (path, picture, score, anomaly map (H, W)) batch by batch; unreadable files go to `skipped`
    # as (path, reason) and the rest carry on. A model that scores a set of images together (MuSc) gets them all
    # as one batch
    pending = []
    if getattr(run.model, "batch_level", False):
        batch_size = len(paths)

    def flush():
        scores, maps = predict_run_batch(run, torch.stack([x for _, _, x in pending]))
        for (path, picture, _), score, anomaly_map in zip(pending, scores.tolist(), maps[:, 0]):
            yield path, picture, score, anomaly_map
        pending.clear()

    for path in paths:
        try:
            picture, model_input = load_input(path, run.transform, run.normalize, run.max_image_pixels)
        except DatasetError as error:
            skipped.append((path, str(error)))
            continue
        pending.append((path, picture, model_input))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()
