# tests/test_efficiency.py
import pytest
import torch
from torch import nn

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.components.blur import compute_kernel_size
from defectvad.metrics.efficiency import count_flops, count_parameters, measure_efficiency
from defectvad.models.padim.torch_model import PadimModel
from defectvad.models.patchcore.torch_model import PatchcoreModel


def conv_macs(cin, cout, kernel, out, groups=1):
    # multiply-adds of one convolution with a square kernel and a square output of side `out`
    return cin // groups * cout * kernel * kernel * out * out


def resnet18_macs(size=224, last="layer4"):
    # torchvision's resnet18, written out from the architecture: a stem, then four stages of two basic
    # blocks (two 3x3 convolutions each); stages 2-4 halve the size in their first convolution and add a
    # 1x1 stride-2 projection on the shortcut
    s = size // 2
    macs = conv_macs(3, 64, 7, s)  # conv1, stride 2
    s //= 2  # max pool
    macs += 4 * conv_macs(64, 64, 3, s)  # layer1
    for name, cin, cout in (("layer2", 64, 128), ("layer3", 128, 256), ("layer4", 256, 512)):
        if name > last:
            break
        s //= 2
        macs += conv_macs(cin, cout, 3, s) + 3 * conv_macs(cout, cout, 3, s) + conv_macs(cin, cout, 1, s)
    return macs


# EfficientNet-Lite0: (repeats, kernel, stride, expansion, input channels, output channels) per stage
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def efficientnet_lite0_macs(size=224):
    # stem 3x3 stride 2 to 32 channels, then 16 inverted-residual blocks: a 1x1 expansion (none when the
    # ratio is 1), a depthwise kxk convolution (its stride halves the size), a 1x1 projection; no head
    s = size // 2
    macs = conv_macs(3, 32, 3, s)
    for repeats, kernel, stride, expansion, cin, cout in LITE0_STAGES:
        for index in range(repeats):
            channels_in = cin if index == 0 else cout
            hidden = channels_in * expansion
            if expansion != 1:
                macs += conv_macs(channels_in, hidden, 1, s)
            if index == 0 and stride == 2:
                s //= 2
            macs += conv_macs(hidden, hidden, kernel, s, groups=hidden)
            macs += conv_macs(hidden, cout, 1, s)
    return macs


def test_hand_counts_match_the_published_totals():
    # torchvision lists resnet18 at 1.81 GFLOPS (multiply-adds, with the 0.5 M of the classifier);
    # EfficientNet-Lite0 is published at about 385 M multiply-adds with its 1280-channel head and classifier
    assert resnet18_macs() + 512 * 1000 == pytest.approx(1.814e9, rel=0.002)
    head = conv_macs(320, 1280, 1, 7) + 1280 * 1000
    assert efficientnet_lite0_macs() + head == pytest.approx(385e6, rel=0.02)


@pytest.mark.parametrize("backbone, hand_count", [("resnet18", resnet18_macs),
                                                  ("efficientnet_lite0", efficientnet_lite0_macs)])
def test_flops_of_a_backbone_agree_with_the_hand_count(backbone, hand_count):
    torch.set_num_threads(1)
    extractor = FeatureExtractor(backbone, ["layer1", "layer2", "layer3", "layer4"])
    flops = count_flops(extractor, torch.randn(1, 3, 224, 224))
    assert flops == pytest.approx(2 * hand_count(224), rel=0.05)


@pytest.mark.parametrize("block", ["clip", "vit"])
def test_transformer_block_flops_count_attention_on_a_cpu(block):
    # torch's counter has no CPU formula for scaled_dot_product_attention nor for nn.MultiheadAttention's fused
    # inference path (it counted 0 there); by hand: q, k, v and output projections 8 L E^2, the two attention
    # products 4 L^2 E, the MLP 16 L E^2 (2 per multiply-add)
    from defectvad.backbones.clip import ResidualAttentionBlock
    from defectvad.backbones.vit import Block

    tokens, width = 10, 32
    module = ResidualAttentionBlock(width, 4) if block == "clip" else Block(width, 4)
    flops = count_flops(module, torch.randn(1, tokens, width))
    assert flops == 8 * tokens * width**2 + 4 * tokens**2 * width + 16 * tokens * width**2


def test_padim_flops_count_the_mahalanobis_distance_as_a_matmul():
    torch.manual_seed(0)
    size, n_features = 64, 100
    model = PadimModel("resnet18", n_features=n_features)
    model.train()
    model(torch.randn(3, 3, size, size))
    model.fit()
    flops = count_flops(model, torch.randn(1, 3, size, size))
    positions = (size // 4) ** 2
    blur = conv_macs(1, 1, compute_kernel_size(4), size)
    expected = 2 * (resnet18_macs(size, "layer3") + positions * n_features * n_features + blur)
    assert flops == pytest.approx(expected, rel=0.01)


def test_patchcore_flops_count_the_memory_bank_search_as_a_matmul():
    torch.manual_seed(0)
    size = 64
    model = PatchcoreModel("resnet18", num_neighbors=9)
    model.train()
    model(torch.randn(2, 3, size, size))
    model.subsample_embedding(0.25)
    model.eval()
    bank, channels = model.memory_bank.shape
    patches = (size // 8) ** 2
    flops = count_flops(model, torch.randn(1, 3, size, size))
    # every patch against the bank, then the re-weighting: the top patch's neighbour against the bank
    # and the top patch against that neighbour's 9 nearest bank rows
    search = patches * bank * channels + bank * channels + 9 * channels
    blur = conv_macs(1, 1, compute_kernel_size(4), size)
    assert flops == pytest.approx(2 * (resnet18_macs(size, "layer3") + search + blur), rel=0.01)


def test_parameters_are_counted_total_and_trainable():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    model.register_buffer("bank", torch.zeros(5, 2))
    assert count_parameters(model) == {"total": 15 + 8, "trainable": 8, "buffer_elements": 10}


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, images):
        anomaly_map = self.conv(images)
        return {"pred_score": anomaly_map.amax((1, 2, 3)), "anomaly_map": anomaly_map}


def test_measure_efficiency_records_every_figure_and_its_counts():
    figures = measure_efficiency(TinyModel(), torch.randn(3, 3, 16, 16), torch.device("cpu"), warmup=1,
                                 latency_repeats=3, batch_size=4, throughput_repeats=2)
    assert figures["parameters"] == {"total": 3 * 9 + 1, "trainable": 28, "buffer_elements": 0}
    assert figures["flops_per_image"] == 2 * 3 * 9 * 16 * 16
    assert figures["input_shape"] == [3, 16, 16]
    assert figures["latency_ms"] > 0 and figures["throughput_images_per_s"] > 0
    assert figures["latency"] == {"batch_size": 1, "warmup": 1, "repeats": 3, "statistic": "median"}
    assert figures["throughput"]["batch_size"] == 4 and figures["throughput"]["repeats"] == 2
