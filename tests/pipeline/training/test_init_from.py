"""Fine-tuning sources: class rows matched by name, new classes fresh, the table, the identity, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.artifacts.model_file import load_model_file, save_model_file
from pipeline.training import checkpoint
from pipeline.training.init_from import (
    CLASS_ROWS,
    LOADED,
    REINITIALISED,
    read_source,
    source_digest,
    transfer_table,
    transfer_weights,
)
from pipeline.training.job import identity_digest
from ssd_core.model import SSD_TINY_PRIORS, build_ssd
from ssd_core.priors import PriorSpec
from tests.pipeline.fixtures import make_params, random_tiny_ssd

SOURCE_CLASSES = ["circle", "square", "triangle"]


def _source_file(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = random_tiny_ssd(len(SOURCE_CLASSES) + 1, seed=3)
    path = tmp_path / "source.pt"
    save_model_file(path, model, classes=SOURCE_CLASSES, params={})
    return path, model


def _conf_rows(tensor: torch.Tensor, classes: int) -> torch.Tensor:
    return tensor.reshape(-1, classes, *tensor.shape[1:])  # [A, C, ...]


def test_class_rows_follow_the_names_and_new_classes_start_fresh(tmp_path):
    path, source_model = _source_file(tmp_path)
    classes = ["triangle", "star", "circle"]  # reordered, one new, one left out
    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", len(classes) + 1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    rows = transfer_weights(model, read_source(str(path)), classes)
    by_name = {row.name: row for row in rows}
    got, src = model.state_dict(), source_model.state_dict()
    for k in range(5):
        name = f"conf.{k}.weight"
        assert by_name[name].action == CLASS_ROWS and "new: ['star']" in by_name[name].detail
        here, there, new = _conf_rows(got[name], 4), _conf_rows(src[name], 4), _conf_rows(fresh[name], 4)
        assert torch.equal(here[:, 0], there[:, 0])  # background from background
        assert torch.equal(here[:, 1], there[:, 3])  # triangle: source label 3
        assert torch.equal(here[:, 3], there[:, 1])  # circle: source label 1
        assert torch.equal(here[:, 2], new[:, 2])  # star: as freshly initialised
        bias = f"conf.{k}.bias"
        assert torch.equal(_conf_rows(got[bias], 4)[:, 1], _conf_rows(src[bias], 4)[:, 3])
    for name in ("vgg.0.weight", "loc.0.weight", "extras.0.1.running_mean", "l2norm.weight"):
        assert by_name[name].action == LOADED and torch.equal(got[name], src[name]), name
    table = transfer_table(rows, read_source(str(path)))
    assert table.splitlines()[0].endswith(f"{len(rows) - 10} loaded, 10 class rows, 0 re-initialised, 0 skipped")


def test_a_checkpoint_folder_is_a_source_too(tmp_path):
    model = random_tiny_ssd(len(SOURCE_CLASSES) + 1, seed=4)
    folder = tmp_path / "run" / checkpoint.dir_name(7)
    state = {"step": 7, "model": model.state_dict(), "preset": "ssd_tiny", "classes": SOURCE_CLASSES}
    state["prior_spec"] = SSD_TINY_PRIORS.to_dict()
    checkpoint.write_checkpoint(folder, state, {"step": 7, "epoch": 0, "params": {}, "world_size": 1})
    source = read_source(str(folder))
    assert (source.kind, source.classes) == ("checkpoint", SOURCE_CLASSES)
    target = build_ssd("ssd_tiny", 4)
    transfer_weights(target, source, SOURCE_CLASSES)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in target.state_dict().items())
    assert source_digest(str(folder)) != source_digest(str(_source_file(tmp_path)[0]))


def test_heads_of_other_priors_are_reinitialised(tmp_path):
    path, _ = _source_file(tmp_path)
    wider = PriorSpec.from_dict({**SSD_TINY_PRIORS.to_dict(), "aspect_ratios": [[2, 3]] * 5})  # 6 boxes everywhere
    model = build_ssd("ssd_tiny", 4, prior_spec=wider)
    rows = {row.name: row for row in transfer_weights(model, read_source(str(path)), SOURCE_CLASSES)}
    assert rows["loc.0.weight"].action == REINITIALISED and rows["conf.0.weight"].action == REINITIALISED
    assert rows["loc.1.weight"].action == LOADED  # level 1 had ratios (2, 3) already
    assert rows["conf.1.weight"].action == CLASS_ROWS and rows["vgg.0.weight"].action == LOADED


def test_refusals_name_the_key(tmp_path):
    path, _ = _source_file(tmp_path)
    with torch.device("meta"):
        other = build_ssd("ssd300_vgg16", 4)
    with pytest.raises(ValueError, match="model.init_from: .* is a ssd_tiny model, this run trains ssd300_vgg16"):
        transfer_weights(other, read_source(str(path)), SOURCE_CLASSES)
    with pytest.raises(ValueError, match="model.init_from: no model file or checkpoint folder at"):
        read_source(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="model.init_from: .*not a readable model file"):
        read_source(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="model.init_from: .* holds other weights .* than this run started from"):
        read_source(str(path), expect_sha256="0" * 64)  # the file was replaced after the job's identity was made
    with pytest.raises(ValueError, match="model.init_from: models:/ssd@champion: a registered model needs the"):
        read_source("models:/ssd@champion")


def test_the_sources_digest_joins_the_run_identity(tmp_path):
    params = make_params(**{"model.init_from": "models/ssd.pt"})
    a, b = identity_digest(params, "0" * 64, "code", "1" * 64), identity_digest(params, "0" * 64, "code", "2" * 64)
    assert a != b and identity_digest(params, "0" * 64, "code", "1" * 64) == a
    path, _ = _source_file(tmp_path)
    before = source_digest(str(path))
    save_model_file(path, random_tiny_ssd(4, seed=9), classes=SOURCE_CLASSES, params={})
    assert source_digest(str(path)) != before  # same path, other weights: another run


# ------------------------------------------------------------------------------ a real fine-tuning run
def train_steps(job, steps: int, shards: Path):
    """``steps`` optimiser steps of the loop's sequence without Ray (one rank), from ``build_model(job)``."""
    import dataclasses

    from pipeline.shards.loader import train_loader
    from pipeline.training.determinism import seed_step
    from pipeline.training.state import build_model, build_state
    from pipeline.training.step import train_step
    from ssd_core.augment import AugmentOptions

    model = build_model(job, None)
    state = build_state(job, model, 1, None)
    cfg = job.params.train
    loader = train_loader(
        str(shards),
        rank=0,
        world_size=1,
        global_batch=cfg.batch_size,
        image_size=model.image_size,
        augment=AugmentOptions(**dataclasses.asdict(job.params.augment)),
        seed=job.params.seed,
        num_workers=0,
        num_steps=steps,
    )
    priors = model.priors()
    for batch in loader:
        seed_step(job.params.seed, 0, state.step)
        train_step(model, batch, priors, state.optimizer, cfg=cfg, scaler=state.scaler)
        state.end_step(True)
    return model


