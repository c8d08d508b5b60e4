# tests/test_memory_banks.py
import torch
from torch.nn import functional as F

from defectvad.components import multi_variate_gaussian
from defectvad.components.memory_banks import stack_and_clear
from defectvad.components.multi_variate_gaussian import MultiVariateGaussian


def test_stack_and_clear_equals_vstack_and_empties_the_list():
    tensors = [torch.randn(n, 3, 2) for n in (4, 1, 5)]
    expected = torch.vstack(tensors)
    stacked = stack_and_clear(tensors)
    assert torch.equal(stacked, expected)
    assert tensors == []


def test_gaussian_in_chunks_equals_one_batch_of_positions(monkeypatch):
    torch.manual_seed(0)
    embedding = torch.randn(9, 5, 3, 4) + torch.randn(1, 5, 3, 4)
    vectors = embedding.reshape(9, 5, 12)
    centred = (vectors - vectors.mean(0)).permute(2, 0, 1)
    covariance = torch.bmm(centred.transpose(1, 2), centred) / 8 + (0.01 + 1e-5) * torch.eye(5)
    # 5 * (5 + 9) elements per position: 3 positions per chunk, the last chunk shorter
    monkeypatch.setattr(multi_variate_gaussian, "CHUNK_ELEMENTS", 5 * 14 * 3)
    mean, inv_covariance = MultiVariateGaussian().fit(embedding)
    assert torch.allclose(mean, vectors.mean(0))
    assert torch.allclose(inv_covariance, torch.linalg.inv(covariance), rtol=1e-5, atol=1e-6)
    assert torch.allclose(inv_covariance @ covariance, torch.eye(5).expand(12, 5, 5), atol=1e-4)


def test_padim_embedding_selects_channels_before_upsampling():
    from defectvad.models.padim.torch_model import PadimModel

    torch.manual_seed(0)
    model = PadimModel(backbone="resnet18", n_features=37).eval()
    features = model.feature_extractor(torch.randn(2, 3, 64, 64))
    size = features["layer1"].shape[-2:]
    full = torch.cat([F.interpolate(features[layer], size=size, mode="nearest") for layer in model.layers], 1)
    assert torch.equal(model.generate_embedding(features), full[:, model.idx])
