# tests/test_backbones.py
import hashlib
import importlib.util
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from defectvad.backbones import registry
from defectvad.backbones.efficientnet_lite import EfficientNetLite0
from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.weights import load_state_dict, resolve_weights, verify_weights
from defectvad.errors import BackboneError

ROOT = Path(__file__).resolve().parents[1]


def resnet18_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def add_entry(monkeypatch, file, backbone, sha256_prefix=None, check=None):
    entry = registry.weight_file(file, "test", "https://example.invalid/" + file, sha256_prefix=sha256_prefix, check=check)
    spec = registry.get_backbone(backbone)
    monkeypatch.setattr(spec, "files", [known for known in spec.files if known["file"] != file] + [entry])


def test_registry_defaults_and_torchvision_prefixes():
    assert registry.files_for("resnet50")[0] == "resnet50-0676ba61.pth"
    assert registry.files_for("wide_resnet50_2") == [
        "wide_resnet50_2-95faca4d.pth",
        "wide_resnet50_2-9ba9bcbe.pth",
        "wide_resnet50_2.tv_in1k/model.safetensors",
    ]
    files = {entry["file"]: entry for _, entry in registry.all_files()}
    assert "wide_resnet50_2-32ee1156.pth" not in files
    for file, entry in files.items():
        if re.search(r"-[0-9a-f]{8}\.pth$", file):
            assert file.rsplit("-", 1)[1] == entry["sha256_prefix"] + ".pth"
            assert (entry["sha256"] or entry["sha256_prefix"]).startswith(entry["sha256_prefix"])
    cnns = [name for name, spec in registry.BACKBONES.items() if spec.family == "cnn"]
    assert cnns == ["resnet18", "resnet34", "resnet50", "wide_resnet50_2", "efficientnet_b5", "efficientnet_lite0"]


def test_unknown_backbone_lists_valid_names(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone 'resnet19'.*resnet18, resnet34"):
        resolve_weights("resnet19", tmp_path)
    with pytest.raises(BackboneError, match="choose one of: resnet18"):
        FeatureExtractor("resnet19", ["layer1"])


def test_missing_file_names_file_folder_and_url(tmp_path):
    with pytest.raises(BackboneError) as error:
        resolve_weights("resnet18", tmp_path / "nowhere")
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message
    assert str((tmp_path / "nowhere").resolve()) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "tools/backbones.py --download resnet18" in message


def test_resolve_order_folders_and_wrong_backbone(tmp_path):
    (tmp_path / "resnet50-11ad3fa6.pth").write_bytes(b"v2")
    assert resolve_weights("resnet50", tmp_path) == tmp_path.resolve() / "resnet50-11ad3fa6.pth"
    (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"v1")
    assert resolve_weights("resnet50", tmp_path).name == "resnet50-0676ba61.pth"
    (tmp_path / "resnet50.tv_in1k").mkdir()
    (tmp_path / "resnet50.tv_in1k" / "model.safetensors").write_bytes(b"x")
    found = resolve_weights("resnet50", tmp_path, file="resnet50.tv_in1k")
    assert found == tmp_path.resolve() / "resnet50.tv_in1k" / "model.safetensors"
    with pytest.raises(BackboneError, match="holds resnet50 weights, not wide_resnet50_2"):
        resolve_weights("wide_resnet50_2", tmp_path, file="resnet50-0676ba61.pth")


def test_hash_mismatch_is_refused(tmp_path):
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(resnet18_state(), path)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    with pytest.raises(BackboneError, match=f"does not match its name.*{actual}, expected f37072fd"):
        load_state_dict(path)
    assert load_state_dict(path, verify=False)["conv1.weight"].shape == (64, 3, 7, 7)


def test_matching_hash_loads_into_feature_extractor(tmp_path, monkeypatch):
    state = resnet18_state()
    staged = tmp_path / "staged.pth"
    torch.save(state, staged)
    prefix = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    path = staged.rename(tmp_path / f"resnet18-{prefix}.pth")
    add_entry(monkeypatch, path.name, "resnet18", sha256_prefix=prefix)
    assert verify_weights(path) == path.resolve()
    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], weights_path=resolve_weights("resnet18", tmp_path, path.name))
    loaded = extractor.feature_extractor.state_dict()
    assert torch.equal(loaded["layer2.1.conv2.weight"], state["layer2.1.conv2.weight"])
    assert torch.equal(loaded["bn1.running_var"], state["bn1.running_var"])


