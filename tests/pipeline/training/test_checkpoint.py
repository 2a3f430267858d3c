"""Checkpoint directories: round trip, torn writes detected, the newest valid one found."""

from __future__ import annotations

import json
import random

import pytest
import torch

from pipeline.training import checkpoint
from pipeline.training.checkpoint import CheckpointError


def _write(run, step: int, *, value: float = 1.0) -> str:
    uri = checkpoint.join(str(run), checkpoint.dir_name(step))
    state = {
        "step": step,
        "model": {"w": torch.full((3, 2), value)},
        "rng": {"python": random.getstate()},
        "nested": {"lr": [0.1, 0.01], "name": "x", "none": None},
    }
    meta = {"step": step, "epoch": step // 8, "params": {"seed": 1}, "tracking_run_id": "abc", "world_size": 2}
    checkpoint.write_checkpoint(uri, state, meta)
    return uri


def test_round_trip_and_meta(tmp_path):
    uri = _write(tmp_path, 12, value=3.5)
    loaded = checkpoint.load_checkpoint(uri)
    assert loaded.meta.step == 12 and loaded.meta.epoch == 1 and loaded.meta.world_size == 2
    assert loaded.meta.tracking_run_id == "abc" and loaded.meta.params == {"seed": 1}
    assert torch.equal(loaded.state["model"]["w"], torch.full((3, 2), 3.5))
    assert loaded.state["nested"] == {"lr": [0.1, 0.01], "name": "x", "none": None}
    random.setstate(loaded.state["rng"]["python"])  # a Python RNG state survives weights_only loading
    meta = json.loads((tmp_path / "checkpoint_step_000000012" / "meta.json").read_text())
    assert meta["size"] == (tmp_path / "checkpoint_step_000000012" / "state.pt").stat().st_size


def test_names_sort_by_step_and_parse_back():
    names = [checkpoint.dir_name(s) for s in (7, 100, 3)]
    assert sorted(names) == [checkpoint.dir_name(s) for s in (3, 7, 100)]
    assert [checkpoint.step_of(n) for n in names] == [7, 100, 3]
    assert checkpoint.step_of("checkpoint_2026-01-01_00-00-00.000") is None


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:-10]), "a torn write"),
        (lambda d: (d / "state.pt").unlink(), "state.pt unreadable"),
        (lambda d: (d / "meta.json").unlink(), "no readable meta.json"),
        (lambda d: (d / "meta.json").write_text("{"), "no readable meta.json"),
        (lambda d: (d / "meta.json").write_text('{"format": "other"}'), "is not a 'ssd-pipeline-checkpoint'"),
    ],
    ids=["truncated", "no-state", "no-meta", "bad-json", "foreign"],
)
def test_damaged_checkpoints_are_refused_with_their_location(tmp_path, damage, message):
    uri = _write(tmp_path, 4)
    damage(tmp_path / checkpoint.dir_name(4))
    with pytest.raises(CheckpointError, match=message) as error:
        checkpoint.load_checkpoint(uri)
    assert uri in str(error.value)


def test_same_size_corruption_is_caught_by_the_hash(tmp_path):
    uri = _write(tmp_path, 4)
    state = tmp_path / checkpoint.dir_name(4) / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="a torn write"):
        checkpoint.load_checkpoint(uri)


def test_the_newest_valid_checkpoint_is_found_past_torn_ones(tmp_path):
    for step in (4, 8, 12):
        _write(tmp_path, step)
    (tmp_path / "checkpoint_step_000000012" / "state.pt").write_bytes(b"torn")  # killed mid-copy
    (tmp_path / "checkpoint_step_000000016").mkdir()  # upload started, nothing copied yet
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    (tmp_path / "notes_checkpoint_step_000000099").mkdir()  # not a checkpoint name
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [16, 12, 8, 4]
    meta, uri = checkpoint.find_latest_valid(str(tmp_path))
    assert meta.step == 8 and uri.endswith("checkpoint_step_000000008")
    assert checkpoint.find_latest_valid(str(tmp_path / "missing")) is None


def test_a_kill_before_the_rename_leaves_no_checkpoint(tmp_path):
    uri = checkpoint.join(str(tmp_path), checkpoint.dir_name(4))

    def die(temp):
        raise SystemExit("killed")  # SIGKILL in the real test; here the process must survive to look

    with pytest.raises(SystemExit):
        checkpoint.write_checkpoint(
            uri, {"step": 4}, {"step": 4, "epoch": 0, "params": {}, "world_size": 1}, before_rename=die
        )
    assert not (tmp_path / checkpoint.dir_name(4) / "state.pt").exists()
    assert checkpoint.find_latest_valid(str(tmp_path)) is None


def _snapshot(run, steps: list[int]) -> None:
    results = [{"checkpoint_dir_name": checkpoint.dir_name(s)} for s in steps]
    (run / checkpoint.SNAPSHOT_FILE).write_text(
        json.dumps({"checkpoint_results": results, "latest_checkpoint_result": results[-1] if results else None})
    )


def test_prune_deletes_what_ray_never_registered(tmp_path):
    for step in (4, 8, 12, 16):
        _write(tmp_path, step)
    (tmp_path / checkpoint.dir_name(7)).mkdir()  # a torn upload
    assert checkpoint.prune(str(tmp_path)) == []  # no snapshot: Ray's view unknown, delete nothing
    _snapshot(tmp_path, [12, 16])
    assert checkpoint.registered_names(str(tmp_path)) == {checkpoint.dir_name(12), checkpoint.dir_name(16)}
    deleted = checkpoint.prune(str(tmp_path), protect=frozenset({checkpoint.dir_name(4)}))
    assert sorted(checkpoint.step_of(u.rsplit("/", 1)[1]) for u in deleted) == [7, 8]
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [16, 12, 4]
    (tmp_path / checkpoint.SNAPSHOT_FILE).write_text('{"checkpoint_results": [{"checkpoint_dir_na')  # mid-write
    assert checkpoint.registered_names(str(tmp_path)) is None and checkpoint.prune(str(tmp_path)) == []


def test_outcome_round_trip(tmp_path):
    assert checkpoint.read_outcome(str(tmp_path)) is None
    checkpoint.write_outcome(str(tmp_path), {"status": "completed", "step": 3})
    assert checkpoint.read_outcome(str(tmp_path)) == {"status": "completed", "step": 3}
    (tmp_path / checkpoint.OUTCOME_FILE).write_text("[1, 2")
    assert checkpoint.read_outcome(str(tmp_path)) is None
