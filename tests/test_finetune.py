# tests/test_finetune.py
import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from defectvad.engine.checkpoints import save_weights
from defectvad.engine.finetuning import check_extendable, load_parent_weights, scale_learning_rates, start_from_parent
from defectvad.errors import ConfigError
from defectvad.experiment import run_experiment
from defectvad.models.padim.trainer import PadimTrainer
from defectvad.models.stfpm.trainer import StfpmTrainer
from fakes import write_square_panels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_sets")
    # 12 normal noise images of one grey; 3 with a square of one colour, with masks
    red, blue = (250, 30, 30), (30, 30, 250)
    return (write_square_panels(root / "a", 12, [(2, red), (12, red), (20, red)], grey=120, seed=120),
            write_square_panels(root / "b", 12, [(2, blue), (12, blue), (20, blue)], grey=80, seed=80))


@functools.lru_cache
def compose_small(model):
    # composed once per model; each run merges its own settings into a copy
    small = ["hardware=cpu", "hardware.threads=1", "transform.image_size=[32,32]", "trainer.progress_bar=false",
             "backbone=resnet18", "backbone.pretrained=false", "evaluation.save_images=false",
             "evaluation.efficiency=false", "evaluation.save_scores=false", "++grading.enabled=false",
             "dataset=folder", "dataset.abnormal_dir=bad", "dataset.mask_dir=masks", "dataset.normal_test_ratio=0.25",
             "loader.train_batch_size=4", f"model={model}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=small)


def run(data, run_dir, model, *overrides):
    cfg = OmegaConf.merge(compose_small(model), OmegaConf.from_dotlist([f"dataset.root={data}", *overrides]))
    return run_experiment(cfg, run_dir, {"model": model, "dataset": "folder"}, list(overrides), ROOT)


@pytest.fixture(scope="module")
def stfpm_parent(sets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stfpm_parent")
    run(sets[0], folder, "stfpm", "trainer.max_epochs=1")
    return folder


def capture_first_step(monkeypatch):
    # the model's state as the first batch arrives, before any optimizer step
    states = []
    start = StfpmTrainer.on_train_batch_start

    def capture(self, batch, batch_idx):
        if not states:
            states.append({name: value.detach().clone() for name, value in self.model.state_dict().items()})
        return start(self, batch, batch_idx)

    monkeypatch.setattr(StfpmTrainer, "on_train_batch_start", capture)
    return states


def test_finetuned_stfpm_starts_from_the_parent_and_keeps_frozen_parts(sets, stfpm_parent, tmp_path, monkeypatch):
    states = capture_first_step(monkeypatch)
    record = run(sets[1], tmp_path, "stfpm", "trainer.max_epochs=1", f"init_from='{stfpm_parent}'",
                 "finetune.freeze=[student_model.feature_extractor.layer1]", "finetune.lr_scale=0.5")
    parent = load_file(str(stfpm_parent / "weights" / "last.safetensors"))
    assert set(states[0]) == set(parent)
    for name, value in parent.items():
        assert torch.equal(states[0][name], value), name
    # the parent trained its student away from the seed's initial weights, which the child would start from
    # without init_from
    torch.manual_seed(0)
    conv, norm = "student_model.feature_extractor.layer2.0.conv1.weight", "student_model.feature_extractor.layer2.0.bn1"
    assert not torch.equal(StfpmTrainer().model.state_dict()[conv], parent[conv])
    child = load_file(str(tmp_path / "weights" / "last.safetensors"))
    frozen = [name for name in parent if name.startswith("student_model.feature_extractor.layer1.")]
    # parameters and BatchNorm statistics of the frozen block stay the parent's; the rest of the student trained
    assert frozen and all(torch.equal(child[name], parent[name]) for name in frozen)
    assert not torch.equal(child[conv], parent[conv])
    assert not torch.equal(child[norm + ".running_mean"], parent[norm + ".running_mean"])
    parent_record = json.loads((stfpm_parent / "metrics.json").read_text())
    assert record["run"]["parent"]["path"] == str(stfpm_parent.resolve())
    assert record["run"]["parent"]["model"] == "stfpm" and record["run"]["parent"]["dataset"] == "folder"
    assert record["run"]["parent"]["metrics"] == parent_record["metrics"]
    assert record["run"]["parent"]["git_commit"] == parent_record["run"]["git_commit"]
    assert record["finetune"]["frozen_parameters"] == sum(parent[name].numel() for name in frozen
                                                          if "running" not in name and "num_batches" not in name)
    assert json.loads((tmp_path / "metrics.json").read_text())["run"]["parent"]["weights"] == "weights/last.safetensors"


def test_lr_scale_multiplies_each_step_and_leaves_the_schedule_alone():
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([weight], lr=0.4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.1)
    scale_learning_rates(optimizer, 0.25)
    steps = []
    for _ in range(2):
        before = weight.detach().clone()
        optimizer.zero_grad()
        (weight * torch.tensor([3.0, -1.0])).sum().backward()
        optimizer.step()
        steps.append((weight.detach() - before).tolist())
        scheduler.step()
    # plain SGD: step = -lr * grad, with lr 0.4 then 0.04 (the milestone) times 0.25
    np.testing.assert_allclose(steps[0], [-0.3, 0.1], rtol=1e-6)
    np.testing.assert_allclose(steps[1], [-0.03, 0.01], rtol=1e-5)
    # the scheduler's own rate, unscaled
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.04)


def test_extend_appends_the_new_coreset_to_the_parent_bank(sets, tmp_path):
    ratio = "model.coreset_sampling_ratio=0.05"
    run(sets[0], tmp_path / "parent", "patchcore", ratio)
    refit = run(sets[1], tmp_path / "refit", "patchcore", ratio, f"init_from='{tmp_path / 'parent'}'")
    record = run(sets[1], tmp_path / "extend", "patchcore", ratio, f"init_from='{tmp_path / 'parent'}'",
                 "finetune.memory=extend")
    parent = load_file(str(tmp_path / "parent" / "weights" / "last.safetensors"))["memory_bank"]
    new = load_file(str(tmp_path / "refit" / "weights" / "last.safetensors"))["memory_bank"]
    bank = load_file(str(tmp_path / "extend" / "weights" / "last.safetensors"))["memory_bank"]
    # 9 training images of 4 x 4 patches (layer2 of a 32-pixel image) at ratio 0.05: 7 rows each
    assert len(parent) == len(new) == int(9 * 16 * 0.05)
    assert torch.equal(bank, torch.cat((parent, new)))
    assert record["finetune"]["memory_bank"] == {"parent": len(parent), "new": len(new), "total": len(bank)}
    assert refit["finetune"]["memory"] == "refit" and record["model"]["memory_bank_size"] == list(bank.shape)


def test_padim_refuses_to_extend_its_gaussians():
    with pytest.raises(ConfigError, match="PaDiM keeps each position's mean .* use finetune.memory=refit"):
        check_extendable(PadimTrainer(backbone="resnet18"))


def test_the_first_mismatching_tensor_is_named(tmp_path):
    class Small(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.head = nn.Linear(4, width)

    model = Small(2)
    parent = {"backbone": "resnet18", "image_size": [32, 32]}
    run = {"backbone": "resnet18", "image_size": [64, 64]}
    path = Path("/nonexistent/last.safetensors")
    with pytest.raises(ConfigError, match=r"cannot read"):
        load_parent_weights(model, path, parent, run)

    def check(stored, pattern):
        save_weights(stored, tmp_path / "w.safetensors")
        with pytest.raises(ConfigError, match=pattern):
            load_parent_weights(model, tmp_path / "w.safetensors", parent, run)

    check(Small(3), r"head\.weight has shape \[3, 4\] there and \[2, 4\] here \(the parent: backbone resnet18, "
                    r"image size \[32, 32\]; this run: backbone resnet18, image size \[64, 64\]\)")
    check(nn.Sequential(), r"they have no tensor stem\.weight")


def test_bad_parents_and_settings_are_refused_with_one_message(stfpm_parent, tmp_path):
    trainer = StfpmTrainer()
    run = {"model": "stfpm", "backbone": "resnet18", "image_size": [32, 32]}

    composed = {"stfpm": compose_small("stfpm"), "padim": compose_small("padim")}

    def refuse(pattern, init_from=stfpm_parent, model="stfpm", **finetune):
        cfg = copy.deepcopy(composed[model])
        cfg.init_from = str(init_from)
        cfg.finetune = {**cfg.finetune, **finetune}
        with pytest.raises(ConfigError, match=pattern):
            start_from_parent(cfg, trainer, {**run, "model": model})

    refuse(r"init_from=.*missing is not a finished run folder \(the folder does not exist\)", tmp_path / "missing")
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "run": {}}))
    refuse("metrics.json has status 'failed', not 'ok'; no config.yaml", failed)
    refuse(r"is a stfpm run \(defectvad.models.stfpm.trainer.StfpmTrainer\), but this run is padim "
           r"\(defectvad.models.padim.trainer.PadimTrainer\); fine-tune with model=stfpm", model="padim")
    refuse(r"'student_model.layer1' names no module of StfpmModel; its top-level modules are: teacher_model, "
           r"student_model, anomaly_map_generator; those of student_model are: feature_extractor",
           freeze=["student_model.layer1"])
    refuse("finetune.memory=extend applies to memory-bank models", memory="extend")
    refuse("finetune.lr_scale must be a number > 0", lr_scale=0)
    # freezing all that the optimizer trains stops the run as training starts
    cfg = copy.deepcopy(composed["stfpm"])
    cfg.init_from, cfg.finetune.freeze = str(stfpm_parent), ["student_model"]
    start_from_parent(cfg, trainer, dict(run))
    with pytest.raises(ConfigError, match="freezes every parameter StfpmTrainer's optimizer trains"):
        trainer.setup_optimizers()
