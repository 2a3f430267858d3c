"""What a tracker does (``Tracker``), and the tracker that does nothing (``NullTracker``).

``create_tracker`` gives rank 0 an ``MlflowTracker`` and every other rank (or a disabled config) a
``NullTracker``; both satisfy ``Tracker``, so the training loop and the stages call it unconditionally.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """The calls a stage or the training loop makes on a tracker. Logging calls return at once (the work is
    queued); ``flush`` and ``close`` wait, bounded, and return whether everything was stored."""

    @property
    def run_id(self) -> str | None:
        """The tracking run logged to; None for a tracker that logs nothing."""
        ...

    def last_logged_step(self, key: str) -> int | None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_run_metadata(
        self, params: Mapping[str, Any], *, world_size: int, device_type: str, shards: str | None = None
    ) -> None: ...
    def log_dataset(self, shards: str, *, repo_root: str | Path | None = None, context: str = "train") -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def pending_metrics(self) -> list[list[Any]]:
        """Metrics not yet stored, ``[key, value, timestamp_ms, step]`` each: a checkpoint carries them."""
        ...

    def requeue_metrics(self, items: list[list[Any]]) -> None:
        """Send ``pending_metrics()`` of an earlier tracker of this run again (on resume)."""
        ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_model_file(
        self, path: str | Path, *, metrics: Mapping[str, float] | None = None, register: bool = True
    ) -> None: ...
    def set_model_version_tags(self, tags: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def flush(self, timeout_s: float | None = None) -> bool: ...
    def close(self, status: str | None = "FINISHED", timeout_s: float | None = None) -> bool: ...


class NullTracker:
    """The tracker of ranks other than 0, and of ``tracking.enabled=false``: every call does nothing."""

    run_id: str | None = None

    def last_logged_step(self, key: str) -> int | None:
        del key
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        del params

    def log_run_metadata(
        self, params: Mapping[str, Any], *, world_size: int, device_type: str, shards: str | None = None
    ) -> None:
        del params, world_size, device_type, shards

    def log_dataset(self, shards: str, *, repo_root: str | Path | None = None, context: str = "train") -> None:
        del shards, repo_root, context

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        del metrics, step

    def pending_metrics(self) -> list[list[Any]]:
        return []

    def requeue_metrics(self, items: list[list[Any]]) -> None:
        del items

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        del local_path, artifact_path

    def log_model_file(
        self, path: str | Path, *, metrics: Mapping[str, float] | None = None, register: bool = True
    ) -> None:
        del path, metrics, register

    def set_model_version_tags(self, tags: Mapping[str, Any]) -> None:
        del tags

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        del tags

    def flush(self, timeout_s: float | None = None) -> bool:
        del timeout_s
        return True

    def close(self, status: str | None = "FINISHED", timeout_s: float | None = None) -> bool:
        del status, timeout_s
        return True
