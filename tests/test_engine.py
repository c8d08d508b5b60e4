# tests/test_engine.py
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.engine.checkpoints import load_weights, save_weights
from defectvad.engine.early_stopping import EarlyStopping
from defectvad.errors import ConfigError, TrainingError


class BlobDataset(Dataset):
    # normal images are flat noise; anomalous ones carry a bright square, marked in the mask
    def __init__(self, count, anomalous_every=0):
        generator = torch.Generator().manual_seed(0)
        self.items = []
        for index in range(count):
            image = torch.rand(3, 16, 16, generator=generator) * 0.1
            mask = torch.zeros(1, 16, 16)
            label = int(anomalous_every > 0 and index % anomalous_every == 0)
            if label:
                image[:, 4:9, 4:9] += 1.0
                mask[:, 4:9, 4:9] = 1.0
            self.items.append({"image": image, "label": label, "mask": mask, "image_path": f"img{index}.png"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class TinyAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))

    def forward(self, images):
        error = ((self.net(images) - images) ** 2).mean(1, keepdim=True)
        if self.training:
            return {"loss": error.mean()}
        return {"pred_score": error.amax(dim=(-2, -1)).reshape(-1), "anomaly_map": error}


class RecordingTrainer(BaseTrainer):
    trainer_arguments = {"max_epochs": 2}

    def __init__(self, lr=0.05):
        super().__init__()
        self.model = TinyAutoencoder()
        self.lr = lr
        self.calls = []
        for hook in ("on_fit_start", "on_train_start", "on_train_epoch_start", "on_train_epoch_end",
                     "on_validation_epoch_start", "on_validation_epoch_end", "on_train_end", "on_fit_end"):
            setattr(self, hook, self.recorder(hook))

    def recorder(self, name):
        return lambda *args: self.calls.append(name)

    def on_train_batch_start(self, batch, batch_idx):
        self.calls.append("on_train_batch_start")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.calls.append("on_train_batch_end")

    def on_validation_batch_start(self, batch, batch_idx):
        self.calls.append("on_validation_batch_start")

    def on_validation_batch_end(self, outputs, batch, batch_idx):
        self.calls.append("on_validation_batch_end")

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def training_step(self, batch, batch_idx):
        return self.model(batch["image"])


def test_hooks_fire_in_documented_order():
    trainer = RecordingTrainer().configure_engine(max_epochs=1, early_stopping={"monitor": "image_auroc"})
    train = DataLoader(BlobDataset(4), batch_size=2)
    val = DataLoader(BlobDataset(4, anomalous_every=2), batch_size=4)
    trainer.fit(train, val)
    assert trainer.calls == [
        "on_fit_start", "on_train_start", "on_train_epoch_start",
        "on_train_batch_start", "on_train_batch_end", "on_train_batch_start", "on_train_batch_end",
        "on_train_epoch_end", "on_validation_epoch_start", "on_validation_batch_start", "on_validation_batch_end",
        "on_validation_epoch_end", "on_train_end", "on_fit_end",
    ]


def test_fit_lowers_loss_and_max_steps_stops_early():
    trainer = RecordingTrainer().configure_engine(max_epochs=20)
    trainer.fit(DataLoader(BlobDataset(8), batch_size=4))
    assert trainer.current_epoch == 20
    assert trainer.train_losses[-1] < 0.5 * trainer.train_losses[0]
    limited = RecordingTrainer().configure_engine(max_epochs=20, max_steps=5)
    limited.fit(DataLoader(BlobDataset(8), batch_size=4))
    assert limited.global_step == 5
    assert limited.current_epoch == 3


def test_model_default_epochs_apply_unless_overridden():
    assert RecordingTrainer().configure_engine().max_epochs == 2
    assert RecordingTrainer().configure_engine(max_epochs=7).max_epochs == 7


def test_early_stopping_and_best_checkpoint(tmp_path):
    trainer = RecordingTrainer(lr=0.0).configure_engine(
        max_epochs=10, weights_dir=tmp_path, early_stopping={"monitor": "image_auroc", "patience": 2})
    trainer.fit(DataLoader(BlobDataset(4), batch_size=4), DataLoader(BlobDataset(6, anomalous_every=2), batch_size=6))
    # with a learning rate of 0 the metric never improves after the first epoch
    assert trainer.current_epoch == 3
    assert (tmp_path / "best.safetensors").is_file()
    assert (tmp_path / "last.safetensors").is_file()
    assert trainer.validation_metrics["image_auroc"] == 1.0


