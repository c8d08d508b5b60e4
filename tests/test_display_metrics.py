# tests/test_display_metrics.py
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from numpy.lib.stride_tricks import sliding_window_view
from skimage.color import deltaE_ciede2000, rgb2lab, rgb2xyz, xyz2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from defectvad.backbones import registry
from defectvad.components.ssim import SSIMLoss, ssim
from defectvad.errors import BackboneError, ConfigError
from defectvad.experiment import run_experiment
from defectvad.metrics.ciede2000 import ciede2000, delta_e2000
from defectvad.metrics.colour_spaces import luminance, srgb_to_lab, srgb_to_xyz
from defectvad.metrics.image_quality import MS_SSIM_WEIGHTS, ms_ssim, psnr, ssim_score
from defectvad.metrics.lpips import LPIPS_NETS, LpipsModel, choose_lpips_net, load_lpips
from defectvad.metrics.mura import mura_band_power, mura_band_share
from defectvad.metrics.reconstruction import ReconstructionMeter
from fakes import write_square_panels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")

# Sharma, Wu and Dalal 2005, Table 1: L1 a1 b1 L2 a2 b2 and their CIEDE2000 difference, the 34 published pairs
SHARMA_PAIRS = np.array([
    [50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425],
    [50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615],
    [50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412],
    [50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000],
    [50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000],
    [50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000],
    [50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669],
    [50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195],
    [50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045],
    [50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045],
    [50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461],
    [50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065],
    [50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492],
    [50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977],
    [50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030],
    [50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535],
    [50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000],
    [50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000],
    [50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000],
    [50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000],
    [60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644],
    [63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630],
    [61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731],
    [35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645],
    [22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373],
    [36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146],
    [90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441],
    [90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381],
    [6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377],
    [2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082],
])


