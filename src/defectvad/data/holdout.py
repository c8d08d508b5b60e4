# src/defectvad/data/holdout.py
import copy
import random

from defectvad.errors import ConfigError


def split_holdout(dataset, count, seed):
    # (training set, held-out set or None): `count` normal training images, picked by the seed, are kept
    # out of training so that a threshold can be set on normal images the model never saw
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"evaluation.holdout must be a whole number of images (0: none), got {count!r}")
    if count == 0:
        return dataset, None
    total = len(dataset.samples)
    if count >= total:
        raise ConfigError(f"evaluation.holdout={count} but the training split has only {total} images; "
                          f"hold out at most {total - 1}")
    picks = set(random.Random(seed).sample(range(total), count))
    train, held_out = copy.copy(dataset), copy.copy(dataset)
    train.samples = [s for i, s in enumerate(dataset.samples) if i not in picks]
    held_out.samples = [s for i, s in enumerate(dataset.samples) if i in picks]
    return train, held_out
