# tests/test_ensemble.py
import csv
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError
from defectvad.experiment import run_experiment
from defectvad.inference.runs import TrainedRun
from defectvad.models.ensemble.calibration import MemberCalibration
from defectvad.models.ensemble.fusion import MemberFusion, choose_weights, fit_logistic, simplex_grid
from defectvad.models.ensemble.members import MemberInput, check_member_folders, check_same_data
from defectvad.models.ensemble.torch_model import EnsembleModel
from fakes import write_square_panels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def normals(count=11, members=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 1.5, (members, count)) + np.arange(members)[:, None] * 10


def test_zscore_and_percentile_calibration_against_numpy():
    reference = normals()
    values = torch.tensor([[0.5, 12.0], [3.0, 25.0], [9.0, 10.5]], dtype=torch.float64)
    zscore = MemberCalibration(2, "zscore").double().fit(reference)
    expected = (values.numpy() - reference.mean(axis=1)) / reference.std(axis=1)
    np.testing.assert_allclose(zscore(values).numpy(), expected, rtol=1e-9)
    percentile = MemberCalibration(2, "percentile", quantile=0.9).double().fit(reference)
    median = np.median(reference, axis=1)
    expected = (values.numpy() - median) / (np.quantile(reference, 0.9, axis=1) - median)
    np.testing.assert_allclose(percentile(values).numpy(), expected, rtol=1e-9)
    # maps: the member axis is dim 1, each member on its own statistics
    maps = values[:, :, None, None].expand(3, 2, 2, 3)
    np.testing.assert_allclose(percentile(maps)[:, :, 1, 2].numpy(), expected, rtol=1e-9)


def test_rank_is_the_interpolated_position_among_normal_values():
    # with 11 normals their quantile curve breaks at multiples of 1/10, points of the 1001-grid: exact
    reference = normals(count=11)
    calibration = MemberCalibration(2, "zscore").double().fit(reference)
    values = torch.tensor([[-5.0, 9.0], [2.2, 12.5], [4.0, 14.0], [99.0, 30.0]], dtype=torch.float64)
    ranks = calibration.rank(values).numpy()
    for member in range(2):
        expected = np.interp(values[:, member].numpy(), np.sort(reference[member]), np.linspace(0, 1, 11))
        np.testing.assert_allclose(ranks[:, member], expected, atol=1e-9)
    assert ranks[0, 0] == 0 and ranks[3, 0] == 1


def test_fusion_rules_against_direct_computation():
    calibrated = torch.tensor([[0.2, 1.5, -0.5], [2.0, -1.0, 0.5]])
    ranks = torch.tensor([[0.1, 0.9, 0.4], [1.0, 0.0, 0.6]])
    fused = {rule: MemberFusion(3, rule) for rule in ("mean", "max", "weighted", "rank", "logistic")}
    fused["weighted"].weights.copy_(torch.tensor([0.5, 0.3, 0.2]))
    fused["logistic"].coef.copy_(torch.tensor([1.0, -2.0, 0.5]))
    fused["logistic"].intercept.fill_(0.25)
    expected = {"mean": [1.2 / 3, 1.5 / 3], "max": [1.5, 2.0], "weighted": [0.1 + 0.45 - 0.1, 1.0 - 0.3 + 0.1],
                "rank": [1.4 / 3, 1.6 / 3], "logistic": [0.2 - 3.0 - 0.25 + 0.25, 2.0 + 2.0 + 0.25 + 0.25]}
    for rule, module in fused.items():
        torch.testing.assert_close(module(calibrated, ranks), torch.tensor(expected[rule]), rtol=1e-6, atol=1e-6)
    # maps: the same per pixel
    maps = calibrated[:, :, None, None].expand(2, 3, 4, 5)
    torch.testing.assert_close(fused["weighted"](maps)[:, 3, 4], torch.tensor(expected["weighted"]))


def test_weights_are_the_grid_best_by_auroc_and_logistic_trusts_the_informative_member():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 30)
    good = labels * 1.0 + rng.normal(0, 0.6, 60)
    noise = rng.normal(0, 1, 60)
    partial = labels * 0.5 + rng.normal(0, 0.6, 60)
    values = np.stack([noise, good, partial], axis=1)
    weights, found = choose_weights(values, labels, 0.1)
    grid = list(simplex_grid(3, 0.1))
    assert len(grid) == 66
    best = max(roc_auc_score(labels, values @ w) for w in grid)
    assert found == pytest.approx(best, abs=1e-12)
    assert roc_auc_score(labels, values @ weights) == pytest.approx(best, abs=1e-12)
    assert weights[0] < weights[1]
    # a tie keeps equal weights
    perfect = np.stack([labels * 1.0, labels * 2.0], axis=1)
    np.testing.assert_allclose(choose_weights(perfect, labels, 0.1)[0], [0.5, 0.5])
    coef, _ = fit_logistic(values, labels)
    assert coef[1] > 1.0 and abs(coef[0]) < coef[1] / 2