def test_file_that_does_not_fit_the_backbone(tmp_path):
    path = tmp_path / "mine.pth"
    torch.save(resnet18_state(), path)
    with pytest.raises(BackboneError, match="does not fit backbone resnet34.*first: layer1.2"):
        FeatureExtractor("resnet34", ["layer1"], weights_path=path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_without_running(tmp_path):
    # the payload is real: plain pickle runs it
    pickle.loads(pickle.dumps(Payload(str(tmp_path / "proof"))))
    assert (tmp_path / "proof").exists()
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload(str(marker))}, tmp_path / "evil.pth")
    (tmp_path / "evil2.pth").write_bytes(pickle.dumps(Payload(str(marker))))
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(BackboneError, match="not a plain weights file and was refused"):
            load_state_dict(tmp_path / name)
    assert not marker.exists()


def test_damaged_files_are_reported(tmp_path):
    torch.save(resnet18_state(), tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:100000])
    with pytest.raises(BackboneError, match="could not be read"):
        load_state_dict(tmp_path / "cut.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="not a readable safetensors file"):
        load_state_dict(tmp_path / "junk.safetensors")


def test_timm_style_safetensors_folder(tmp_path, monkeypatch):
    add_entry(monkeypatch, "resnet18.tv_in1k/model.safetensors", "resnet18", check={"layer1.0.conv1.weight": (64, 64, 3, 3)})
    state = resnet18_state()
    (tmp_path / "resnet18.tv_in1k").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "resnet18.tv_in1k" / "model.safetensors")
    path = resolve_weights("resnet18", tmp_path, "resnet18.tv_in1k")
    extractor = FeatureExtractor("resnet18", ["layer1"], weights_path=path)
    assert torch.equal(extractor.feature_extractor.state_dict()["layer1.1.bn2.weight"], state["layer1.1.bn2.weight"])

    add_entry(monkeypatch, "resnet18.tv_in1k/model.safetensors", "resnet18", check={"layer1.0.conv1.weight": (128, 64, 1, 1)})
    save_file({"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)}, tmp_path / "resnet18.tv_in1k" / "model.safetensors")
    with pytest.raises(BackboneError, match="does not hold resnet18 weights"):
        verify_weights(path)


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_feature_shapes_channels_strides(backbone):
    layers = ["layer3", "layer1", "layer2"]
    extractor = FeatureExtractor(backbone, layers)
    features = extractor(torch.randn(1, 3, 64, 64))
    assert list(features) == layers
    expected = {"resnet18": [256, 64, 128], "efficientnet_lite0": [112, 24, 40]}[backbone]
    assert extractor.out_dims == expected
    assert extractor.strides == {"layer3": 16, "layer1": 4, "layer2": 8}
    for layer, feature in features.items():
        assert feature.shape == (1, extractor.channels[layer], 64 // extractor.strides[layer], 64 // extractor.strides[layer])
    assert registry.get_backbone(backbone).stages == ["layer1", "layer2", "layer3", "layer4"]
    with pytest.raises(BackboneError, match="unknown layer.*layer5.*layer1, layer2, layer3, layer4"):
        FeatureExtractor(backbone, ["layer5"])


def test_state_dict_names_follow_torchvision_and_drop_unused_modules():
    keys = list(FeatureExtractor("resnet18", ["layer1", "layer2", "layer3"]).state_dict())
    assert keys[0] == "feature_extractor.conv1.weight"
    torchvision_keys = torchvision.models.resnet18(weights=None).state_dict()
    expected = ["feature_extractor." + k for k in torchvision_keys if not k.startswith(("layer4", "fc"))]
    assert keys == expected

    lite = FeatureExtractor("efficientnet_lite0", ["layer2"]).state_dict()
    assert "feature_extractor._blocks.4._project_conv.weight" in lite
    assert not any(k.startswith(("feature_extractor._blocks.5.", "feature_extractor._conv_head", "feature_extractor._fc")) for k in lite)


def test_frozen_extractor_keeps_batchnorm_statistics():
    extractor = FeatureExtractor("resnet18", ["layer1"]).train()
    before = extractor.feature_extractor.bn1.running_mean.clone()
    features = extractor(torch.randn(2, 3, 32, 32))
    assert torch.equal(extractor.feature_extractor.bn1.running_mean, before)
    assert not features["layer1"].requires_grad
    assert not any(p.requires_grad for p in extractor.parameters())
    trainable = FeatureExtractor("resnet18", ["layer1"], requires_grad=True)
    assert trainable(torch.randn(2, 3, 32, 32))["layer1"].requires_grad


def test_efficientnet_lite0_from_package_matches_full_network(tmp_path):
    path = resolve_weights("efficientnet_lite0", tmp_path)
    assert path.name == "efficientnet-lite0-57934424.pth"
    extractor = FeatureExtractor("efficientnet_lite0", ["layer1", "layer4"], weights_path=path)
    network = EfficientNetLite0()
    network.load_state_dict(load_state_dict(path))
    network.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = network._act(network._bn0(network._conv_stem(x)))
        for block in network._blocks:
            expected = block(expected)
    assert torch.allclose(extractor(x)["layer4"], expected, atol=1e-6)


def test_efficientnet_lite0_batchnorm_updates_as_timm():
    # timm's tf_efficientnet_lite0 (anomalib's): eps 1e-3, momentum 0.1
    torch.manual_seed(0)
    network = EfficientNetLite0().train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = network._conv_stem(x)
        network(x)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.1)}
    assert torch.allclose(network._bn0.running_mean, 0.1 * stem.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(network._bn0.running_var, 0.9 + 0.1 * stem.var((0, 2, 3), unbiased=True), atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image is not installed")
def test_efficientnet_lite0_recognises_the_cat(tmp_path):
    from skimage.data import chelsea

    network = EfficientNetLite0()
    network.load_state_dict(load_state_dict(resolve_weights("efficientnet_lite0", tmp_path)))
    image = np.asarray(Image.fromarray(chelsea()).resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(((image - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        probabilities = network.eval()(x).softmax(1)[0]
    assert probabilities.argmax().item() == 285
    assert probabilities[285].item() > 0.7


def load_tool():
    spec = importlib.util.spec_from_file_location("backbones_tool", ROOT / "tools" / "backbones.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_tool_lists_verifies_and_rejects_a_bad_download(tmp_path, monkeypatch, capsys):
    tool = load_tool()
    (tmp_path / "resnet34-b627a593.pth").write_bytes(b"not the original")
    assert tool.list_files(tmp_path) == 1
    out = capsys.readouterr().out
    assert "resnet34-b627a593.pth" in out and "BAD" in out and "does not match" in out
    assert "efficientnet-lite0-57934424.pth" in out and "in pip package" in out

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def read(self, size=-1):
            data, self.data = getattr(self, "data", b"tampered"), b""
            return data

    monkeypatch.setattr(tool.urllib.request, "urlopen", lambda url: Response())
    assert tool.download(tmp_path, ["resnet18"]) == 1
    assert "does not match" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet34-b627a593.pth"]
    assert tool.download(tmp_path, ["efficientnet_lite0"]) == 0
    assert (tmp_path / "efficientnet-lite0-57934424.pth").is_file()


def test_backbone_configs_and_readme_agree_with_the_registry():
    configs = {path.stem: path for path in (ROOT / "conf" / "backbone").glob("*.yaml")}
    assert sorted(configs) == sorted(registry.BACKBONES)
    for name, path in configs.items():
        assert f"\nname: {name}\n" in path.read_text()
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)`", (ROOT / "backbones" / "README.md").read_text(), re.MULTILINE)
    assert sorted(rows) == sorted((entry["file"], name) for name, entry in registry.all_files())
    assert ("bpe_simple_vocab_16e6.txt.gz", "clip_tokenizer") in rows


def test_transform_takes_the_backbone_statistics_and_interpolation():
    from omegaconf import OmegaConf

    from defectvad.data.transforms import create_transform

    settings = OmegaConf.create({"image_size": [8, 8], "center_crop": None, "mean": None, "std": None,
                                 "interpolation": None})
    resnet = registry.get_backbone("resnet18")
    transform = create_transform(settings, "resnet18", True)
    assert (transform.mean, transform.std, transform.interpolation) == (resnet.mean, resnet.std, "bilinear")
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    tensor, _ = transform(image)
    assert torch.allclose(tensor[:, 0, 0], (torch.tensor([1.0, 0, 0]) - torch.tensor(resnet.mean)) / torch.tensor(resnet.std))
    settings.mean, settings.std, settings.interpolation = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "bicubic"
    tensor, _ = create_transform(settings, "resnet18", True)(image)
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([2.0, -2.0, -2.0]))
    vit = create_transform(OmegaConf.create({"image_size": 8, "center_crop": None}), "dinov2_vits14", True)
    assert vit.interpolation == "bicubic"


def test_a_hub_folder_name_finds_the_file_the_backbone_keeps_there(tmp_path):
    folder = tmp_path / "vit_base_patch16_plus_clip_240.laion400m_e31"
    folder.mkdir()
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"x")
    found = resolve_weights("clip_vit_b16_plus_240", tmp_path, folder.name)
    assert found == folder / "open_clip_pytorch_model.bin"
    (folder / "open_clip_model.safetensors").write_bytes(b"x")
    assert resolve_weights("clip_vit_b16_plus_240", tmp_path, folder.name) == folder / "open_clip_model.safetensors"


def test_vit_layers_give_patch_maps_and_their_tokens():
    extractor = FeatureExtractor("dinov2_vits14_reg4", ["blocks.1", "blocks.3"])
    assert extractor.strides == {"blocks.1": 14, "blocks.3": 14} and extractor.out_dims == [384, 384]
    assert len(extractor.feature_extractor.blocks) == 4
    x = torch.randn(1, 3, 56, 70)
    maps = extractor(x)
    tokens = extractor.tokens(x)
    assert maps["blocks.3"].shape == (1, 384, 4, 5)
    assert tokens["blocks.3"]["registers"].shape == (1, 4, 384) and tokens["blocks.3"]["cls"].shape == (1, 384)
    patches = tokens["blocks.3"]["patches"]
    assert torch.allclose(maps["blocks.3"], patches.transpose(1, 2).reshape(1, 384, 4, 5))
    with pytest.raises(BackboneError, match="unknown layer.*blocks.12.*blocks.0"):
        FeatureExtractor("dinov2_vits14", ["blocks.12"])
    assert registry.get_backbone("dinov2_vits14").stages == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]


def test_any_module_path_of_a_cnn_is_a_layer():
    extractor = FeatureExtractor("resnet18", ["layer2.0", "layer3"])
    assert extractor.channels == {"layer2.0": 128, "layer3": 256} and extractor.strides == {"layer2.0": 8, "layer3": 16}
    network = torchvision.models.resnet18(weights=None).eval()
    network.load_state_dict({**network.state_dict(), **extractor.feature_extractor.state_dict()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = network.maxpool(network.relu(network.bn1(network.conv1(x))))
        expected = network.layer2[0](network.layer1(stem))
    assert torch.allclose(extractor(x)["layer2.0"], expected, atol=1e-6)


@pytest.mark.parametrize("name", [name for name, spec in registry.BACKBONES.items() if spec.family != "cnn"])
def test_a_missing_vit_or_clip_file_names_file_folder_and_address(tmp_path, name):
    entry = registry.get_backbone(name).files[0]
    with pytest.raises(BackboneError) as error:
        resolve_weights(name, tmp_path)
    message = str(error.value)
    assert entry["file"] in message and str(tmp_path) in message and entry["url"] in message
    assert "\n" not in message
