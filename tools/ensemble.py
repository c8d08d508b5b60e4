# tools/ensemble.py
# the top k runs of a sweep folder by a metric, written as an experiment file (conf/experiment style) for
# model=ensemble, with the command that runs it
import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from defectvad.errors import DefectVADError  # noqa: E402
from defectvad.records import METRIC_KEYS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def find_candidates(folder, metric):
    # finished runs below the folder that an ensemble can take: (score, run folder, record, config)
    from omegaconf import OmegaConf

    from defectvad.inference.runs import find_run_problems
    from defectvad.sweeps.folders import find_runs

    found, skipped = [], []
    for path, record in find_runs(folder):
        run_dir = path.parent
        run = (record or {}).get("run") or {}
        value = ((record or {}).get("metrics") or {}).get(metric)
        problems = find_run_problems(run_dir)
        if run.get("model") == "ensemble":
            continue
        if problems or value is None:
            skipped.append(f"{run_dir.name}: {'; '.join(problems) or f'no {metric}'}")
            continue
        cfg = OmegaConf.load(run_dir / "config.yaml")
        if not cfg.evaluation.holdout:
            skipped.append(f"{run_dir.name}: no held-out normal images (evaluation.holdout=0)")
            continue
        found.append((float(value), run_dir, record, cfg))
    return found, skipped


def choose_members(candidates, top_k, dataset, category):
    if dataset:
        candidates = [c for c in candidates if c[2]["run"].get("dataset") == dataset]
    if category:
        candidates = [c for c in candidates if str(c[2]["run"].get("category")) == category]
    groups = sorted({(c[2]["run"].get("dataset"), str(c[2]["run"].get("category"))) for c in candidates})
    if len(groups) > 1:
        listed = ", ".join(f"{d}/{c}" for d, c in groups)
        raise DefectVADError(f"the sweep holds runs of several data sets or categories ({listed}); choose one with "
                             f"--dataset and --category")
    ranked = sorted(candidates, key=lambda c: (-c[0], str(c[1])))[:top_k]
    if len(ranked) < max(2, top_k):
        raise DefectVADError(f"{len(ranked)} usable runs where {top_k} are wanted; an ensemble takes 2 to 4 runs "
                             f"that finished ok with evaluation.holdout > 0")
    holdouts = {(c[3].evaluation.holdout, c[3].seed) for c in ranked}
    if len(holdouts) > 1:
        raise DefectVADError(f"the top {top_k} runs held out different normal images (evaluation.holdout, seed: "
                             f"{sorted(holdouts)}); the ensemble calibrates on images none of them was fitted on")
    return ranked


def describe_member(rank, member, metric):
    value, run_dir, record, _ = member
    run = record["run"]
    return f"#   {rank}. {run.get('model')} ({run.get('backbone')}, {run.get('image_size')}) {metric} {value:.4f}"


def write_experiment(members, metric, args, sweep):
    from omegaconf import OmegaConf

    cfgs = [member[3] for member in members]
    records = [member[2] for member in members]
    # the largest member size: each member's map is resampled to it
    sizes = [(size, size) if isinstance(size, int) else tuple(size)
             for size in (cfg.transform.image_size for cfg in cfgs)]
    size = [max(s[0] for s in sizes), max(s[1] for s in sizes)]
    # the ensemble's own backbone only names the run and gives grading its region features: the members' own
    # when they share one (pretrained when they all were), else a random resnet18
    backbones = {(cfg.backbone.name, bool(cfg.backbone.pretrained)) for cfg in cfgs}
    names = {name for name, _ in backbones}
    backbone = names.pop() if len(names) == 1 else "resnet18"
    pretrained = len(backbones) == 1 and next(iter(backbones))[1]
    body = {
        "backbone": {"pretrained": pretrained},
        "dataset": OmegaConf.to_container(cfgs[0].dataset, resolve=True),
        "seed": cfgs[0].seed,
        "transform": {"image_size": size, "center_crop": None, "normalize": None},
        "loader": {"train_batch_size": cfgs[0].loader.train_batch_size,
                   "eval_batch_size": cfgs[0].loader.eval_batch_size},
        "trainer": {"max_epochs": 1, "max_steps": None, "early_stopping": {"monitor": None}},
        "evaluation": {"holdout": cfgs[0].evaluation.holdout},
        "model": {"members": [str(member[1]) for member in members], "calibration": args.calibration,
                  "fusion": args.fusion, "map_fusion": args.map_fusion},
    }
    header = [
        "# @package _global_",
        f"# written by tools/ensemble.py on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: the top {len(members)} "
        f"runs of {sweep} by {metric}",
        *(describe_member(rank, member, metric) for rank, member in enumerate(members, 1)),
        "defaults:",
        "  - override /model: ensemble",
        f"  - override /dataset: {records[0]['run'].get('dataset')}",
        f"  - override /backbone: {backbone}",
    ]
    return "\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.create(body))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pick the top k runs of a sweep folder by a metric and write the "
                                                 "experiment file of their ensemble (model=ensemble)")
    parser.add_argument("sweep", type=Path, help="a sweep folder (multirun/<name>) or any folder of runs")
    parser.add_argument("--top-k", type=int, default=3, choices=(2, 3, 4))
    parser.add_argument("--metric", default="image_auroc", choices=METRIC_KEYS)
    parser.add_argument("--dataset", help="only runs of this data set")
    parser.add_argument("--category", help="only runs of this category")
    parser.add_argument("--calibration", default="zscore", choices=("zscore", "percentile", "none"))
    parser.add_argument("--fusion", default="mean", choices=("mean", "max", "weighted", "rank", "logistic"))
    parser.add_argument("--map-fusion", choices=("mean", "max", "weighted", "rank", "logistic"),
                        help="default: as --fusion")
    parser.add_argument("--name", help="the experiment's name; default ensemble_top<k>_<metric>")
    parser.add_argument("--out", type=Path, help="the folder whose experiment/ gets the file; default <sweep>/configs")
    args = parser.parse_args(argv)
    try:
        if not args.sweep.is_dir():
            raise DefectVADError(f"not a folder: {args.sweep}")
        sweep = args.sweep.resolve()
        candidates, skipped = find_candidates(sweep, args.metric)
        members = choose_members(candidates, args.top_k, args.dataset, args.category)
        name = args.name or f"ensemble_top{args.top_k}_{args.metric}"
        out = (args.out or sweep / "configs").resolve()
        path = out / "experiment" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        from defectvad.atomic_files import write_text_atomic

        write_text_atomic(path, write_experiment(members, args.metric, args, sweep))
    except DefectVADError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    for rank, member in enumerate(members, 1):
        print(describe_member(rank, member, args.metric).lstrip("# "))
    print(f"written {path}\nrun it with:\n  python {ROOT / 'src' / 'run.py'} 'hydra.searchpath=[file://{out}]' "
          f"experiment={name} 'hydra.run.dir={sweep / name}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
