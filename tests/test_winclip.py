# tests/test_winclip.py
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from defectvad.errors import ConfigError
from defectvad.models.winclip.prompting import create_prompt_ensemble, object_word
from defectvad.models.winclip.scoring import harmonic_aggregation, make_masks
from defectvad.models.winclip.trainer import WinClipTrainer

# a 48x48 input on 16-pixel patches: a 3x3 grid, windows of 2x2 and 3x3 patches; byte-level prompts fit 77 tokens
TINY = dict(embed_dim=16, image_size=48, vision_width=32, vision_layers=2, text_width=32, text_heads=2, text_layers=1,
            vocab_size=514, vision_head_width=16)
GRID = 3


def tiny_trainer(tmp_path, k_shot=0, **kwargs):
    torch.manual_seed(0)
    trainer = WinClipTrainer(k_shot=k_shot, backbone_dir=tmp_path, clip_architecture=TINY, **kwargs)
    with torch.no_grad():
        # open_clip leaves the image tower's norms at 1 and 0: make them matter
        for name, tensor in trainer.model.clip.visual.named_parameters():
            if name.startswith("ln_"):
                tensor.add_(0.2 * torch.randn_like(tensor))
    return trainer


def windows_by_hand(grid, size):
    # the patch indices (row-major) of each window, windows in row-major order of their top-left patch
    return [[(top + r) * grid[1] + left + c for r in range(size) for c in range(size)]
            for top in range(grid[0] - size + 1) for left in range(grid[1] - size + 1)]


def test_window_masks_equal_a_hand_computation():
    for grid, size in [((3, 4), 2), ((4, 4), 3), ((2, 2), 2)]:
        assert make_masks(grid, size).T.tolist() == windows_by_hand(grid, size)
    with pytest.raises(ConfigError, match="3x3 patches does not fit the 2x4"):
        make_masks((2, 4), 3)


def test_harmonic_aggregation_on_a_hand_example():
    # 3x3 patches, four 2x2 windows: the centre patch is in all four, a corner in one
    scores = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), (3, 3), make_masks((3, 3), 2))
    expected = torch.tensor([[1.0, 2 / (1 + 4 / 3), 0.75], [2 / (1 + 2), 4 / (1 + 4 / 3 + 2 + 4), 2 / (4 / 3 + 4)],
                             [0.5, 2 / (2 + 4), 0.25]])
    torch.testing.assert_close(scores[0], expected)


def test_prompt_ensemble_and_object_words():
    normal, anomalous = create_prompt_ensemble("bottle")
    assert (len(normal), len(anomalous)) == (7 * 21, 4 * 21)
    assert normal[0] == "a cropped photo of the bottle."
    assert anomalous[0] == "a cropped photo of the damaged bottle."
    assert normal[-1] == "a photo of a bottle without damage for anomaly detection."
    # anomalib names the object by the category's folder name; readable words on request
    assert [object_word(c) for c in ("metal_nut", "pcb1", "01", None)] == ["metal_nut", "pcb1", "01", "object"]
    assert [object_word(c, readable=True) for c in ("metal_nut", "pcb3", "macaroni2", "02", "pipe_fryum", "bottle")] == [
        "metal nut", "printed circuit board", "macaroni", "object", "pipe fryum", "bottle"]


def test_class_name_sources_and_learning_type(tmp_path):
    trainer = tiny_trainer(tmp_path)
    assert (trainer.learning_type, trainer.model.k_shot) == ("zero_shot", 0)
    assert tiny_trainer(tmp_path, k_shot=None).learning_type == "zero_shot"
    assert tiny_trainer(tmp_path, k_shot=2).learning_type == "few_shot"
    mvtec = SimpleNamespace(NAME="MVTec AD", category="metal_nut")
    assert trainer.resolve_class_name(mvtec) == "metal_nut"
    assert trainer.resolve_class_name(SimpleNamespace(NAME="folder", category="custom", object_name="pcb")) == "pcb"
    assert trainer.resolve_class_name(SimpleNamespace(NAME="folder", category="custom", object_name=None)) == "object"
    assert trainer.resolve_class_name(SimpleNamespace()) == "object"
    assert tiny_trainer(tmp_path, object_words=True).resolve_class_name(mvtec) == "metal nut"
    assert tiny_trainer(tmp_path, class_name="gear").resolve_class_name(mvtec) == "gear"
    with pytest.raises(ConfigError, match="CLIP backbone, not resnet18"):
        WinClipTrainer(backbone="resnet18", backbone_dir=tmp_path, clip_architecture=TINY)
    with pytest.raises(ConfigError, match="integer >= 0"):
        WinClipTrainer(k_shot=-1, backbone_dir=tmp_path, clip_architecture=TINY)


def test_config_selects_its_clip_backbone_and_reads_k_shot():
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["model=winclip", "dataset.k_shot=1"])
        assert (cfg.backbone.name, cfg.model.k_shot, list(cfg.model.scales)) == ("clip_vit_b16_plus_240", 1, [2, 3])
        preset = compose("config", overrides=["experiment=winclip"])
        assert (preset.backbone.name, list(preset.transform.image_size)) == ("clip_vit_b16_plus_240", [240, 240])


def encode_window(visual, images, patches):
    # the class token and the chosen patch tokens, each with its position embedding, through the whole tower
    tokens = visual.conv1(images).flatten(2).transpose(1, 2) + visual.positional_embedding[1:]
    cls = (visual.class_embedding + visual.positional_embedding[0]).expand(images.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, tokens[:, patches]], dim=1))
    for block in visual.transformer.resblocks:
        x = block(x)
    return visual.ln_post(x)