def _voc07(model, shards: Path, params, classes) -> float:
    from pipeline.report.scoring import run_inference, score_detections

    collected = run_inference(
        model.eval(), str(shards), params.eval, device=torch.device("cpu"), num_workers=0, progress=False
    )
    return score_detections(collected, list(classes)).summary["map_voc07"]


def _subset_index(source: Path, target: Path, keep: dict[str, str]) -> tuple[str, ...]:
    """The prepared index with only the boxes of ``keep``'s classes, renamed ``old -> new``."""
    import dataclasses

    from pipeline.sources.records import read_classes, read_index, write_index

    old = read_classes(source)
    names = list(keep.values())
    relabel = {old.index(k) + 1: names.index(v) + 1 for k, v in keep.items()}
    splits = {}
    for split in ("train", "val"):
        splits[split] = []
        for r in read_index(source, split):
            kept = [i for i, label in enumerate(r.labels) if label in relabel]
            splits[split].append(
                dataclasses.replace(
                    r,
                    boxes=[r.boxes[i] for i in kept],
                    labels=[relabel[r.labels[i]] for i in kept],
                    difficult=[r.difficult[i] for i in kept],
                )
            )
    write_index(target, splits, names)
    return tuple(names)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # 760 CPU training steps of ssd_tiny (~90 s on a quiet machine) and two evaluations