class FakeMember(nn.Module):
    # score: the mean of the first channel times a factor; map: the first channel
    def __init__(self, factor):
        super().__init__()
        self.register_buffer("factor", torch.tensor(float(factor)))

    def forward(self, images):
        maps = images[:, :1] * self.factor
        return InferenceBatch(pred_score=maps.mean(dim=(1, 2, 3)), anomaly_map=maps)


def member_input(size, normalize):
    transform = SimpleNamespace(image_size=[size, size], interpolation="bilinear", mean=(0.5, 0.4, 0.3),
                                std=(0.2, 0.25, 0.3))
    return MemberInput(transform, normalize)


def test_members_of_other_sizes_are_resampled_calibrated_and_fused():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16)
    model = EnsembleModel([FakeMember(1.0), FakeMember(3.0)], [member_input(16, False), member_input(8, True)],
                          (16, 16), "zscore", fusion="mean", map_fusion="max")
    model.score_calibration.fit([np.array([0.4, 0.5, 0.6]), np.array([1.0, 2.0, 4.0])])
    model.map_calibration.fit([np.array([0.0, 1.0]), np.array([-1.0, 3.0])])
    outputs = model(images)
    small = TF.normalize(TF.resize(images, [8, 8], antialias=True), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])[:, :1] * 3
    score_a, score_b = images[:, 0].mean(dim=(1, 2)), small.mean(dim=(1, 2, 3))
    map_b = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False)
    z = lambda v, r: (v - np.mean(r)) / np.std(r)  # noqa: E731
    expected_score = (z(score_a, [0.4, 0.5, 0.6]) + z(score_b, [1.0, 2.0, 4.0])) / 2
    expected_map = torch.maximum(z(images[:, :1], [0.0, 1.0]), z(map_b, [-1.0, 3.0]))
    torch.testing.assert_close(outputs.pred_score, expected_score.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs.anomaly_map, expected_map.float(), rtol=1e-5, atol=1e-5)
    # its state is calibration and fusion alone, and loads back
    state = model.state_dict()
    assert state and not any(key.startswith("members.") for key in state)
    fresh = EnsembleModel([FakeMember(1.0), FakeMember(3.0)], [member_input(16, False), member_input(8, True)],
                          (16, 16), "zscore", fusion="mean", map_fusion="max")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(images).pred_score, outputs.pred_score)
    with pytest.raises(RuntimeError, match="missing keys"):
        fresh.load_state_dict({key: value for key, value in state.items() if "score_" not in key})


def write_run(folder, status="ok", dataset="panel", category="plain", weights=True):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"status": status, "run": {"dataset": dataset,
                                                                                 "category": category}}))
    (folder / "config.yaml").write_text("model: {}\n")
    if weights:
        (folder / "weights").mkdir()
        (folder / "weights" / "last.safetensors").write_bytes(b"")
    return folder


def test_missing_failed_and_mixed_members_are_refused(tmp_path):
    good = write_run(tmp_path / "good")
    with pytest.raises(ConfigError, match=r"missing \(the folder does not exist\)"):
        check_member_folders([good, tmp_path / "missing"])
    failed = write_run(tmp_path / "failed", status="failed")
    with pytest.raises(ConfigError, match="status 'failed', not 'ok'"):
        check_member_folders([good, failed])
    empty = write_run(tmp_path / "empty", weights=False)
    with pytest.raises(ConfigError, match="no weights/best.safetensors or weights/last.safetensors"):
        check_member_folders([good, empty])
    with pytest.raises(ConfigError, match="2 to 4 run folders"):
        check_member_folders([good])
    assert check_member_folders([good, write_run(tmp_path / "other")]) == [good.resolve(),
                                                                          (tmp_path / "other").resolve()]

    def fake(name, dataset, category):
        return SimpleNamespace(run_dir=tmp_path / name, cfg=SimpleNamespace(dataset={"root": f"/data/{dataset}"}),
                               record={"run": {"dataset": dataset, "category": category}})

    same = [fake("a", "panel", "plain"), fake("b", "panel", "plain")]
    check_same_data(same, False)
    mixed = [fake("a", "panel", "plain"), fake("b", "panel", "stripe")]
    with pytest.raises(ConfigError, match="different data sets.*model.allow_mixed=true"):
        check_same_data(mixed, False)
    check_same_data(mixed, True)


