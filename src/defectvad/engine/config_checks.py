# src/defectvad/engine/config_checks.py
# the run's numbers, checked before any work: one message naming the key, the value and what is allowed.
# Values that a constructor reads and checks itself (coreset_sampling_ratio, topk_ratio, layer names,
# normal_test_ratio) stay checked there; this covers what the run and the loop read
from omegaconf import DictConfig, ListConfig, OmegaConf

from defectvad.errors import ConfigError

MISSING = object()


def is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer_from(minimum):
    return lambda value: is_integer(value) and value >= minimum


def or_null(test):
    return lambda value: value is None or test(value)


def in_unit_interval(value):
    return is_number(value) and 0 < value <= 1


def non_negative(value):
    return is_number(value) and value >= 0


def size(value):
    if is_integer(value):
        return value >= 1
    return isinstance(value, (list, tuple, ListConfig)) and len(value) == 2 and all(
        is_integer(side) and side >= 1 for side in value)


SIZE = "a pair [height,width] of integers >= 1 (or one integer >= 1 for a square)"
RULES = (
    # numpy's and Lightning's range of seeds
    ("seed", lambda value: integer_from(0)(value) and value < 2**32, "an integer from 0 to 4294967295"),
    ("trainer.max_epochs", or_null(integer_from(1)),
     "an integer >= 1, or null for the model's default (trainer.max_steps can end training earlier)"),
    ("trainer.max_steps", or_null(integer_from(1)), "an integer >= 1, or null for no limit on steps"),
    ("trainer.check_val_every_n_epoch", integer_from(1), "an integer >= 1"),
    ("trainer.gradient_clip_val", or_null(non_negative), "a number >= 0, or null for the model's default"),
    ("trainer.early_stopping.patience", integer_from(1), "an integer >= 1"),
    ("trainer.early_stopping.min_delta", non_negative, "a number >= 0"),
    ("trainer.early_stopping.mode", lambda value: value in ("min", "max"), "min or max"),
    ("loader.train_batch_size", integer_from(1), "an integer >= 1"),
    ("loader.eval_batch_size", integer_from(1), "an integer >= 1"),
    ("hardware.threads", or_null(integer_from(1)), "an integer >= 1, or null for torch's default"),
    ("hardware.num_workers", integer_from(0), "an integer >= 0 (0: images are read in the main process)"),
    ("transform.image_size", size, SIZE),
    ("transform.center_crop", or_null(size), f"{SIZE}, or null for no crop"),
    ("dataset.k_shot", or_null(integer_from(0)), "an integer >= 0 (0: zero-shot), or null"),
    ("evaluation.holdout", integer_from(0), "an integer >= 0"),
    ("evaluation.normal_quantile", in_unit_interval, "a number in (0, 1]"),
    ("evaluation.aupro_fpr_limit", in_unit_interval, "a number in (0, 1]"),
    ("evaluation.images_per_type", integer_from(0), "an integer >= 0"),
    ("evaluation.efficiency_warmup", integer_from(0), "an integer >= 0"),
    ("evaluation.latency_repeats", integer_from(1), "an integer >= 1"),
    ("evaluation.efficiency_batch_size", integer_from(1), "an integer >= 1"),
    ("evaluation.throughput_repeats", integer_from(1), "an integer >= 1"),
    ("evaluation.full_resolution", lambda value: isinstance(value, bool), "true or false"),
    ("tiling.tile_size", or_null(size), SIZE + ", or null for no tiling"),
    ("tiling.stride", or_null(size), SIZE + ", or null for the tile size"),
    ("tiling.batch_size", or_null(integer_from(1)), "an integer >= 1, or null for loader.eval_batch_size"),
    ("tiling.per_position", lambda value: isinstance(value, bool), "true or false"),
)


def show(value):
    # as it would be typed on the command line
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(show(item) for item in value) + "]"
    if isinstance(value, DictConfig):
        return str(OmegaConf.to_container(value))
    return str(value)


def check_config(cfg):
    unset = sorted(OmegaConf.missing_keys(cfg))
    if unset:
        raise ConfigError(f"{', '.join(unset)} must be given (the config leaves {'them' if len(unset) > 1 else 'it'} "
                          f"as ???), e.g. {unset[0]}=...")
    for key, allowed, description in RULES:
        value = OmegaConf.select(cfg, key, default=MISSING)
        if value is not MISSING and not allowed(value):
            raise ConfigError(f"{key}={show(value)} is not allowed: {key} must be {description}")
    return cfg