def image_pair(shape, seed=0):
    # a smooth image and a noisy, shifted copy, in [0, 1], float64
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, shape[-2], dtype=torch.float64),
                          torch.linspace(0, 1, shape[-1], dtype=torch.float64), indexing="ij")
    base = 0.5 + 0.3 * torch.sin(6 * x + 4 * y) * torch.cos(3 * y)
    first = (base + 0.05 * torch.rand(shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    second = (first + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64) + 0.03).clamp(0, 1)
    return first, second


def test_psnr_and_ssim_match_scikit_image():
    first, second = image_pair((2, 3, 40, 36))
    for index in range(2):
        a, b = first[index].numpy(), second[index].numpy()
        expected_psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
        expected_ssim = structural_similarity(a, b, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False)
        assert psnr(first, second)[index].item() == pytest.approx(expected_psnr, rel=1e-12)
        assert ssim_score(first, second)[index].item() == pytest.approx(expected_ssim, abs=1e-12)
    gray = structural_similarity(first[0, 0].numpy(), second[0, 0].numpy(), data_range=1.0, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False)
    assert ssim_score(first[:1, :1], second[:1, :1]).item() == pytest.approx(gray, abs=1e-12)
    assert psnr(first, first.clone())[0].item() == math.inf
    assert ssim_score(first, first).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_the_loss_and_the_metric_share_one_ssim():
    first, second = image_pair((1, 3, 30, 30))
    valid = ssim(first, second, padding="valid")
    # away from the border the reflected-border map (the loss's) is the window-fits map (the metric's)
    assert torch.allclose(ssim(first, second)[..., 5:-5, 5:-5], valid, rtol=0, atol=1e-12)
    assert valid.mean().item() == pytest.approx(ssim_score(first, second).item(), abs=1e-14)
    assert SSIMLoss()(first, second).item() == pytest.approx((1 - ssim(first, second)).mean().item(), abs=1e-14)


def numpy_ms_ssim(first, second):
    # Wang et al. 2003 written directly: a 2-D Gaussian window over every full 11x11 patch, 2x2 means between scales
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / g.sum() ** 2

    def local_mean(image):
        return np.einsum("...ijkl,kl->...ij", sliding_window_view(image, (11, 11), axis=(-2, -1)), window)

    def halve(image):
        h, w = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
        return image[..., :h, :w].reshape(*image.shape[:-2], h // 2, 2, w // 2, 2).mean(axis=(-3, -1))

    values = []
    for scale in range(5):
        if scale:
            first, second = halve(first), halve(second)
        mu1, mu2 = local_mean(first), local_mean(second)
        var1 = local_mean(first * first) - mu1**2
        var2 = local_mean(second * second) - mu2**2
        cov = local_mean(first * second) - mu1 * mu2
        cs = (2 * cov + 0.03**2) / (var1 + var2 + 0.03**2)
        lum = (2 * mu1 * mu2 + 0.01**2) / (mu1**2 + mu2**2 + 0.01**2)
        values.append((cs * lum if scale == 4 else cs).reshape(len(first), -1).mean(axis=1))
    return np.prod(np.maximum(np.stack(values, axis=1), 0) ** np.array(MS_SSIM_WEIGHTS), axis=1)


def test_ms_ssim_matches_a_direct_computation():
    first, second = image_pair((2, 3, 178, 181))
    expected = numpy_ms_ssim(first.numpy(), second.numpy())
    assert ms_ssim(first, second).numpy() == pytest.approx(expected, abs=1e-12)
    assert 0.3 < expected.min() and expected.max() < 0.99
    # one scale is SSIM itself
    assert ms_ssim(first, second, weights=(1.0,)).numpy() == pytest.approx(ssim_score(first, second).numpy(), abs=1e-14)
    with pytest.raises(ValueError, match="at least 176 pixels"):
        ms_ssim(first[..., :175, :], second[..., :175, :])


def test_ciede2000_reproduces_the_published_pairs():
    lab1, lab2 = torch.tensor(SHARMA_PAIRS[:, :3]), torch.tensor(SHARMA_PAIRS[:, 3:6])
    published = SHARMA_PAIRS[:, 6]
    assert np.abs(ciede2000(lab1, lab2).numpy() - published).max() < 1e-4
    assert np.abs(ciede2000(lab2, lab1).numpy() - published).max() < 1e-4
    assert ciede2000(lab1, lab2).numpy() == pytest.approx(deltaE_ciede2000(SHARMA_PAIRS[:, :3], SHARMA_PAIRS[:, 3:6]),
                                                           abs=1e-10)
    # per pixel of (B, 3, H, W) images
    grid = torch.tensor(SHARMA_PAIRS[:, :6]).T.reshape(6, 2, 17).unsqueeze(0)
    assert ciede2000(grid[:, :3], grid[:, 3:]).reshape(-1).numpy() == pytest.approx(published, abs=1e-4)


def test_srgb_to_lab_and_per_pixel_differences():
    assert srgb_to_lab(torch.ones(1, 3, dtype=torch.float64))[0].tolist() == pytest.approx([100, 0, 0], abs=1e-4)
    assert srgb_to_lab(torch.zeros(1, 3, dtype=torch.float64))[0].tolist() == pytest.approx([0, 0, 0], abs=1e-12)
    first, second = image_pair((1, 3, 12, 10))
    rgb = first[0].permute(1, 2, 0).numpy()
    xyz = srgb_to_xyz(first)[0].permute(1, 2, 0).numpy()
    # scikit-image's matrix has fewer digits
    assert np.abs(xyz - rgb2xyz(rgb)).max() < 1e-4
    lab = srgb_to_lab(first)[0].permute(1, 2, 0).numpy()
    assert np.abs(lab - xyz2lab(xyz, illuminant="D65", observer="2")).max() < 1e-10
    assert np.abs(lab - rgb2lab(rgb)).max() < 0.02
    expected = deltaE_ciede2000(lab, srgb_to_lab(second)[0].permute(1, 2, 0).numpy())
    assert delta_e2000(first, second)[0].numpy() == pytest.approx(expected, abs=1e-10)
    assert delta_e2000(first, first).abs().max().item() == 0
    grey = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float64)
    assert luminance(grey)[0, 0, 0].item() == pytest.approx(((0.5 + 0.055) / 1.055) ** 2.4, rel=1e-6)


def test_mura_band_share_on_images_with_known_frequencies():
    height, width = 64, 96
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64) / height,
                          torch.arange(width, dtype=torch.float64) / width, indexing="ij")
    inside = 0.04 * torch.cos(2 * math.pi * (3 * y + 4 * x))  # 5 cycles per image: in the 1-8 band
    edge = 0.02 * torch.sin(2 * math.pi * 8 * x)  # 8 cycles: the band's edge counts
    outside = 0.03 * torch.cos(2 * math.pi * (6 * y + 8 * x)) + 0.05 * torch.sin(2 * math.pi * 20 * x)  # 10, 20
    image = (0.5 + inside + edge + outside).unsqueeze(0)
    band = 0.04**2 + 0.02**2
    assert mura_band_share(image).item() == pytest.approx(band / (band + 0.03**2 + 0.05**2), rel=1e-12)
    # the band's mean square (Parseval), the DC level of 0.5 left out
    assert mura_band_power(image).item() == pytest.approx(band / 2, rel=1e-12)
    assert mura_band_share(image, band=(9, 12)).item() == pytest.approx(0.03**2 / (band + 0.03**2 + 0.05**2), rel=1e-12)
    assert mura_band_share(torch.full((1, 16, 16), 0.3, dtype=torch.float64)).item() == 0
    assert mura_band_share(0.5 + outside.unsqueeze(0)).item() == pytest.approx(0, abs=1e-20)