def test_fine_tuning_the_default_on_a_renamed_two_class_subset_beats_from_scratch(tmp_path):
    """The embedded default's data and model (ssd_tiny, AdamW; shortened): a source trained on the five shapes,
    then the same number of steps on ellipses and rectangles renamed "box", from the source and from scratch.
    The shared class starts with its trained rows; the fine-tuned model scores the higher VOC07 mAP."""
    from pipeline.stages.shard import shard
    from pipeline.training.job import TrainJob
    from pipeline.training.state import build_model
    from tests.pipeline.fixtures import prepare_and_shard

    base = {
        "data.synthetic.num_train": 160,
        "data.synthetic.num_val": 48,
        "train.batch_size": 8,
        "train.lr": 2e-3,
        "train.lr_reference_batch": 8,
        "train.optimizer": "adamw",
        "train.weight_decay": 0.05,
        "train.warmup_steps": 10,
        "train.precision": "fp32",
    }
    params = make_params(**base, **{"train.max_steps": 600})
    index, shards = prepare_and_shard(params, tmp_path / "five")
    classes = tuple(__import__("json").loads((index / "classes.json").read_text()))
    job = TrainJob(params, str(shards), classes, str(tmp_path / "r"), str(tmp_path), "0" * 64)
    source = train_steps(job, 600, shards)
    source_path = tmp_path / "source.pt"
    save_model_file(source_path, source, classes=list(classes), params={})

    names = _subset_index(index, tmp_path / "two" / "prepared", {"ellipse": "ellipse", "rectangle": "box"})
    two = tmp_path / "two" / "shards"
    shard(tmp_path / "two" / "prepared", two, params.shard, progress=False)
    steps = 80
    runs = {}
    for name, init in (("scratch", ""), ("fine-tuned", str(source_path))):
        p = make_params(**base, **{"train.max_steps": steps, "model.init_from": init})
        job = TrainJob(p, str(two), names, str(tmp_path / name), str(tmp_path), "0" * 64)
        if init:  # step 0: the shared class has the source's rows, the renamed one its fresh ones
            start = build_model(job, None).state_dict()["conf.0.weight"]
            rows, src = _conf_rows(start, 3), _conf_rows(source.state_dict()["conf.0.weight"], 6)
            assert torch.equal(rows[:, 1], src[:, classes.index("ellipse") + 1])
            assert not torch.equal(rows[:, 2], src[:, classes.index("rectangle") + 1])
        runs[name] = _voc07(train_steps(job, steps, two), two, p, names)
    # The source saw 600 steps (VOC07 mAP 0.22 on the five shapes); after 80 steps on the two classes, scratch
    # scored 0.050 and fine-tuned 0.167 (after 40: 0.053 and 0.112)
    assert runs["fine-tuned"] > max(2 * runs["scratch"], runs["scratch"] + 0.05), runs


