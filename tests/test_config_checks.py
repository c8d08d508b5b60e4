# tests/test_config_checks.py
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from defectvad.engine.config_checks import check_config
from defectvad.errors import ConfigError
from defectvad.sweeps.callbacks import prepare_sweeps

ROOT = Path(__file__).resolve().parents[1]
# key, the value as Hydra parses it, as it is typed, what is allowed
BAD_VALUES = [
    ("seed", "abc", "abc", "an integer from 0 to 4294967295"),
    ("seed", 1.5, "1.5", "an integer from 0 to 4294967295"),
    ("seed", -1, "-1", "an integer from 0 to 4294967295"),
    ("seed", True, "true", "an integer from 0 to 4294967295"),
    ("seed", 2**32, "4294967296", "an integer from 0 to 4294967295"),
    ("trainer.max_epochs", 0, "0", "an integer >= 1, or null for the model's default"),
    ("trainer.max_epochs", -1, "-1", "an integer >= 1, or null for the model's default"),
    ("trainer.max_steps", 0, "0", "an integer >= 1, or null for no limit on steps"),
    ("loader.train_batch_size", 0, "0", "an integer >= 1"),
    ("loader.eval_batch_size", 2.5, "2.5", "an integer >= 1"),
    ("hardware.threads", -3, "-3", "an integer >= 1, or null for torch's default"),
    ("hardware.num_workers", -1, "-1", "an integer >= 0"),
    ("transform.image_size", [0, 32], "[0,32]", "a pair [height,width] of integers >= 1"),
    ("transform.image_size", [32, 32, 32], "[32,32,32]", "a pair [height,width] of integers >= 1"),
    ("transform.center_crop", "abc", "abc", "a pair [height,width] of integers >= 1"),
    ("evaluation.normal_quantile", 1.5, "1.5", "a number in (0, 1]"),
    ("trainer.early_stopping.mode", "maximum", "maximum", "min or max"),
    ("tiling.per_position", "yes", "yes", "true or false"),
]


@pytest.fixture(scope="module")
def compose_config():
    prepare_sweeps()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))


def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(compose_config):
    cfg = compose_config()
    for key, value, typed, allowed in BAD_VALUES:
        bad = cfg.copy()
        OmegaConf.update(bad, key, value)
        with pytest.raises(ConfigError) as caught:
            check_config(bad)
        assert str(caught.value).startswith(f"{key}={typed} is not allowed: {key} must be {allowed}")
    # as the command line gives them
    with pytest.raises(ConfigError, match=r"^seed=abc is not allowed: seed must be an integer from 0 to 4294967295$"):
        check_config(compose_config("seed=abc"))
    # a value the config leaves to the user (???) is named before any work
    with pytest.raises(ConfigError, match=r"^model.members must be given .*e.g. model.members=\.\.\.$"):
        check_config(compose_config("model=ensemble"))


def test_every_preset_and_good_values_pass(compose_config):
    # presets that set epochs, steps, sizes and batch sizes of their own
    for preset in ("efficient_ad", "patchcore", "stfpm", "reverse_distillation"):
        assert check_config(compose_config(f"experiment={preset}")) is not None
    assert check_config(compose_config("trainer.max_steps=5", "transform.image_size=64", "seed=7",
                                       "transform.center_crop=[32,32]", "hardware.threads=1")) is not None
