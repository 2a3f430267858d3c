"""``python -m pipeline <command>``: one entry point for every stage.

Every command takes ``--params FILE`` (default ``params.yaml``) and dotlist overrides such as
``train.lr=0.01`` after its options. Parameters are validated before the command starts any work.
Stage modules are imported only when their command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, load_params
from pipeline.stage_paths import DVC_FILE, stage_options
from pipeline.tracking import detach_credentials

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
DEFAULT_WAIT_TIMEOUT_S = 24 * 3600.0  # train --wait: a day covers the longest recipe's run on a cluster


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # module exposing ``main(args, params) -> int | None``
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    takes_inputs: bool = False  # positional arguments that are not KEY=VALUE are inputs


def _path(p: argparse.ArgumentParser, flag: str, stage: str, help: str, *, stage_flag: str = "", url: bool = False):
    """A path option whose default is the value ``dvc.yaml`` gives ``stage_flag`` (default: ``flag``) in
    ``stage``'s command; without a ``dvc.yaml`` naming it, the option is required (checked after parsing)."""
    source = (stage, stage_flag or flag, url)
    p.add_argument(
        flag,
        type=str if url else Path,
        default=None,
        help=f"{help} (default: {source[1]} in the {stage} stage's cmd in dvc.yaml)",
    )
    p.set_defaults(**{f"_dvc_{flag.lstrip('-').replace('-', '_')}": source})


def _prepare_args(p: argparse.ArgumentParser) -> None:
    _path(p, "--out", "prepare", "index folder to write")
    _path(p, "--report", "prepare", "counts (DVC metric)")


def _shard_args(p: argparse.ArgumentParser) -> None:
    _path(p, "--index", "shard", "prepared index folder")
    _path(p, "--out", "shard", "shard folder (with manifest.json)")


def _boxes_args(p: argparse.ArgumentParser) -> None:
    _path(p, "--index", "boxes", "prepared index folder (its training split is read)")
    _path(p, "--report", "boxes", "prior recall and box sizes (DVC metric)")
    _path(p, "--plots", "boxes", "folder for the DVC plot data and the size histograms")


def _fit_priors_args(p: argparse.ArgumentParser) -> None:
    _path(p, "--index", "boxes", "prepared index folder (its training split is read)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("reports/fitted_priors.yaml"),
        help="params snippet to write (model.priors: custom and model.prior_spec)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _train_args(p: argparse.ArgumentParser) -> None:
    _path(p, "--shards", "train", "shard folder or fsspec URL (with manifest.json)", url=True)
    _path(p, "--model-out", "train", "final model file (path or URL)", url=True)
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another job is training in this run folder (same params, data and code), wait for it to "
        "finish instead of refusing at once; logs while it waits",
    )
    p.add_argument(
        "--wait-timeout",
        type=_seconds,
        default=DEFAULT_WAIT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"with --wait: give up after this long (default {DEFAULT_WAIT_TIMEOUT_S:.0f} s)",
    )


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _path(p, "--model", "evaluate", "model file from train (path or URL)", url=True)
    _path(p, "--shards", "evaluate", "shard folder or URL (validation split is used)", url=True)
    _path(p, "--metrics", "evaluate", "DVC metrics file")
    _path(p, "--plots", "evaluate", "PR-curve data (DVC plots)")
    _path(p, "--out", "evaluate", "PNGs and COCO-format JSON")


def _predict_args(p: argparse.ArgumentParser) -> None:
    _path(
        p,
        "--model",
        "train",
        "model file from train (path or URL), or models:/NAME@ALIAS",
        stage_flag="--model-out",
        url=True,
    )
    p.add_argument(
        "--out",
        default="predictions",
        help="folder for detections.json (COCO results format) and the drawn images; with --ray also an "
        "object-store prefix (s3://bucket/predictions)",
    )
    p.add_argument("--min-score", type=float, default=0.3, help="detections below this score are left out")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--no-draw", action="store_true", help="write detections.json only, no drawn copies")
    ray = p.add_argument_group("Ray Data (--ray)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Data actors (many machines; inputs and --out may be s3:// prefixes); writes "
        "detections.json, results.json and detections.parquet, no drawn copies",
    )
    ray.add_argument("--ray-workers", type=int, default=2, help="actors, each holding the model (default 2)")
    ray.add_argument("--ray-cpus-per-worker", type=float, default=1.0, help="CPUs (torch threads) per actor")
    ray.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray on 127.0.0.1)",
    )


def _export_args(p: argparse.ArgumentParser) -> None:
    _path(p, "--model", "train", "model file from train, or models:/NAME@ALIAS", stage_flag="--model-out")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format")
    p.add_argument("--out", type=Path, default=None, help="file to write (default: the model's path, suffix .onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument(
        "--nms",
        action="store_true",
        help="append ONNX NonMaxSuppression (eval.* thresholds) after the decoded boxes and scores",
    )


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="the registered version to make the champion, NAME@VERSION (e.g. ssd@3)")
    p.add_argument("--reason", required=True, help="why (recorded on the version as promoted_reason)")
    p.add_argument("--user", default="", help="who (default: the login name), recorded as promoted_by")


def _summary_args(p: argparse.ArgumentParser) -> None:
    _path(p, "--metrics", "evaluate", "eval.json of the run")