def test_a_tiled_member_is_refused():
    from omegaconf import OmegaConf

    from defectvad.models.ensemble.members import check_member_input

    cfg = OmegaConf.create({"transform": {"center_crop": None}, "tiling": {"tile_size": 32}})
    tiled = SimpleNamespace(run_dir="runs/tiled", cfg=cfg, tiler=object(), model=None, trainer=None)
    with pytest.raises(ConfigError, match="runs/tiled is a tiled run \\(tiling.tile_size=32\\)"):
        check_member_input(tiled)


@pytest.fixture(scope="module")
def panels(tmp_path_factory):
    red = (250, 30, 30)
    return write_square_panels(tmp_path_factory.mktemp("panels"), 16, [(2, red), (12, red), (20, red)])


def small_run(panels, model):
    return ["hardware=cpu", "hardware.threads=1", "trainer.progress_bar=false", "backbone=resnet18",
            "backbone.pretrained=false", "evaluation.save_images=false", "evaluation.efficiency=false",
            "dataset=folder", f"dataset.root={panels}", "dataset.abnormal_dir=bad", "dataset.mask_dir=masks",
            "dataset.normal_test_ratio=0.25", "evaluation.holdout=4", f"model={model}"]


def run(panels, run_dir, model, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*small_run(panels, model), *overrides])
    return run_experiment(cfg, run_dir, {"model": model, "dataset": "folder"}, list(overrides), ROOT)


def test_an_ensemble_of_two_runs_end_to_end(panels, tmp_path):
    padim = tmp_path / "padim"
    run(panels, padim, "padim", "transform.image_size=[32,32]")
    patchcore = tmp_path / "patchcore"
    run(panels, patchcore, "patchcore", "transform.image_size=[24,24]")
    members = f"model.members=['{padim}','{patchcore}']"
    record = run(panels, tmp_path / "ensemble", "ensemble", members, "transform.image_size=[32,32]",
                 "model.fusion=weighted", "model.map_fusion=rank")
    assert record["status"] == "ok"
    assert all(0 <= value <= 1 for value in record["metrics"].values())
    summary = record["model"]
    assert [member["model"] for member in summary["members"]] == ["padim", "patchcore"]
    assert summary["members"][0]["metrics"] == json.loads((padim / "metrics.json").read_text())["metrics"]
    # at its own size a member scores the test images as in its own run; the other is resampled
    in_run = summary["members"][0]["metrics_in_this_run"]
    assert in_run == pytest.approx(summary["members"][0]["metrics"], abs=1e-6)
    assert set(summary["members"][1]["metrics_in_this_run"]) == set(record["metrics"])
    assert summary["calibration_images"] == 4 and summary["validation"]["images"] == 8
    assert sum(summary["fusion"]["image"]["weights"]) == pytest.approx(1)
    # predict rebuilds it from its folder and the members' and scores the test images as the run did
    rebuilt = TrainedRun(tmp_path / "ensemble")
    with open(tmp_path / "ensemble" / "test_scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    from defectvad.inference.predictions import predict_files

    found = {str(path): score for path, _, score, _ in predict_files(rebuilt, [Path(r["image_path"]) for r in rows],
                                                                    8, [])}
    np.testing.assert_allclose([found[r["image_path"]] for r in rows], [float(r["pred_score"]) for r in rows],
                               rtol=1e-5, atol=1e-6)
    # calibrating on images a member was fitted on is refused
    with pytest.raises(ConfigError, match="were used to fit member"):
        run(panels, tmp_path / "leaky", "ensemble", members, "seed=3")
    # so is running it on other images than the members were trained on
    other = tmp_path / "other_panels"
    shutil.copytree(panels, other)
    with pytest.raises(ConfigError, match="runs on other data than member .*model.allow_mixed=true"):
        run(panels, tmp_path / "elsewhere", "ensemble", members, f"dataset.root={other}")


def test_members_given_as_configs_are_trained_first_inside_the_ensemble_run(panels, tmp_path):
    from defectvad.sweeps.folders import find_runs

    # as run.py passes them: every override of the run (Hydra's task overrides)
    overrides = [*small_run(panels, "ensemble"), "transform.image_size=[32,32]", "model.fusion=max",
                 "model.members=[padim,'patchcore transform.image_size=[24,24]']"]
    run_dir = tmp_path / "sweep" / "ensemble"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        record = run_experiment(cfg, run_dir, {"model": "ensemble", "dataset": "folder"}, overrides, ROOT)
        with pytest.raises(ConfigError, match="ensemble member padim .*model.not_a_key"):
            cfg = compose("config", overrides=[*overrides[:-1], "model.members=[patchcore,'padim model.not_a_key=1']"])
            run_experiment(cfg, tmp_path / "bad", {"model": "ensemble", "dataset": "folder"}, overrides, ROOT)
        # a misspelt name stops the run before any member is trained
        with pytest.raises(ConfigError, match="'padimm' is neither a usable run folder .* \\(did you mean padim\\?\\)"):
            cfg = compose("config", overrides=[*overrides[:-1], "model.members=[patchcore,padimm]"])
            run_experiment(cfg, tmp_path / "typo", {"model": "ensemble", "dataset": "folder"}, overrides, ROOT)
        assert not (tmp_path / "typo" / "members").exists()
        with pytest.raises(ConfigError, match="model.members must list 2 to 4"):
            cfg = compose("config", overrides=[*overrides[:-1], "model.members=[padim,patchcore,dfm,dfkde,padim]"])
            run_experiment(cfg, tmp_path / "five", {"model": "ensemble", "dataset": "folder"}, overrides, ROOT)
        assert not (tmp_path / "five" / "members").exists()
    assert record["status"] == "ok"
    folders = [run_dir / "members" / "1-padim", run_dir / "members" / "2-patchcore"]
    members = [json.loads((folder / "metrics.json").read_text()) for folder in folders]
    assert [member["status"] for member in members] == ["ok", "ok"]
    assert [member["metrics"] for member in members] == [m["metrics"] for m in record["model"]["members"]]
    # each member composed from the ensemble's settings (data, holdout, seed, size) and its own overrides
    configs = [read_saved_config(folder) for folder in folders]
    assert [c["model"]["_target_"].rsplit(".", 1)[1] for c in configs] == ["PadimTrainer", "PatchcoreTrainer"]
    assert [c["transform"]["image_size"] for c in configs] == [[32, 32], [24, 24]]
    assert all(c["evaluation"]["holdout"] == 4 and c["dataset"]["root"] == str(panels) for c in configs)
    # the run's config names the trained folders, so it is rebuilt (and scores) as an ensemble of folders is
    assert read_saved_config(run_dir)["model"]["members"] == [str(folder) for folder in folders]
    again = run(panels, tmp_path / "again", "ensemble", "transform.image_size=[32,32]", "model.fusion=max",
                f"model.members=['{folders[0]}','{folders[1]}']")
    assert again["metrics"] == record["metrics"]
    # the members are part of the ensemble's run, not rows of the sweep's tables
    assert [path.parent for path, _ in find_runs(tmp_path / "sweep")] == [run_dir]


def read_saved_config(folder):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))