# ------------------------------------------------------------------------------ a registered model as the source
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_registered_model_starts_the_run_from_the_version_its_alias_names(tmp_path, uneven_shards, monkeypatch):
    """``models:/NAME@champion`` on a real ``mlflow server`` behind basic auth: the driver (``build_job``) resolves
    the alias to its version and names that file's sha256 in the run identity; the worker (``build_model``),
    without the credentials in its environment, downloads that version with the job's and starts from exactly
    its weights. An alias that moves makes another run; an unknown alias, version or name is refused first."""
    import dataclasses
    import json

    from mlflow.tracking import MlflowClient

    from pipeline.cli import main as cli_main
    from pipeline.config import TrackingConfig, load_params, params_to_dict
    from pipeline.serving.publish import publish_model
    from pipeline.stages.train import build_job
    from pipeline.tracking import MlflowTracker, file_sha256
    from pipeline.training.state import build_model
    from tests.pipeline.mlflow_server import MlflowServer
    from tests.pipeline.test_secrets import USER, BasicAuthProxy

    repo = Path(__file__).resolve().parents[3]
    classes = json.loads((uneven_shards / "manifest.json").read_text())["classes"]
    password = f"pw-{tmp_path.name}"
    credentials = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", *credentials):
        monkeypatch.delenv(var, raising=False)
    server = MlflowServer(tmp_path / "mlflow-server").start(timeout_s=240)
    proxy = BasicAuthProxy(server.url, USER, password).start()
    uri, name = f"http://127.0.0.1:{proxy.port}", "ssd-init-from"
    try:
        for var, value in credentials.items():  # the driver's environment: where train reads them
            monkeypatch.setenv(var, value)
        cfg = TrackingConfig(uri=uri, experiment="init-from", model_name=name)
        files = []
        for seed in (1, 2):  # versions 1 and 2, the first made the champion
            files.append(tmp_path / f"source-{seed}.pt")
            save_model_file(files[-1], random_tiny_ssd(len(classes) + 1, seed=seed), classes=classes, params={})
            tracker = MlflowTracker(cfg, run_id=None, run_name=f"source-{seed}", repo_root=repo)
            assert tracker.close()
            recorded = params_to_dict(load_params(None))
            publish_model(
                cfg, repo_root=repo, run_id=tracker.run_id, model_file=files[-1], params=recorded, data_digest="d" * 64
            )
        client = MlflowClient(uri)
        client.set_registered_model_alias(name, "champion", "1")

        overrides = [f"tracking.uri={uri}", f"tracking.model_name={name}", f"train.storage_path={tmp_path / 'runs'}"]
        params = load_params(None, [*overrides, f"model.init_from=models:/{name}@champion"])
        job = build_job(str(uneven_shards), params, tmp_path)
        assert job.params.model.init_from == f"models:/{name}/1"  # what the workers read: the version, not the alias
        assert job.init_digest == file_sha256(files[0]) and job.tracking_credentials == credentials
        assert password not in repr(job) and password not in json.dumps(params_to_dict(job.params))

        for var in credentials:  # a Ray worker on another node: the credentials come with the job only
            monkeypatch.delenv(var)
        started = build_model(job, None).state_dict()
        source = load_model_file(files[0]).model.state_dict()
        assert started.keys() == source.keys() and all(torch.equal(started[k], source[k]) for k in source)
        assert proxy.refused == []
        for var in credentials:  # the download above set them in this process, as MLflow reads them there
            monkeypatch.delenv(var)
        without = dataclasses.replace(job, tracking_credentials={})
        with pytest.raises(ValueError, match=f"model.init_from: models:/{name}/1: .*401"):
            build_model(without, None)  # the proxy refuses a worker without them
        with pytest.raises(ValueError, match="holds other weights"):
            build_model(dataclasses.replace(job, init_digest="0" * 64), None)

        for var, value in credentials.items():
            monkeypatch.setenv(var, value)
        client.set_registered_model_alias(name, "champion", "2")  # the alias moves: another source, another run
        moved = build_job(str(uneven_shards), params, tmp_path)
        assert moved.params.model.init_from == f"models:/{name}/2" and moved.init_digest == file_sha256(files[1])
        assert moved.run_uri != job.run_uri
        assert build_job(str(uneven_shards), params, tmp_path).run_uri == moved.run_uri  # same version: resumes

        for bad, reason in (
            (f"models:/{name}@nope", "alias"),
            (f"models:/{name}/9", "version"),
            ("models:/nobody@champion", "nobody"),
        ):
            with pytest.raises(ValueError, match=f"^model.init_from: {bad}: .*{reason}"):
                build_job(str(uneven_shards), load_params(None, [*overrides, f"model.init_from={bad}"]), tmp_path)
        train = ["train", "--shards", str(uneven_shards), "--model-out", str(tmp_path / "m.pt"), *overrides]
        assert cli_main([*train, f"model.init_from=models:/{name}@nope"]) == 2  # refused before Ray starts
        assert not (tmp_path / "runs").exists()
    finally:
        proxy.stop()
        server.stop()
