"""Proof on real photos: on the raccoon set, the validated best step scores at least the last step on test.

By hand (minutes on a CPU, too slow for CI; the selection logic itself is tested in
``tests/pipeline/training/test_selection.py`` and ``test_ray_validation.py``)::

    SSD_RACCOON_DIR=../shared/datasets/raccoon .venv/bin/python benchmarks/raccoon_selection.py [--steps 600]

The run: ``params/raccoon_ssd300.yaml``'s data (200 photos, one class; 10% validation, then 15% of the rest
held out as the test split) with ``ssd_tiny`` from scratch on 2 CPU workers, no augmentation and a constant
learning rate after warm-up, so that ~130 training photos are overfitted within ``--steps`` steps. Validation
every ``--every`` steps picks the best step by ``val/map_voc07`` (``train.final_weights=best``). The same
command with ``train.final_weights=last`` then writes the last step's weights: the run identity does not
include ``final_weights``, so it resumes the finished run and trains nothing. ``evaluate`` scores both model
files on the test split, which took no part in the selection.

Writes ``benchmarks/results/raccoon_selection.json``: best step, validation scores of the best and the last
step, and the test mAPs of both model files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "raccoon_selection.json"
sys.path[:0] = [str(REPO)]

from pipeline.artifacts.model_file import load_model_file  # noqa: E402
from pipeline.cli import main as cli_main  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--work", type=Path, help="a folder of an earlier, interrupted call: what it finished is kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not Path(os.environ.get("SSD_RACCOON_DIR", "")).is_dir():
        sys.exit("set SSD_RACCOON_DIR to the raccoon set (../shared/datasets/raccoon)")
    work = args.work or Path(tempfile.mkdtemp(prefix="raccoon-selection-"))
    recipe = ["--params", str(REPO / "params" / "raccoon_ssd300.yaml")]
    common = [
        "model.preset=ssd_tiny",
        "model.pretrained_backbone=",
        "data.test_fraction=0.15",
        "train.use_gpu=false",
        "train.num_workers=2",
        "train.loader_workers=1",
        "train.batch_size=8",
        "train.lr_reference_batch=16",
        "train.optimizer=adamw",
        "train.lr=2e-3",
        "train.weight_decay=0.0",  # nothing holds the fit back
        "train.precision=bf16",
        f"train.max_steps={args.steps}",
        "train.warmup_steps=20",
        "train.schedule=multistep",  # no milestones: constant after warm-up
        f"train.val_every_steps={args.every}",
        f"train.checkpoint_every_steps={args.steps}",
        f"train.storage_path={work / 'runs'}",
        "augment.photometric=false",
        "augment.expand=false",
        "augment.crop=false",
        "augment.flip=false",
        "tracking.enabled=false",
    ]
    prepared, shards = work / "prepared", work / "shards"
    if not (shards / "manifest.json").exists():
        assert cli_main(["prepare", *recipe, "--out", str(prepared), "--report", str(work / "p.json"), *common]) == 0
        assert cli_main(["shard", *recipe, "--index", str(prepared), "--out", str(shards), *common]) == 0
    scores = {}
    for choice in ("best", "last"):
        model, metrics = work / f"{choice}.pt", work / f"eval-{choice}.json"
        if metrics.exists():
            scores[choice] = json.loads(metrics.read_text())
            continue
        train = ["train", *recipe, "--shards", str(shards), "--model-out", str(model), *common]
        assert cli_main([*train, f"train.final_weights={choice}"]) == 0
        evaluate = ["evaluate", *recipe, "--model", str(model), "--shards", str(shards), "--metrics", str(metrics)]
        outs = ["--plots", str(work / f"plots-{choice}"), "--out", str(work / f"eval-{choice}")]
        assert cli_main([*evaluate, *outs, *common]) == 0
        scores[choice] = json.loads(metrics.read_text())
    selection = load_model_file(work / "best.pt").selection
    result = {
        "steps": args.steps,
        "every": args.every,
        "best_step": selection["best_step"],
        "val_best": selection["best"],
        "val_last": selection["last"],
        "test_split": scores["best"]["split"],
        "test_images": scores["best"]["num_images"],
        "test_best": {k: scores["best"][k] for k in ("map_voc07", "map_voc", "map_coco")},
        "test_last": {k: scores["last"][k] for k in ("map_voc07", "map_voc", "map_coco")},
        "load_average": os.getloadavg(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    better = result["test_best"]["map_voc07"] >= result["test_last"]["map_voc07"]
    print(
        f"best step {result['best_step']} of {args.steps}: test VOC07 mAP {result['test_best']['map_voc07']} vs the "
        f"last step's {result['test_last']['map_voc07']}: {'best >= last' if better else 'best < last'}"
    )


if __name__ == "__main__":
    main()
