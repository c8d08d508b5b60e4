# src/defectvad/metrics/lpips.py
# LPIPS v0.1 (Zhang et al. 2018): unit-normalised features of an ImageNet trunk at several depths, squared
# differences weighted per channel by learned linear heads, averaged over space and summed over depths. The trunk is
# torchvision's weight file and the heads the lpips package's, both from the backbone folder (backbones/README.md)
import torch
import torchvision
from torch import nn

from defectvad.backbones.registry import LPIPS_FILES
from defectvad.backbones.weights import DOWNLOAD_TOOL, backbone_folder, load_state_dict
from defectvad.errors import BackboneError, ConfigError

# per network: the torchvision builder, the index after which each compared feature map is taken (each ends in a
# ReLU) and its channels
LPIPS_NETS = {
    "alex": (torchvision.models.alexnet, (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
    "vgg": (torchvision.models.vgg16, (4, 9, 16, 23, 30), (64, 128, 256, 512, 512)),
    "squeeze": (torchvision.models.squeezenet1_1, (2, 5, 8, 10, 11, 12, 13), (64, 128, 256, 384, 384, 512, 512)),
}
# the input scaling of v0.1, on images in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LinearHead(nn.Module):
    # lpips' NetLinLayer, so that the heads' file loads as it is (lin<k>.model.1.weight)
    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x):
        return self.model(x)


class LpipsModel(nn.Module):
    def __init__(self, net="alex"):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ConfigError(f"unknown LPIPS network '{net}'; choose one of: {', '.join(LPIPS_NETS)}")
        build, self.ends, channels = LPIPS_NETS[net]
        self.net_name = net
        with torch.device("meta"):
            features = build(weights=None).features[: self.ends[-1]]
        # the trunk's modules and names as in torchvision (features.<index>), filled by load_trunk
        self.net = features.to_empty(device="cpu")
        for index, width in enumerate(channels):
            setattr(self, f"lin{index}", LinearHead(width))
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def load_trunk(self, state, source):
        # a torchvision state dict (classifier included or not)
        features = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
        expected = self.net.state_dict()
        wrong = [key for key in expected if key not in features or features[key].shape != expected[key].shape]
        if wrong:
            raise BackboneError(f"{source} does not hold torchvision {self.net_name} weights (tensor "
                                f"features.{wrong[0]} missing or of another shape); use the file listed in "
                                f"backbones/README.md")
        self.net.load_state_dict({key: features[key] for key in expected})
        return self

    def load_heads(self, state, source):
        expected = {key: value.shape for key, value in self.state_dict().items() if key.startswith("lin")}
        if {key: value.shape for key, value in state.items()} != expected:
            raise BackboneError(f"{source} does not hold the LPIPS v0.1 heads of {self.net_name} "
                                f"({', '.join(sorted(expected))}); use the file listed in backbones/README.md")
        self.load_state_dict(state, strict=False)
        return self

    def features(self, images):
        outputs, x, start = [], (images - self.shift) / self.scale, 0
        for end in self.ends:
            x = self.net[start:end](x)
            outputs.append(x)
            start = end
        return outputs

    def forward(self, first, second, normalize=True):
        # normalize: the images are in [0, 1] (else in [-1, 1]); the distance of each pair (B,)
        if normalize:
            first, second = 2 * first - 1, 2 * second - 1
        distance = 0
        for index, features in enumerate(self.features(torch.cat([first, second]))):
            features = features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            one, two = features.chunk(2)
            distance = distance + getattr(self, f"lin{index}")((one - two) ** 2).mean(dim=(2, 3))
        return distance.reshape(-1)


def lpips_paths(net, backbone_dir=None):
    # (trunk file, heads file) in the backbone folder; a missing one stops with what to fetch
    if net not in LPIPS_FILES:
        raise ConfigError(f"evaluation.lpips must be one of: {', '.join(LPIPS_FILES)}, false (off) or null "
                          f"(the first whose files are present); got {net!r}")
    folder = backbone_folder(backbone_dir)
    paths = [folder / entry["file"] for entry in LPIPS_FILES[net]]
    for path, entry in zip(paths, LPIPS_FILES[net]):
        if not path.is_file():
            raise BackboneError(
                f"LPIPS ({net}) needs {entry['file']}, not found in {folder}; on a machine that is online run: "
                f"{DOWNLOAD_TOOL} {' '.join(e['file'] for e in LPIPS_FILES[net])} (or fetch {entry['url']}), "
                f"then copy it into that folder")
    return paths


def choose_lpips_net(setting, backbone_dir=None):
    # evaluation.lpips: a network asks for it (its files must be there), false turns it off, null takes the first
    # network whose two files are present, or none
    if setting is False:
        return None
    if setting is None:
        folder = backbone_folder(backbone_dir)
        present = [net for net, files in LPIPS_FILES.items() if all((folder / f["file"]).is_file() for f in files)]
        return present[0] if present else None
    lpips_paths(setting, backbone_dir)
    return setting


def load_lpips(net, backbone_dir=None):
    trunk, heads = lpips_paths(net, backbone_dir)
    model = LpipsModel(net)
    model.load_trunk(load_state_dict(trunk), trunk)
    return model.load_heads(load_state_dict(heads), heads)
