# tests/test_fastflow.py
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.components.all_in_one_block import AllInOneBlock
from defectvad.components.sequence_inn import SequenceINN
from defectvad.errors import ConfigError
from defectvad.metrics.auroc import auroc
from defectvad.models.fastflow.anomaly_map import AnomalyMapGenerator
from defectvad.models.fastflow.loss import FastflowLoss
from defectvad.models.fastflow.torch_model import FastflowModel
from defectvad.models.fastflow.trainer import FastflowTrainer

from fakes import StripesDataset

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


def conv_subnet(channels_in, channels_out):
    return nn.Sequential(nn.Conv2d(channels_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, channels_out, 3, padding=1))


def linear_subnet(channels_in, channels_out):
    return nn.Sequential(nn.Linear(channels_in, 16), nn.ReLU(), nn.Linear(16, channels_out))


def brute_force_log_det(flow, x, condition=None):
    values = []
    for index in range(x.shape[0]):
        c = None if condition is None else [condition[index:index + 1]]

        def single(v):
            return flow(v.reshape(1, *x.shape[1:]), c=c)[0].reshape(-1)

        jacobian = torch.autograd.functional.jacobian(single, x[index].reshape(-1))
        values.append(torch.linalg.slogdet(jacobian)[1])
    return torch.stack(values)


@pytest.mark.parametrize("permute_soft", [False, True])
@pytest.mark.parametrize("gin_block", [False, True])
def test_all_in_one_block_inverts_and_its_log_det_matches_the_jacobian(permute_soft, gin_block):
    torch.manual_seed(0)
    flow = SequenceINN(5, 3, 3)
    for _ in range(3):
        flow.append(AllInOneBlock, subnet_constructor=conv_subnet, permute_soft=permute_soft, gin_block=gin_block)
    with torch.no_grad():
        # away from the identity start, so every part of the block contributes
        for parameter in flow.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    flow = flow.double()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    y, log_det = flow(x)
    x_back, log_det_back = flow(y, rev=True)
    # the stored rotation is float32, orthogonal only to about 1e-7
    tolerance = 1e-4 if permute_soft else 1e-10
    torch.testing.assert_close(x_back, x, rtol=0, atol=tolerance)
    torch.testing.assert_close(log_det_back, -log_det, rtol=0, atol=tolerance)
    torch.testing.assert_close(log_det, brute_force_log_det(flow, x), rtol=0, atol=tolerance)
    assert log_det.abs().min() > 1e-3 or gin_block
    if gin_block:
        assert log_det.abs().max() < 1e-10


def test_conditional_vector_block_log_det_matches_the_jacobian():
    torch.manual_seed(1)
    flow = SequenceINN(6)
    for _ in range(2):
        flow.append(AllInOneBlock, cond=0, cond_shape=(4,), subnet_constructor=linear_subnet, affine_clamping=1.9)
    flow = flow.double()
    x, condition = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    y, log_det = flow(x, c=[condition])
    torch.testing.assert_close(flow(y, c=[condition], rev=True)[0], x, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_det, brute_force_log_det(flow, x, condition), rtol=0, atol=1e-10)
    # another condition gives another output
    assert (flow(x, c=[condition + 1])[0] - y).abs().max() > 1e-3


def test_block_starts_as_anomalib_inits_it():
    torch.manual_seed(0)
    block = AllInOneBlock([(6, 4, 4)], subnet_constructor=conv_subnet)
    # softplus activation of the initial scale gives exactly global_affine_init = 1
    assert torch.allclose(block.global_scale_activation(block.global_scale), torch.ones(1, 6, 1, 1))
    assert torch.equal(block.global_offset, torch.zeros(1, 6, 1, 1))
    w = block.w_perm[:, :, 0, 0]
    assert torch.equal(w.sum(0), torch.ones(6)) and torch.equal(w.sum(1), torch.ones(6))
    assert torch.equal(block.w_perm_inv[:, :, 0, 0], w.T)
    assert block.subnet[0].in_channels == 3 and block.subnet[2].out_channels == 6
    with pytest.raises(ValueError, match="SIGMOID, SOFTPLUS or EXP"):
        AllInOneBlock([(6, 4, 4)], subnet_constructor=conv_subnet, global_affine_type="RELU")


