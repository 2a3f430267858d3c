"""``python -m pipeline predict --ray``: ``predict`` over more images than one machine handles, with Ray Data.

The detections are exactly ``predict``'s: every Ray Data actor holds the model and runs the same
``predict_images`` (same decode, preprocessing, batches, post-processing and thresholds) over whole chunks of
``--batch-size`` consecutive inputs, the chunks ``predict`` itself would form, so every forward pass sees the
same images. The driver puts the results back in input order and writes them with ``predict``'s own
functions. An actor runs torch on as many threads as it has whole CPUs (``--ray-cpus-per-worker``): on a
CPU the convolutions' sums are ordered by the thread count (logits move by ~1e-7 between 1 and 2 threads),
so the numbers equal those of ``predict`` run with that many threads (``OMP_NUM_THREADS``; by default
``predict`` uses all cores).

Before Ray starts: the inputs are listed (local files and folders as ``predict``; object-store prefixes and
objects, ``s3://bucket/photos``, through ``pipeline.storage``), every object store gets its signed preflight
listing, ``--out`` is checked as ``predict`` checks it (``check_output``, which also knows prefixes), and the
model is loaded and validated once, on the driver. The loaded model travels to the actors through Ray's object
store, so a worker needs neither the model file nor a ``models:/`` registry; it must be able to read the
inputs (an object store, or a folder every node mounts).

Ray Data: a dataset of chunks (``from_items``), ``map_batches`` with ``ChunkDetector`` actors in an
``ActorPoolStrategy`` of ``--ray-workers`` actors, each reserving ``--ray-cpus-per-worker`` CPUs (its torch
threads) and, for ``--device cuda`` (or ``auto`` on a cluster with GPUs), one GPU. Ray is joined as
``train`` joins it (``pipeline.training.ray_runtime``): ``--ray-address``, else ``RAY_ADDRESS``, else a new
local instance on 127.0.0.1; a Ray already initialised in the process is used and left running.

Outputs in ``--out`` (a local folder, or a prefix ``s3://bucket/predictions``): ``detections.json`` and
``results.json`` as ``predict`` writes them, plus ``detections.parquet`` (``detections_table``); no drawn
copies. Locally each is written atomically; on an object store each is one PUT. Exit status as ``predict``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from pipeline import storage
from pipeline.artifacts.atomic_write import write_bytes_atomic
from pipeline.artifacts.output_folder import claim_output_folder, owns, write_marker
from pipeline.config import EvalConfig, Params
from pipeline.stages.predict import USAGE_ERRORS, check_options, load_model, predict_images, refuse, run_info
from pipeline.stages.predict_inputs import (
    DETECTIONS_NAME,
    PREDICT_STAGE,
    RESULTS_NAME,
    TABLE_NAME,
    InputError,
    check_output,
    collect_inputs,
    is_object_url,
)
from pipeline.stages.predict_outputs import (
    Failure,
    Prediction,
    detections_json,
    detections_table,
    dumps_by_record,
    results_list,
)

logger = logging.getLogger(__name__)

RAY_DEVICES = ("auto", "cpu", "cuda")  # Ray assigns each actor its GPU: no cuda:N
BLOCKS_PER_WORKER = 16  # dataset blocks (one actor task each) per worker: even spread, bounded overhead


class WorkerSettings(NamedTuple):
    """What every actor is given besides the model and ``eval.*``."""

    min_score: float  # --min-score
    batch_size: int  # --batch-size: images per forward pass, as predict
    max_pixels: int  # prepare.max_image_pixels: the decompression-bomb limit
    use_gpu: bool  # one GPU per actor (Ray sets CUDA_VISIBLE_DEVICES)
    threads: int  # torch threads: the actor's whole CPUs, at least one


class ChunkDetector:
    """A Ray Data actor: the model on this worker's device, run over whole chunks with ``predict_images``.

    Called with a pyarrow batch of chunk rows (``first``: the index of the chunk's first input, ``sources``:
    its paths or URLs), returns one row per input (``result_row``).
    """

    def __init__(self, model: torch.nn.Module, cfg: EvalConfig, settings: WorkerSettings) -> None:
        torch.set_num_threads(settings.threads)  # the forward pass's float results depend on the thread count
        self.device = torch.device("cuda" if settings.use_gpu else "cpu")
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.settings = settings

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows: list[dict[str, Any]] = []
        for first, sources in zip(batch.column("first").to_pylist(), batch.column("sources").to_pylist(), strict=True):
            paths = [s if is_object_url(s) else Path(s) for s in sources]
            results = predict_images(
                self.model,
                paths,
                self.cfg,
                min_score=self.settings.min_score,
                batch_size=self.settings.batch_size,
                device=self.device,
                max_pixels=self.settings.max_pixels,
            )
            rows += [result_row(first + i, r) for i, r in enumerate(results)]
        return pa.Table.from_pylist(rows, schema=result_schema())


def result_schema() -> Any:
    """The actors' output: one row per input, ``reason`` null for an image that was read."""
    import pyarrow as pa

    return pa.schema(
        [
            ("index", pa.int64()),
            ("reason", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("boxes", pa.list_(pa.float64())),  # [K * 4] xyxy pixels, row-major
            ("scores", pa.list_(pa.float64())),  # [K]
            ("labels", pa.list_(pa.int64())),  # [K]
        ]
    )


def result_row(index: int, result: Prediction | Failure) -> dict[str, Any]:
    """One input's result as a row of ``result_schema`` (float64 values unchanged)."""
    if isinstance(result, Failure):
        return {
            "index": index,
            "reason": result.reason,
            "width": 0,
            "height": 0,
            "boxes": [],
            "scores": [],
            "labels": [],
        }
    return {
        "index": index,
        "reason": None,
        "width": result.width,
        "height": result.height,
        "boxes": result.boxes.reshape(-1).tolist(),
        "scores": result.scores.tolist(),
        "labels": result.labels.tolist(),
    }


def from_row(row: dict[str, Any], path: Path | str) -> Prediction | Failure:
    """``result_row``'s inverse, for the input at ``path``."""
    if row["reason"] is not None:
        return Failure(path, row["reason"])
    boxes = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4)  # [K, 4]
    scores = np.asarray(row["scores"], dtype=np.float64)  # [K]
    labels = np.asarray(row["labels"], dtype=np.int64)  # [K]
    return Prediction(path, row["width"], row["height"], boxes, scores, labels, None)