def anomalous_probability(embeddings, text):
    similarity = F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).T
    return (similarity / 0.07).softmax(-1)[..., 1]


def harmonic_by_hand(window_scores, size):
    # per patch: the number of windows covering it over the sum of their inverse scores
    windows = windows_by_hand((GRID, GRID), size)
    result = torch.zeros(window_scores.shape[0], GRID * GRID)
    for patch in range(GRID * GRID):
        covering = [w for w, members in enumerate(windows) if patch in members]
        result[:, patch] = len(covering) / sum(1 / window_scores[:, w] for w in covering)
    return result.reshape(-1, GRID, GRID)


def zero_shot_by_hand(model, images):
    clip = model.clip
    normal, anomalous = create_prompt_ensemble("cap")
    text = torch.stack([clip.encode_text(model.tokenizer(normal)).mean(0), clip.encode_text(model.tokenizer(anomalous)).mean(0)])
    image_scores = anomalous_probability(clip.encode_image(images), text)
    scales = [image_scores.view(-1, 1, 1).expand(-1, GRID, GRID)]
    for size in (2, 3):
        windows = windows_by_hand((GRID, GRID), size)
        embeddings = torch.stack([encode_window(clip.visual, images, w)[:, 0] @ clip.visual.proj for w in windows], 1)
        scales.append(harmonic_by_hand(anomalous_probability(embeddings, text), size))
    return text, image_scores, 3 / sum(1 / s for s in scales)


def nearest_distance(queries, references):
    # brute force: half the cosine distance of each query to every reference vector, the smallest
    result = torch.empty(queries.shape[:2])
    for b in range(queries.shape[0]):
        for q in range(queries.shape[1]):
            result[b, q] = min((1 - F.cosine_similarity(queries[b, q], r, dim=0)) / 2 for r in references)
    return result


def few_shot_by_hand(model, images, references):
    visual = model.clip.visual
    full = list(range(GRID * GRID))
    patches = encode_window(visual, images, full)[:, 1:]
    reference_patches = encode_window(visual, references, full)[:, 1:].reshape(-1, patches.shape[-1])
    scales = [nearest_distance(patches, reference_patches).reshape(-1, GRID, GRID)]
    for size in (2, 3):
        windows = windows_by_hand((GRID, GRID), size)
        embed = lambda x: torch.stack([encode_window(visual, x, w)[:, 0] @ visual.proj for w in windows], 1)  # noqa: E731
        distances = nearest_distance(embed(images), embed(references).reshape(-1, visual.proj.shape[1]))
        scales.append(harmonic_by_hand(distances, size))
    return sum(scales) / 3


@torch.no_grad()
def test_zero_shot_and_few_shot_scores_equal_independent_computations(tmp_path, single_thread):
    torch.manual_seed(3)
    images, references = torch.randn(2, 3, 48, 48), torch.randn(2, 3, 48, 48)
    dataset = SimpleNamespace(NAME="MVTec AD", category="cap")

    zero = tiny_trainer(tmp_path)
    zero.prepare(SimpleNamespace(dataset=dataset))
    text, image_scores, zero_map = zero_shot_by_hand(zero.model, images)
    # prompts cut behind their longest end token encode as at the full 77-token context
    torch.testing.assert_close(zero.model._text_embeddings, text, rtol=1e-5, atol=1e-6)
    outputs = zero.model.eval()(images)
    torch.testing.assert_close(outputs.pred_score, image_scores, rtol=1e-5, atol=1e-6)
    expected_map = F.interpolate(zero_map.unsqueeze(1), size=(48, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(outputs.anomaly_map, expected_map, rtol=1e-5, atol=1e-6)
    # the prompts are encoded once per class name
    zero.model.collect_text_embeddings = None
    zero.prepare(SimpleNamespace(dataset=dataset))

    few = tiny_trainer(tmp_path, k_shot=2)
    few.model.train()
    few.training_step({"image": references[:1]}, 0)
    few.training_step({"image": references[1:]}, 1)
    few.on_train_epoch_end()
    few.prepare(SimpleNamespace(dataset=dataset))
    assert few.model._patch_embeddings.shape == (2, GRID * GRID, 32)
    assert [v.shape[:2] for v in few.model.visual_embeddings] == [(2, 4), (2, 1)]
    outputs = few.model.eval()(images)
    few_map = few_shot_by_hand(few.model, images, references)
    torch.testing.assert_close(outputs.pred_score, (image_scores + few_map.amax(dim=(1, 2))) / 2, rtol=1e-5, atol=1e-6)
    expected_map = F.interpolate(((zero_map + few_map) / 2).unsqueeze(1), size=(48, 48), mode="bilinear")
    torch.testing.assert_close(outputs.anomaly_map, expected_map, rtol=1e-5, atol=1e-6)


def test_k_shot_zero_means_zero_shot_and_is_refused_where_images_are_needed(tmp_path):
    from defectvad.experiment import resolve_k_shot

    assert resolve_k_shot(tiny_trainer(tmp_path, k_shot=0), 0) is None
    assert resolve_k_shot(tiny_trainer(tmp_path, k_shot=2), 2) == 2
    with pytest.raises(ConfigError, match="one-class and needs training images: dataset.k_shot=0 leaves none"):
        resolve_k_shot(SimpleNamespace(learning_type="one_class", default_k_shot=None), 0)
