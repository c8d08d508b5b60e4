# tests/test_finite_weights.py
# training that goes wrong keeps the last finite state, and its message says which file holds which epoch
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.engine.checkpoints import load_weights
from defectvad.errors import TrainingError

IMAGES = [{"image": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(index)), "label": 0,
           "mask": torch.zeros(1, 8, 8), "image_path": f"{index}.png"} for index in range(4)]


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("mean", torch.zeros(3))

    def forward(self, images):
        return {"loss": ((self.conv(images) - images) ** 2).mean()}


class SpoilingSGD(torch.optim.SGD):
    # a plain step, except that the given step writes `value` into the first weight (an exploding update)
    def __init__(self, params, spoil_at, value):
        super().__init__(params, lr=0.1)
        self.steps, self.spoil_at, self.value = 0, spoil_at, value

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        self.steps += 1
        if self.steps == self.spoil_at:
            self.param_groups[0]["params"][0][0, 0] = self.value


class TinyTrainer(BaseTrainer):
    def __init__(self, spoil_at=None, value=float("inf")):
        super().__init__()
        self.model = TinyModel()
        self.spoil_at, self.value = spoil_at, value

    def configure_optimizers(self):
        return SpoilingSGD(self.model.parameters(), self.spoil_at, self.value)

    def training_step(self, batch, batch_idx):
        return self.model(batch["image"])


def fit(trainer, tmp_path, epochs=3):
    trainer.configure_engine(max_epochs=epochs, weights_dir=tmp_path)
    # one step per epoch
    return trainer.fit(DataLoader(IMAGES, batch_size=4))


def test_inf_weights_after_a_step_stop_training_and_keep_the_last_finite_epoch(tmp_path):
    kept = {}
    trainer = TinyTrainer(spoil_at=3)
    trainer.on_train_epoch_end = lambda: kept.update({trainer.current_epoch: {
        name: value.clone() for name, value in trainer.model.state_dict().items()}})
    with pytest.raises(TrainingError) as caught:
        fit(trainer, tmp_path)
    path = tmp_path / "last.safetensors"
    assert str(caught.value) == (
        f"the weights became inf or NaN (conv.weight) after the optimizer step at epoch 3, step 3; training "
        f"stopped; {path} holds the finite weights of epoch 2; try a lower learning rate, trainer.gradient_clip_val "
        f"or precision fp32")
    saved = load_weights(TinyModel(), path).state_dict()
    assert all(torch.equal(saved[name], kept[1][name]) for name in saved)
    assert all(torch.isfinite(value).all() for value in saved.values())


def test_huge_but_finite_weights_are_not_taken_for_inf(tmp_path):
    # the norm of 1e30 overflows float32, the weights themselves are finite: training goes on
    trainer = fit(TinyTrainer(spoil_at=1, value=1e30), tmp_path, epochs=1)
    assert trainer.current_epoch == 1
    assert load_weights(TinyModel(), tmp_path / "last.safetensors").conv.weight[0, 0, 0, 0] == 1e30


def test_a_non_finite_buffer_is_never_saved_and_the_message_says_nothing_was(tmp_path):
    trainer = TinyTrainer()
    trainer.on_train_epoch_end = lambda: trainer.model.mean.fill_(float("nan"))
    with pytest.raises(TrainingError) as caught:
        fit(trainer, tmp_path)
    assert str(caught.value) == (
        f"the model's state after epoch 1 holds inf or NaN (mean), so it was not saved to "
        f"{tmp_path / 'last.safetensors'}; no weights were saved; try a lower learning rate or precision fp32")
    assert list(tmp_path.iterdir()) == []


def test_a_nan_loss_says_what_was_kept(tmp_path):
    trainer = TinyTrainer()
    original = trainer.training_step
    trainer.training_step = lambda batch, index: (
        {"loss": original(batch, index)["loss"] * float("nan")} if trainer.current_epoch == 0 else None)
    with pytest.raises(TrainingError, match=r"^the loss became nan at epoch 1, step 1; training stopped; no weights "
                                            r"were saved; try a lower learning rate or precision fp32$"):
        fit(trainer, tmp_path)
    assert list(tmp_path.iterdir()) == []
