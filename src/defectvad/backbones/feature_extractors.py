# src/defectvad/backbones/feature_extractors.py
import torch
from torch import nn

from defectvad.backbones.registry import find_entry, get_backbone
from defectvad.backbones.weights import load_state_dict
from defectvad.errors import BackboneError


def prune(module, keep, prefix=""):
    # drop every child that is not a kept module path nor holds one
    for name, child in list(module.named_children()):
        path = prefix + name
        if path in keep:
            continue
        if any(k.startswith(path + ".") for k in keep):
            prune(child, keep, path + ".")
        else:
            delattr(module, name)


def containing_step(steps, path):
    matches = [step for step in steps if path == step or path.startswith(step + ".")]
    return max(matches, key=len) if matches else None


class FeatureExtractor(nn.Module):
    # reads named layers of a backbone: ResNet stages (layer1..layer4), ViT blocks (blocks.N) or any module path
    # of a CNN (layer3.1, _blocks.7, ...); the EfficientNets also answer to layer1..layer4
    def __init__(self, backbone, layers, weights_path=None, requires_grad=False):
        super().__init__()
        spec = get_backbone(backbone)
        layers = list(layers)
        self.backbone = backbone
        self.family = spec.family
        self.layers = layers
        self.requires_grad = requires_grad
        network = spec.build()
        if spec.tower:
            network = getattr(network, spec.tower)
        self.paths = {layer: spec.module_path(layer) for layer in layers}
        self.check_layers(spec, network)

        if spec.family == "cnn":
            # like timm's features_only model: everything after the last requested layer is dropped,
            # and the kept modules keep their original names
            steps = [containing_step(spec.steps, path) for path in self.paths.values()]
            last = max(spec.steps.index(step) for step in steps)
            self.steps = list(dict.fromkeys(spec.steps[: last + 1]))
            prune(network, set(self.steps))
            self.feature_extractor = nn.ModuleDict(dict(network.named_children()))
            self.nested = {path for path in self.paths.values() if path not in self.steps}
        else:
            network.truncate(list(self.paths.values()))
            self.feature_extractor = network
        self.channels, self.strides = self.describe_layers(spec)
        self.out_dims = [self.channels[layer] for layer in layers]

        if weights_path is not None:
            self.load_weights(weights_path)
        if not requires_grad:
            for parameter in self.feature_extractor.parameters():
                parameter.requires_grad_(False)

    def check_layers(self, spec, network):
        valid = list(spec.layers) + [alias for alias in spec.aliases if alias not in spec.layers]
        if spec.family == "cnn":
            names = dict(network.named_modules())
            unknown = [layer for layer, path in self.paths.items()
                       if path not in names or containing_step(spec.steps, path) is None]
            hint = " or any module path inside them (e.g. layer3.1)"
        else:
            unknown = [layer for layer in self.layers if layer not in spec.layers]
            hint = ""
        if not self.layers or unknown:
            what = f"unknown layer(s) {unknown}" if unknown else "no layers given"
            raise BackboneError(f"{what} for backbone {spec.name}; choose among: {', '.join(valid)}{hint}")

    def describe_layers(self, spec):
        # channels and stride of each layer: from the registry, or measured once on a small input
        known = {layer: spec.layers.get(layer) or spec.layers.get(self.paths[layer]) for layer in self.layers}
        if all(known.values()):
            return ({layer: value[0] for layer, value in known.items()},
                    {layer: value[1] for layer, value in known.items()})
        size = 64
        with torch.no_grad():
            was_training = self.feature_extractor.training
            features = self.eval().extract(torch.zeros(1, 3, size, size))
            self.feature_extractor.train(was_training)
        return ({layer: feature.shape[1] for layer, feature in features.items()},
                {layer: size // feature.shape[-1] for layer, feature in features.items()})

    def load_weights(self, path):
        state = load_state_dict(path)
        spec = get_backbone(self.backbone)
        _, entry = find_entry(path)
        if entry is not None and entry["convert"] is not None:
            state = entry["convert"](state)
        if spec.tower:
            prefix = spec.tower + "."
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        own = self.feature_extractor.state_dict()
        # old files lack the BatchNorm counters; those keep their fresh value
        bad = [
            key
            for key, value in own.items()
            if (key not in state and not key.endswith("num_batches_tracked"))
            or (key in state and state[key].shape != value.shape)
        ]
        if bad:
            files = ", ".join(entry["file"] for entry in spec.files)
            raise BackboneError(
                f"{path} does not fit backbone {self.backbone} ({len(bad)} tensors missing or of another shape, "
                f"first: {bad[0]}); use one of: {files}"
            )
        self.feature_extractor.load_state_dict({key: state.get(key, own[key]) for key in own}, strict=True)

    def forward(self, x):
        if self.requires_grad:
            return self.extract(x)
        # a frozen backbone always runs with its ImageNet statistics, as anomalib's extractor does
        self.feature_extractor.eval()
        with torch.no_grad():
            return self.extract(x)

    def tokens(self, x):
        # ViT and CLIP layers as tokens: "patches" (B, N, C) and the prefix tokens ("cls", "registers", "dist")
        if self.family == "cnn":
            raise BackboneError(f"{self.backbone} is a CNN: it has feature maps, not tokens")
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            if not self.requires_grad:
                self.feature_extractor.eval()
            found = self.feature_extractor.forward_tokens(x, list(dict.fromkeys(self.paths.values())))
        return {layer: found[path] for layer, path in self.paths.items()}

    def extract(self, x):
        if self.family != "cnn":
            found = self.feature_extractor.forward_layers(x, list(dict.fromkeys(self.paths.values())))
            return {layer: found[path] for layer, path in self.paths.items()}
        found = {}
        hooks = [
            self.feature_extractor.get_submodule(path).register_forward_hook(
                lambda module, args, output, path=path: found.__setitem__(path, output))
            for path in self.nested
        ]
        try:
            for step in self.steps:
                x = self.feature_extractor.get_submodule(step)(x)
                found[step] = x
        finally:
            for hook in hooks:
                hook.remove()
        return {layer: found[path] for layer, path in self.paths.items()}