def test_state_dict_names_and_shapes_follow_anomalib():
    torch.manual_seed(0)
    model = FastflowModel(input_size=(64, 64), backbone="resnet18")
    state = model.state_dict()
    assert state["norms.0.weight"].shape == (64, 16, 16)
    assert state["norms.2.bias"].shape == (256, 4, 4)
    assert state["fast_flow_blocks.0.module_list.0.global_scale"].shape == (1, 64, 1, 1)
    assert state["fast_flow_blocks.2.module_list.7.w_perm"].shape == (256, 256, 1, 1)
    # 3x3 and 1x1 subnets alternate
    assert state["fast_flow_blocks.1.module_list.0.subnet.0.weight"].shape == (64, 64, 3, 3)
    assert state["fast_flow_blocks.1.module_list.1.subnet.2.weight"].shape == (128, 64, 1, 1)
    assert "feature_extractor.conv1.weight" in state and "feature_extractor.layer3.1.bn2.running_var" in state
    assert not any("layer4" in key or key.startswith("extractor.") for key in state)
    flow_keys = [key for key in state if key.startswith("fast_flow_blocks.")]
    assert len(flow_keys) == 3 * 8 * 8
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())


def test_loss_and_map_follow_the_formulas():
    torch.manual_seed(0)
    hidden = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    jacobians = [torch.randn(2), torch.randn(2)]
    expected = sum((0.5 * (h**2).sum(dim=(1, 2, 3)) - j).mean() for h, j in zip(hidden, jacobians))
    assert torch.allclose(FastflowLoss()(hidden, jacobians), expected)
    anomaly_map = AnomalyMapGenerator(input_size=(16, 16))(hidden)
    # minus the likelihood exp(-mean(h^2) / 2) of each position, resized and averaged over the blocks
    expected_map = sum(F.interpolate(-torch.exp(-0.5 * (h**2).mean(1, keepdim=True)), size=(16, 16),
                                     mode="bilinear", align_corners=False) for h in hidden) / len(hidden)
    torch.testing.assert_close(anomaly_map, expected_map, rtol=1e-5, atol=1e-7)
    # zero hidden variables are the most likely: the map reaches its minimum, -1
    assert torch.allclose(AnomalyMapGenerator((8, 8))([torch.zeros(1, 4, 8, 8)]), -torch.ones(1, 1, 8, 8))
    assert anomaly_map.max() < 0 and anomaly_map.min() > -1


def test_score_is_the_map_maximum_and_the_size_is_checked():
    torch.manual_seed(0)
    model = FastflowModel(input_size=(64, 64), backbone="resnet18", flow_steps=2).eval()
    with torch.no_grad():
        outputs = model(torch.randn(3, 3, 64, 64))
    assert torch.equal(outputs["pred_score"], outputs["anomaly_map"].amax(dim=(-2, -1)).reshape(-1))
    model.train()
    hidden, jacobians = model(torch.randn(2, 3, 64, 64))
    assert [tuple(h.shape) for h in hidden] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert [tuple(j.shape) for j in jacobians] == [(2,)] * 3
    with pytest.raises(ConfigError, match="model.input_size"):
        model(torch.randn(1, 3, 96, 96))


def make_trainer():
    torch.manual_seed(0)
    return FastflowTrainer(backbone="resnet18", input_size=(64, 64), flow_steps=2)


def test_optimizer_is_anomalib_adam_and_a_step_lowers_the_loss():
    trainer = make_trainer()
    trainer.setup_optimizers()
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert (group["lr"], group["weight_decay"]) == (0.001, 0.00001)
    frozen = {k: v.clone() for k, v in trainer.model.feature_extractor.state_dict().items()}
    batch = {"image": torch.stack([StripesDataset(4)[i]["image"] for i in range(4)])}
    trainer.model.train()
    losses = []
    for step in range(3):
        loss = trainer.training_step(batch, step)["loss"]
        trainer.backward_and_step(loss)
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0]
    after = trainer.model.feature_extractor.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    weights_dir = tmp_path_factory.mktemp("fastflow") / "weights"
    trainer = make_trainer().configure_engine(max_epochs=2, weights_dir=weights_dir, progress_bar=False)
    trainer.fit(DataLoader(StripesDataset(16), batch_size=8, shuffle=True))
    return trainer, DataLoader(StripesDataset(12, anomalous_every=2, seed=1), batch_size=6), weights_dir