def _upload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("shards",), help="what to upload: a shard folder with its manifest")
    p.add_argument("source", help="local shard folder (with manifest.json)")
    p.add_argument("destination", help="URL to upload to, e.g. s3://bucket/voc/shards")


def _no_args(p: argparse.ArgumentParser) -> None:
    del p


COMMANDS: tuple[Command, ...] = (
    Command("prepare", "pipeline.stages.prepare", "validate a VOC/COCO/synthetic source into an index", _prepare_args),
    Command("shard", "pipeline.stages.shard", "write WebDataset shards and their manifest", _shard_args),
    Command("boxes", "pipeline.stages.boxes", "box sizes and prior recall of the training boxes", _boxes_args),
    Command(
        "fit-priors",
        "pipeline.stages.fit_priors",
        "fit default-box sizes and ratios to the training boxes; writes a params snippet",
        _fit_priors_args,
    ),
    Command("train", "pipeline.stages.train", "distributed training with Ray Train", _train_args),
    Command("evaluate", "pipeline.stages.evaluate", "VOC and COCO mAP on the validation shards", _evaluate_args),
    Command(
        "predict",
        "pipeline.stages.predict",
        "detect objects in images or folders (no Ray, no MLflow; with --ray: on Ray Data actors)",
        _predict_args,
        takes_inputs=True,
    ),
    Command("export", "pipeline.stages.export", "export the model with its box decoding (ONNX)", _export_args),
    Command(
        "promote",
        "pipeline.stages.promote",
        "make a registered model version the champion, recording who and why",
        _promote_args,
    ),
    Command(
        "summary",
        "pipeline.stages.summary",
        "headline metrics of the last run and the MLflow UI command",
        _summary_args,
    ),
    Command("upload", "pipeline.stages.upload", "upload shards to an object store, sha256-verified", _upload_args),
    Command("check-params", "pipeline.stages.check_params", "validate params and print them resolved", _no_args),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="SSD training pipeline. Each command reads --params (default params.yaml) and "
        "accepts KEY=VALUE overrides, e.g. `python -m pipeline train train.lr=0.01`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameter file")
        command.add_arguments(p)
        p.add_argument(
            "rest",
            nargs="*",
            metavar="INPUT_OR_KEY=VALUE" if command.takes_inputs else "KEY=VALUE",
            help="parameter overrides" + (", and images or folders to read" if command.takes_inputs else ""),
        )
    return parser


def parse_command_line(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Command, list[str]]:
    """The parsed options (with ``args.inputs``), the command, and the KEY=VALUE overrides.

    Inputs and overrides may come before or after options (``predict a.jpg --min-score 0.5 eval.top_k=100``):
    argparse hands positionals that follow an option back as unknown, so they join the rest here.
    Exits with a usage error (status 2) on an unknown option, or on inputs for a command that takes none.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    options = [a for a in unknown if a.startswith("-")]
    if options:
        parser.error(f"unrecognized arguments: {' '.join(options)}")
    rest = [*args.rest, *unknown]
    command = next(c for c in COMMANDS if c.name == args.command)
    overrides = [a for a in rest if _OVERRIDE.match(a)]
    args.inputs = [a for a in rest if not _OVERRIDE.match(a)]
    if args.inputs and not command.takes_inputs:
        parser.error(f"{command.name}: unexpected argument(s) {args.inputs}; overrides look like KEY=VALUE")
    _fill_paths_from_dvc(args, parser, command)
    return args, command, overrides


def _fill_paths_from_dvc(args: argparse.Namespace, parser: argparse.ArgumentParser, command: Command) -> None:
    """Give every path option left unset the value ``dvc.yaml``'s stage command names; refuse when none does."""
    read: dict[str, dict[str, str]] = {}  # stage -> its command's options, dvc.yaml read once per stage
    for key in [k for k in vars(args) if k.startswith("_dvc_")]:
        stage, flag, url = getattr(args, key)
        delattr(args, key)
        dest = key.removeprefix("_dvc_")
        if getattr(args, dest) is not None:
            continue
        if stage not in read:
            read[stage] = stage_options(stage, DVC_FILE)
        value = read[stage].get(flag)
        if value is None:
            own = "--" + dest.replace("_", "-")
            parser.error(
                f"{command.name}: {own} is required here: no {DVC_FILE} in {Path.cwd()} gives "
                f"{flag} in its {stage} stage"
            )
        setattr(args, dest, value if url else Path(value))
    if command.name == "export" and args.out is None:
        if str(args.model).startswith("models:/"):
            parser.error(f"export: --out is required when --model is a registered model ({args.model})")
        args.out = Path(args.model).with_suffix(".onnx")


def main(argv: Sequence[str] | None = None) -> int:
    args, command, overrides = parse_command_line(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    params_path = args.params if args.params.exists() or args.params != Path("params.yaml") else None
    try:
        params = load_params(params_path, overrides)
    except ConfigError as error:
        print(f"error: invalid parameters: {error}", file=sys.stderr)
        return 2
    params = detach_credentials(params)  # a password in tracking.uri moves to MLflow's variables, out of params
    module = importlib.import_module(command.module)
    return int(module.main(args, params) or 0)