def chunk_rows(paths: list[Path | str], batch_size: int) -> list[dict[str, Any]]:
    """The dataset: the chunks ``predict_images`` forms (``batch_size`` consecutive inputs, the last shorter)."""
    return [
        {"first": i, "sources": [str(p) for p in paths[i : i + batch_size]]} for i in range(0, len(paths), batch_size)
    ]


def run_detectors(
    model: torch.nn.Module, paths: list[Path | str], params: Params, args: argparse.Namespace, use_gpu: bool
) -> list[Prediction | Failure]:
    """Every input's result, in input order, from ``--ray-workers`` ``ChunkDetector`` actors (Ray connected)."""
    import pyarrow as pa
    import ray
    import ray.data

    threads = max(1, int(args.ray_cpus_per_worker))
    settings = WorkerSettings(args.min_score, args.batch_size, params.prepare.max_image_pixels, use_gpu, threads)
    chunks = chunk_rows(paths, args.batch_size)
    blocks = min(len(chunks), BLOCKS_PER_WORKER * args.ray_workers)
    dataset = ray.data.from_items(chunks, override_num_blocks=blocks).map_batches(
        ChunkDetector,
        fn_constructor_args=(model, params.eval, settings),  # Ray Data puts them in its object store
        batch_size=1,  # one chunk per call: whole chunks, spread evenly over the actors
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=args.ray_workers),
        num_cpus=args.ray_cpus_per_worker,
        num_gpus=1 if use_gpu else 0,
    )
    table = pa.concat_tables(list(dataset.iter_batches(batch_format="pyarrow", batch_size=None)))
    rows = sorted(table.to_pylist(), key=lambda r: r["index"])
    if [r["index"] for r in rows] != list(range(len(paths))):
        raise RuntimeError(f"predict --ray: expected one result per input ({len(paths)}), got {len(rows)}")
    return [from_row(row, path) for row, path in zip(rows, paths, strict=True)]


def check_ray_options(args: argparse.Namespace) -> None:
    """Refuse bad ``--ray-workers`` / ``--ray-cpus-per-worker`` / ``--device`` values (``InputError``)."""
    if args.ray_workers < 1:
        raise InputError(f"predict: --ray-workers: expected a positive number, got {args.ray_workers}")
    if not args.ray_cpus_per_worker > 0:
        raise InputError(f"predict: --ray-cpus-per-worker: expected a positive number, got {args.ray_cpus_per_worker}")
    if str(args.device).strip().lower() not in RAY_DEVICES:
        raise InputError(
            f"predict --ray: --device: expected one of {', '.join(RAY_DEVICES)} (Ray gives each worker its GPU), "
            f"got {args.device!r}"
        )