def torchvision_features(net):
    # the network's feature layers alone: its classifier (most of VGG's weights) is never initialised
    with torch.device("meta"):
        features = LPIPS_NETS[net][0](weights=None).features
    return features.to_empty(device="cpu")


def random_lpips_states(net, seed=0):
    # a randomly initialised torchvision trunk and positive random heads, as files would hold them
    torch.manual_seed(seed)
    features = torchvision_features(net)
    for module in features.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()
    trunk = {f"features.{key}": value for key, value in features.state_dict().items()}
    channels = LPIPS_NETS[net][2]
    heads = {f"lin{index}.model.1.weight": torch.rand(1, width, 1, 1) for index, width in enumerate(channels)}
    return trunk, heads


def reference_lpips(net, trunk, heads, first, second):
    # hooks on torchvision's own network at the end of each compared stage, and the LPIPS formula by hand
    ends = LPIPS_NETS[net][1]
    features = torchvision_features(net)
    features.load_state_dict({key[len("features."):]: value for key, value in trunk.items()})
    taken = []
    for end in ends:
        features[end - 1].register_forward_hook(lambda module, inputs, output: taken.append(output.clone()))
    shift = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)
    with torch.no_grad():
        features((2 * first - 1 - shift) / scale)
        features((2 * second - 1 - shift) / scale)
    total = 0
    for index, (one, two) in enumerate(zip(taken[: len(ends)], taken[len(ends):])):
        one = one / (torch.linalg.vector_norm(one, dim=1, keepdim=True) + 1e-10)
        two = two / (torch.linalg.vector_norm(two, dim=1, keepdim=True) + 1e-10)
        weight = heads[f"lin{index}.model.1.weight"].reshape(1, -1, 1, 1)
        total = total + ((one - two) ** 2 * weight).sum(dim=1).mean(dim=(1, 2))
    return total


@pytest.mark.parametrize("net,size", [("alex", 64), ("vgg", 32), ("squeeze", 48)])
def test_lpips_matches_a_direct_computation(net, size):
    trunk, heads = random_lpips_states(net)
    model = LpipsModel(net).load_trunk(trunk, "trunk").load_heads(heads, "heads")
    first, second = (image.float() for image in image_pair((2, 3, size, size)))
    distance = model(first, second)
    expected = reference_lpips(net, trunk, heads, first, second)
    assert distance.shape == (2,) and distance.min() > 0
    assert torch.allclose(distance, expected, rtol=1e-5, atol=0)
    assert model(first, first).abs().max().item() == 0
    with pytest.raises(BackboneError, match="does not hold the LPIPS v0.1 heads"):
        model.load_heads({"lin0.model.1.weight": torch.rand(1, 3, 1, 1)}, "bad.pth")


