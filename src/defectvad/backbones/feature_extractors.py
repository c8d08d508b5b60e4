# src/defectvad/backbones/feature_extractors.py
import torch
import torchvision
from torch import nn

from defectvad.backbones.efficientnet_lite import EfficientNetLite0
from defectvad.backbones.manifest import files_for
from defectvad.backbones.weights import load_state_dict
from defectvad.errors import BackboneError

LAYERS = ("layer1", "layer2", "layer3", "layer4")
STRIDES = (4, 8, 16, 32)
RESNET_STEPS = ["conv1", "bn1", "relu", "maxpool", *LAYERS]

# backbone: (channels per layer, module path each layer is read after)
BACKBONES = {
    "resnet18": ((64, 128, 256, 512), LAYERS),
    "resnet34": ((64, 128, 256, 512), LAYERS),
    "resnet50": ((256, 512, 1024, 2048), LAYERS),
    "wide_resnet50_2": ((256, 512, 1024, 2048), LAYERS),
    "efficientnet_b5": ((40, 64, 176, 512), ("features.2", "features.3", "features.5", "features.7")),
    "efficientnet_lite0": ((24, 40, 112, 320), ("_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15")),
}


def available_layers(backbone):
    check_backbone(backbone)
    return list(LAYERS)


def check_backbone(backbone):
    if backbone not in BACKBONES:
        raise BackboneError(f"unknown backbone '{backbone}'; choose one of: {', '.join(BACKBONES)}")


def build_network(backbone):
    # the full classifier and the module paths its forward runs through, in order
    if backbone == "efficientnet_lite0":
        return EfficientNetLite0(), ["_conv_stem", "_bn0", "_act"] + [f"_blocks.{i}" for i in range(16)]
    if backbone == "efficientnet_b5":
        return torchvision.models.efficientnet_b5(weights=None), [f"features.{i}" for i in range(8)]
    return getattr(torchvision.models, backbone)(weights=None), list(RESNET_STEPS)


def prune(module, keep, prefix=""):
    for name, child in list(module.named_children()):
        path = prefix + name
        if path in keep:
            continue
        if any(k.startswith(path + ".") for k in keep):
            prune(child, keep, path + ".")
        else:
            delattr(module, name)


class FeatureExtractor(nn.Module):
    def __init__(self, backbone, layers, weights_path=None, requires_grad=False):
        super().__init__()
        check_backbone(backbone)
        layers = list(layers)
        unknown = [layer for layer in layers if layer not in LAYERS]
        if not layers:
            raise BackboneError(f"no layers given for backbone {backbone}; choose among: {', '.join(LAYERS)}")
        if unknown:
            raise BackboneError(
                f"unknown layer(s) {unknown} for backbone {backbone}; choose among: {', '.join(LAYERS)}"
            )
        self.backbone = backbone
        self.layers = layers
        self.requires_grad = requires_grad
        channels, taps = BACKBONES[backbone]
        self.taps = {layer: taps[LAYERS.index(layer)] for layer in layers}
        self.channels = {layer: channels[LAYERS.index(layer)] for layer in layers}
        self.strides = {layer: STRIDES[LAYERS.index(layer)] for layer in layers}
        self.out_dims = [self.channels[layer] for layer in layers]

        # like timm's features_only model: everything after the last requested layer is dropped,
        # and the kept modules keep their original names
        network, steps = build_network(backbone)
        self.steps = steps[: max(steps.index(tap) for tap in self.taps.values()) + 1]
        prune(network, set(self.steps))
        self.feature_extractor = nn.ModuleDict(dict(network.named_children()))

        if weights_path is not None:
            self.load_weights(weights_path)
        if not requires_grad:
            for parameter in self.feature_extractor.parameters():
                parameter.requires_grad_(False)

    def load_weights(self, path):
        state = load_state_dict(path)
        own = self.feature_extractor.state_dict()
        # old files lack the BatchNorm counters; those keep their fresh value
        bad = [
            key
            for key, value in own.items()
            if (key not in state and not key.endswith("num_batches_tracked"))
            or (key in state and state[key].shape != value.shape)
        ]
        if bad:
            raise BackboneError(
                f"{path} does not fit backbone {self.backbone} ({len(bad)} tensors missing or of another shape, "
                f"first: {bad[0]}); use one of: {', '.join(files_for(self.backbone))}"
            )
        self.feature_extractor.load_state_dict({key: state.get(key, own[key]) for key in own}, strict=True)

    def forward(self, x):
        if self.requires_grad:
            return self.extract(x)
        # a frozen backbone always runs with its ImageNet statistics, as anomalib's extractor does
        self.feature_extractor.eval()
        with torch.no_grad():
            return self.extract(x)

    def extract(self, x):
        wanted = {tap: layer for layer, tap in self.taps.items()}
        found = {}
        for step in self.steps:
            x = self.feature_extractor.get_submodule(step)(x)
            if step in wanted:
                found[wanted[step]] = x
        return {layer: found[layer] for layer in self.layers}
