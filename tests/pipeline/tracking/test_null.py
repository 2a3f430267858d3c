"""pipeline.tracking.null: the ``Tracker`` protocol, which both trackers implement, and ``NullTracker``."""

from __future__ import annotations

import inspect

from pipeline.config import TrackingConfig
from pipeline.tracking import create_tracker
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.null import NullTracker, Tracker


def _protocol_methods() -> list[str]:
    return sorted(name for name, value in vars(Tracker).items() if inspect.isfunction(value) and name[0] != "_")


def test_disabled_or_other_rank_gets_a_null_tracker(tmp_path):
    other_rank = create_tracker(TrackingConfig(), enabled_here=False, run_id=None, run_name="r", repo_root=tmp_path)
    assert isinstance(other_rank, NullTracker)
    null = create_tracker(
        TrackingConfig(enabled=False), enabled_here=True, run_id=None, run_name="r", repo_root=tmp_path
    )
    assert isinstance(null, NullTracker) and null.run_id is None
    null.log_metrics({"a": 1.0}, 1)
    assert null.flush() and null.close()
    assert not (tmp_path / "mlflow.db").exists()


def test_both_trackers_have_every_method_of_the_protocol_with_its_signature():
    methods = _protocol_methods()
    assert {"log_metrics", "log_model_file", "log_run_metadata", "last_logged_step", "close"} <= set(methods)
    for cls in (NullTracker, MlflowTracker):
        for name in methods:
            assert inspect.signature(getattr(cls, name)) == inspect.signature(getattr(Tracker, name)), (cls, name)
        public = {name for name, value in vars(cls).items() if inspect.isfunction(value) and name[0] != "_"}
        assert public == set(methods), f"{cls.__name__}: methods outside the protocol {public - set(methods)}"
    assert isinstance(inspect.getattr_static(Tracker, "run_id"), property)


def test_null_tracker_accepts_every_call_a_stage_makes(tmp_path):
    null = NullTracker()
    null.log_params({"a": {"b": 1}})
    null.log_run_metadata({"a": 1}, world_size=2, device_type="cpu", shards="shards")
    null.log_dataset("shards", repo_root=tmp_path)
    null.log_artifact(tmp_path / "missing.txt", "x")  # nothing is read
    null.log_model_file(tmp_path / "missing.pt", metrics={"val/map": 0.5})
    null.set_tags({"k": "v"})
    null.set_model_version_tags({"k": "v"})
    assert null.last_logged_step("val/map") is None
    assert null.flush(0.0) and null.close("FAILED", timeout_s=0.0)