def test_lpips_files_come_from_the_backbone_folder(tmp_path, monkeypatch):
    assert choose_lpips_net(None, tmp_path) is None and choose_lpips_net(False, tmp_path) is None
    with pytest.raises(BackboneError) as error:
        choose_lpips_net("alex", tmp_path)
    message = str(error.value)
    assert "alexnet-owt-7be5be79.pth" in message and str(tmp_path) in message
    assert "python tools/backbones.py --download alexnet-owt-7be5be79.pth lpips_alex_v0.1.pth" in message
    with pytest.raises(ConfigError, match="alex, vgg, squeeze"):
        choose_lpips_net("resnet", tmp_path)
    trunk, heads = random_lpips_states("alex")
    torch.save(trunk, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(heads, tmp_path / "lpips_alex_v0.1.pth")
    assert choose_lpips_net(None, tmp_path) == "alex"
    # the files are checked against the manifest's hashes: random weights are refused
    with pytest.raises(BackboneError, match="hash does not match"):
        load_lpips("alex", tmp_path)
    for entry in registry.LPIPS_FILES["alex"]:
        monkeypatch.setitem(entry, "sha256", None)
        monkeypatch.setitem(entry, "sha256_prefix", None)
    model = load_lpips("alex", tmp_path)
    first, second = (image.float() for image in image_pair((1, 3, 64, 64)))
    expected = LpipsModel("alex").load_trunk(trunk, "trunk").load_heads(heads, "heads")(first, second)
    assert torch.equal(model(first, second), expected)
    # the reconstruction block takes the network whose files are present
    meter = ReconstructionMeter(lpips=None, backbone_dir=tmp_path)
    meter({"image": second}, {"reconstruction": first})
    summary = meter.summary()
    assert summary["lpips_net"] == "alex" and summary["lpips"] == pytest.approx(expected.item(), rel=1e-6)


def test_reconstruction_meter_averages_the_metrics_per_image():
    first, second = image_pair((3, 3, 176, 176))
    meter = ReconstructionMeter(lpips=False)
    meter({"image": first[:2]}, {"reconstruction": second[:2]})
    meter({"image": first[2:]}, {"reconstruction": second[2:]})
    # not a reconstruction of the input: features, another size, or none at all
    meter({"image": first}, {"reconstruction": second[:, :1]})
    meter({"image": first}, {"pred_score": torch.zeros(3)})
    summary = meter.summary()
    assert summary["images"] == 3
    a, b = first.float(), second.float()
    expected = {"psnr": psnr(b, a), "ssim": ssim_score(b, a), "ms_ssim": ms_ssim(b, a),
                "delta_e2000": delta_e2000(b, a).flatten(1).mean(dim=1),
                "mura_band_share": mura_band_share(luminance(a) - luminance(b))}
    for key, values in expected.items():
        assert summary[key] == pytest.approx(values.double().mean().item(), rel=1e-5), key
    assert "lpips" not in summary
    small = ReconstructionMeter(lpips=False)
    small({"image": first[..., :64, :64]}, {"reconstruction": first[..., :64, :64].clone()})
    assert small.summary()["psnr"] == 100.0 and small.summary()["ms_ssim"] is None


def test_reconstruction_models_record_display_metrics(tmp_path):
    write_square_panels(tmp_path / "panels", 6, [(2, (250, 30, 30)), (16, (250, 30, 30))])
    overrides = ["model=autoencoder", "model.depth=2", "model.latent_dim=4", "model.base_width=4", "hardware=cpu",
                 "hardware.threads=1", "transform.image_size=[32,32]", "trainer.max_epochs=1",
                 "trainer.progress_bar=false", "evaluation.save_images=false", "evaluation.efficiency=false",
                 "dataset=folder", f"dataset.root={tmp_path / 'panels'}", "dataset.abnormal_dir=bad",
                 "dataset.mask_dir=masks", "dataset.normal_test_ratio=0.34", f"paths.backbone_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        asked = compose("config", overrides=[*overrides, "evaluation.lpips=vgg"])
        tiled = compose("config", overrides=[*overrides, "tiling.tile_size=24", "tiling.stride=8"])
    record = run_experiment(cfg, tmp_path / "run", {"model": "autoencoder", "dataset": "folder"}, overrides, ROOT)
    block = record["reconstruction"]
    assert block["images"] == record["evaluation"]["test_images"] == 4
    assert 0 < block["psnr"] < 100 and 0 < block["ssim"] < 1 and block["delta_e2000"] > 0
    assert 0 <= block["mura_band_share"] <= 1 and block["ms_ssim"] is None and "lpips" not in block
    # tiled: the stitched reconstructions of whole images are judged, at the images' size
    record = run_experiment(tiled, tmp_path / "tiled", {"model": "autoencoder", "dataset": "folder"}, overrides, ROOT)
    assert record["reconstruction"]["images"] == 4 and "at 32x32" in record["reconstruction"]["note"]
    # asking for LPIPS without its files stops the run before any work
    with pytest.raises(BackboneError, match="vgg16-397923af.pth"):
        run_experiment(asked, tmp_path / "asked", {"model": "autoencoder", "dataset": "folder"}, [], ROOT)
    assert not (tmp_path / "asked" / "weights").exists()