def wants_gpu(device: str) -> bool:
    """Whether the actors reserve a GPU: ``cuda``, or ``auto`` when the connected cluster has one.

    Raises:
        InputError: ``cuda`` on a cluster without GPUs (the actors would wait for one forever).
    """
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    device = str(device).strip().lower()
    if device == "cuda" and gpus < 1:
        raise InputError("predict --ray: --device cuda: the Ray cluster has no GPU")
    return device == "cuda" or (device == "auto" and gpus >= 1)


def publish(location: str, data: bytes, *, overwrite: bool) -> None:
    """Write an output file: atomically on a local disk, one PUT on an object store (``check_output`` made
    sure beforehand that nothing of the user's lies there)."""
    if is_object_url(location):
        storage.put_bytes(location, data)
    else:
        write_bytes_atomic(Path(location), data, overwrite=overwrite)


def run_ray(args: argparse.Namespace, params: Params) -> int:
    """``predict --ray``: check everything, join or start Ray, detect, write; the exit status."""
    import ray

    from pipeline.training.ray_runtime import connect_ray

    started = time.perf_counter()
    out = str(args.out)
    try:
        check_options(args, params)
        check_ray_options(args)
        located = [(str(i), "input") for i in args.inputs if is_object_url(i)]
        storage.check_all([*located, *([(out, "--out")] if is_object_url(out) else [])])
        paths = collect_inputs(args.inputs, urls=True)
        owned = check_output(out, args.inputs, paths, draw=False, extra=[TABLE_NAME])
        loaded = load_model(args.model, params, map_location="cpu")
    except USAGE_ERRORS as error:
        return refuse(error, args)
    if not args.no_draw:
        logger.info("predict --ray: drawn copies are not written (detections.json, results.json, %s)", TABLE_NAME)

    connected = connect_ray(
        cpus_needed=int(np.ceil(args.ray_workers * args.ray_cpus_per_worker)),
        address=args.ray_address,
        dashboard=False,
        purpose="predict",
    )
    try:
        try:
            use_gpu = wants_gpu(args.device)
        except InputError as error:
            return refuse(error, args)
        logger.info(
            "predict --ray: %d input(s) with %s (%s, %d classes) on %d %s worker(s)",
            len(paths),
            args.model,
            loaded.preset,
            len(loaded.classes),
            args.ray_workers,
            "GPU" if use_gpu else "CPU",
        )
        results = run_detectors(loaded.model, paths, params, args, use_gpu)
    finally:
        if connected:
            ray.shutdown()
    predictions = [r for r in results if isinstance(r, Prediction)]
    failures = [r for r in results if isinstance(r, Failure)]
    for failure in failures:
        logger.warning("%s: skipped, not a usable image (%s)", failure.path, failure.reason)
    elapsed = time.perf_counter() - started
    logger.info("predict --ray: %.1f s, %.1f images/s", elapsed, len(results) / max(elapsed, 1e-9))

    info = {**run_info(args, params, loaded), "ray_workers": args.ray_workers}
    document = detections_json(predictions, failures, loaded.classes, info=info)
    write_outputs(out, owned, document, detections_table(predictions, loaded.classes))
    logger.info(
        "predict --ray: %d images, %d detections, %d failed (see %s)",
        len(predictions),
        len(document["annotations"]),
        len(failures),
        storage.describe(storage.join(out, DETECTIONS_NAME)),
    )
    return 0 if predictions else 1


def write_outputs(out: str, owned: bool, document: dict[str, Any], table: bytes) -> None:
    """The three output files in ``out``; an owned ``out`` gets predict's marker first."""
    if owned and is_object_url(out):
        if not owns(out, PREDICT_STAGE):
            write_marker(out, PREDICT_STAGE)
    elif owned:
        claim_output_folder(Path(out), PREDICT_STAGE)
    publish(storage.join(out, DETECTIONS_NAME), dumps_by_record(document).encode("utf-8"), overwrite=owned)
    publish(storage.join(out, RESULTS_NAME), dumps_by_record(results_list(document)).encode("utf-8"), overwrite=owned)
    publish(storage.join(out, TABLE_NAME), table, overwrite=owned)