def test_early_stopping_counts_bad_epochs():
    stopper = EarlyStopping("train_loss", patience=2, mode="min")
    assert stopper.update(1.0)
    assert not stopper.update(1.5)
    assert not stopper.should_stop
    assert stopper.update(0.5)
    assert not stopper.update(0.5)
    assert not stopper.update(float("nan"))
    assert stopper.should_stop
    assert stopper.best == 0.5


def test_nan_loss_stops_and_keeps_last_good_weights(tmp_path):
    trainer = RecordingTrainer().configure_engine(max_epochs=3, weights_dir=tmp_path)
    original = trainer.training_step

    def explode_in_second_epoch(batch, batch_idx):
        outputs = original(batch, batch_idx)
        return {"loss": outputs["loss"] * float("nan")} if trainer.current_epoch == 1 else outputs

    trainer.training_step = explode_in_second_epoch
    with pytest.raises(TrainingError, match="loss became nan at epoch 2"):
        trainer.fit(DataLoader(BlobDataset(4), batch_size=4))
    restored = load_weights(TinyAutoencoder(), tmp_path / "last.safetensors")
    for name, tensor in restored.state_dict().items():
        assert torch.isfinite(tensor).all(), name


def test_checkpoint_round_trip_gives_same_predictions(tmp_path):
    trainer = RecordingTrainer().configure_engine(max_epochs=1)
    trainer.fit(DataLoader(BlobDataset(4), batch_size=4))
    save_weights(trainer.model, tmp_path / "w.safetensors")
    loaded = load_weights(TinyAutoencoder(), tmp_path / "w.safetensors").eval()
    images = torch.stack([item["image"] for item in BlobDataset(3, anomalous_every=2).items])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(images)["anomaly_map"], loaded(images)["anomaly_map"])
    assert not list(tmp_path.glob(".*tmp*"))


def test_saved_weights_read_back_exactly_with_the_safetensors_reader(tmp_path):
    from safetensors.torch import load_file

    from defectvad.engine.checkpoints import save_weights

    module = torch.nn.Module()
    tensors = {"f32": torch.randn(3, 4), "f64": torch.randn(5, dtype=torch.float64), "i64": torch.arange(7),
               "bf16": torch.randn(2, 3).to(torch.bfloat16), "empty": torch.empty(0), "scalar": torch.tensor(3.0),
               "flags": torch.tensor([True, False]), "strided": torch.randn(4, 6).t()}
    for name, value in tensors.items():
        module.register_buffer(name, value)
    module.register_buffer("shared", module.f32)
    loaded = load_file(str(save_weights(module, tmp_path / "w.safetensors")))
    assert sorted(loaded) == sorted(module.state_dict())
    for name, value in module.state_dict().items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value)


def test_non_finite_tensors_are_found_without_missing_one():
    from defectvad.engine.base_trainer import find_non_finite

    named = [("ok", torch.tensor([1.0, 1e30])), ("nan", torch.tensor([0.0, float("nan")])),
             ("inf", torch.tensor([-float("inf"), 0.0])), ("ints", torch.arange(3)), ("empty", torch.empty(0))]
    assert find_non_finite(named) == ["nan", "inf"]


@pytest.mark.parametrize("lr", [1e300, float("nan"), -1.0])
def test_a_learning_rate_the_weights_cannot_take_stops_before_the_first_step(lr):
    # torch's optimizers refuse a negative rate when built, not one set later (a scheduler's); 1e300 not at all
    trainer = RecordingTrainer().configure_engine(max_epochs=1)
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.05)
    optimizer.param_groups[0]["lr"] = lr
    trainer.configure_optimizers = lambda: optimizer
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    with pytest.raises(ConfigError, match="learning rate"):
        trainer.fit(DataLoader(BlobDataset(4), batch_size=2))
    assert all(torch.equal(before[name], value) for name, value in trainer.model.state_dict().items())


def test_large_buffers_stay_off_the_heap_on_glibc():
    import platform

    from defectvad.engine.resources import fix_mmap_threshold

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt's M_MMAP_THRESHOLD is glibc's; this system has another C library")
    assert fix_mmap_threshold() is True