def test_tools_ensemble_writes_the_top_k_experiment(tmp_path):
    spec = importlib.util.spec_from_file_location("ensemble_tool", ROOT / "tools" / "ensemble.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    sweep = tmp_path / "sweep"
    for name, value in (("a", 0.6), ("b", 0.9), ("c", 0.7), ("d", 0.8)):
        folder = write_run(sweep / name)
        record = json.loads((folder / "metrics.json").read_text())
        record["run"].update(model=name, backbone="resnet18", image_size=[32, 32] if name != "c" else [48, 40])
        record["metrics"] = {"image_auroc": value}
        (folder / "metrics.json").write_text(json.dumps(record))
        (folder / "config.yaml").write_text(
            "seed: 1\ntransform: {image_size: %s}\nevaluation: {holdout: 4}\nloader: {train_batch_size: 8, "
            "eval_batch_size: 8}\ndataset: {_target_: x, root: /r, category: plain}\n"
            "backbone: {name: resnet18, pretrained: %s}\n"
            % ("[32, 32]" if name != "c" else "[48, 40]", "false" if name == "d" else "true"))
    write_run(sweep / "e", status="failed")
    assert tool.main([str(sweep), "--top-k", "3", "--fusion", "rank", "--name", "top"]) == 0
    from omegaconf import OmegaConf

    written = OmegaConf.load(sweep / "configs" / "experiment" / "top.yaml")
    assert [Path(member).name for member in written.model.members] == ["b", "d", "c"]
    assert (written.evaluation.holdout, written.seed, list(written.transform.image_size)) == (4, 1, [48, 40])
    # d trained a random backbone: the ensemble's is random too
    assert written.model.fusion == "rank" and written.backbone.pretrained is False
    assert "override /backbone: resnet18" in (sweep / "configs" / "experiment" / "top.yaml").read_text()
    assert tool.main([str(sweep / "missing")]) == 1