def test_fit_and_predict_separate_anomalies(fitted):
    trainer, test_loader, _ = fitted
    assert len(trainer.train_losses) == 2 and trainer.train_losses[1] < trainer.train_losses[0]
    predictions = trainer.predict(test_loader)
    assert predictions["anomaly_map"].shape == (12, 1, 64, 64)
    assert auroc(predictions["pred_score"], predictions["label"]) >= 0.9
    assert auroc(predictions["anomaly_map"].flatten(), predictions["mask"].flatten()) >= 0.9


def test_config_sizes_the_model_from_the_transform():
    overrides = ["model=fastflow", "backbone=efficientnet_lite0", "transform.image_size=[96,96]",
                 "transform.center_crop=[64,64]"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    trainer = instantiate(cfg.model, backbone=cfg.backbone.name, weights_path=None, _convert_="all")
    assert isinstance(trainer, FastflowTrainer)
    assert (trainer.lr, trainer.weight_decay, trainer.max_epochs) == (0.001, 0.00001, 20)
    assert trainer.model.input_size == (64, 64)
    # efficientnet_lite0 at strides 4, 8, 16: 24, 40 and 112 channels
    assert [tuple(norm.normalized_shape) for norm in trainer.model.norms] == [(24, 16, 16), (40, 8, 8), (112, 4, 4)]


def reference_transformer_map(model, images, prefix_tokens):
    # the read block's output caught by a hook, then anomalib's steps written out: final norm, prefix tokens
    # dropped, (B, N, C) -> (B, C, H / 16, W / 16)
    network = model.feature_extractor
    index = int(model.layers[0].split(".")[1])
    caught, later = [], []
    hooks = [network.blocks[index].register_forward_hook(lambda m, args, out: caught.append(out)),
             network.blocks[index + 1].register_forward_hook(lambda m, args, out: later.append(out))]
    try:
        features = model.get_transformer_features(images)[0]
    finally:
        for hook in hooks:
            hook.remove()
    tokens = network.norm(caught[0])[:, prefix_tokens:]
    batch, _, channels = tokens.shape
    expected = tokens.permute(0, 2, 1).reshape(batch, channels, images.shape[-2] // 16, images.shape[-1] // 16)
    return features, expected, later


@pytest.mark.parametrize("backbone, layer, prefix_tokens", [
    ("deit_base_distilled_patch16_384", "blocks.7", 2),
    # CaiT's patch tokens carry no class token; a small CaiT stands in for cait_m48_448 (block 40)
    ("cait_s24_224", "blocks.2", 0),
])
def test_transformer_tokens_become_anomalib_s_map(monkeypatch, backbone, layer, prefix_tokens):
    from defectvad.models.fastflow import torch_model
    monkeypatch.setitem(torch_model.TRANSFORMER_BLOCKS, "cait_s24_224", "blocks.2")
    assert torch_model.TRANSFORMER_BLOCKS["cait_m48_448"] == "blocks.40"
    torch.manual_seed(0)
    # a non-square input, so a swapped height and width would show
    model = FastflowModel(input_size=(64, 32), backbone=backbone, flow_steps=2, hidden_ratio=0.05).eval()
    assert model.layers == [layer] and model.norms is None
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        features, expected, later = reference_transformer_map(model, images, prefix_tokens)
    assert features.shape == expected.shape == (2, model.feature_extractor.embed_dim, 4, 2)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    # the blocks after the read one are kept (anomalib's state dict holds them) but never run
    assert not later
    state = model.state_dict()
    assert "feature_extractor.norm.weight" in state and not any(key.startswith("norms.") for key in state)
    assert not any(key.startswith("feature_extractor.head") for key in state)
    assert state["fast_flow_blocks.0.module_list.1.global_scale"].shape == (1, features.shape[1], 1, 1)
    with torch.no_grad():
        outputs = model(images)
        hidden, _ = model.fast_flow_blocks[0](expected)
    expected_map = F.interpolate(-torch.exp(-0.5 * (hidden**2).mean(1, keepdim=True)), size=(64, 32),
                                 mode="bilinear", align_corners=False)
    torch.testing.assert_close(outputs["anomaly_map"], expected_map, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="multiple of 16"):
        model(torch.randn(1, 3, 32, 32))
