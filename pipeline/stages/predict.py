"""``python -m pipeline predict``: detect objects in image files and folders with a trained model file.

No Ray, no MLflow, no shards: the model file (``pipeline.artifacts.model_file``) and the images are all it needs.

Inputs are files and folders (``pipeline.stages.predict_inputs``: which files a folder gives, and the
checks on ``--out`` made before any image is read). Each image is read with
``pipeline.sources.images.load_rgb`` (decompression-bomb guard ``prepare.max_image_pixels``, EXIF
orientation, RGB), resized to the model's input with ``eval_transform``, and batched; ``postprocess`` with
``eval.score_threshold``/``top_k``/``nms_iou``/``max_detections`` returns boxes in pixels of the upright
original, and detections scoring below ``--min-score`` are left out. An image that cannot be read is
logged, listed under ``"failed"`` and skipped.

Outputs in ``--out`` (files of earlier runs with other names are left alone), each written atomically;
their formats are in ``pipeline.stages.predict_outputs``:

=====================  ==============================================================================
``detections.json``    the images, their detections in original pixels, and the inputs that failed
``results.json``       the same detections as a plain COCO results list (``COCO.loadRes`` reads it)
``images/<name>``      each image with its detections drawn, upright, at its original size
=====================  ==============================================================================

``--model`` is a model file or a registered model, ``models:/NAME@ALIAS`` (``models:/ssd@champion``) or
``models:/NAME/VERSION``, whose model file is downloaded from the MLflow store of ``tracking.uri``.

Exit status: 0 when at least one image was read, 1 when every image failed, 2 for a usage error (no
inputs, a missing path, an unreadable model file or registered model, a bad ``--device``, an ``--out``
that ``check_output`` refuses).

``--ray`` runs the same ``predict_images`` on Ray Data actors over many machines, and reads and writes
object stores too (``pipeline.stages.predict_ray``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from pipeline.artifacts.output_folder import claim_output_folder
from pipeline.config import EvalConfig, Params
from pipeline.serving.detect import DetectSettings, detect, model_input
from pipeline.sources.images import ImageRejected, load_rgb
from pipeline.stages.predict_inputs import (
    DETECTIONS_NAME,
    DRAWN_FOLDER,
    PREDICT_STAGE,
    RESULTS_NAME,
    InputError,
    check_output,
    collect_inputs,
    drawn_names,
    is_object_url,
    resolve_device,
)
from pipeline.stages.predict_outputs import Failure, Prediction, detections_json, results_list, save_drawn, write_json
from pipeline.tracking.uris import TrackingError

logger = logging.getLogger(__name__)

MAX_PENDING_SAVES = 16  # drawn images waiting to be written before inference waits for them
READ_THREADS = 4  # decoding and resizing overlap with the forward pass (PIL and torch release the GIL)


# ------------------------------------------------------------------------------------------ inference
def read_image(path: Path | str, *, image_size: int, max_pixels: int) -> tuple[Image.Image, torch.Tensor]:
    """The upright RGB image and its uint8 ``[3, S, S]`` model input (``S = image_size``).

    ``path``: a local file, or an object-store URL (``predict --ray``) whose bytes are read whole first.

    Raises:
        ImageRejected: the file is not a usable image (reason as ``pipeline.sources.images``).
    """
    from pipeline import storage

    source = storage.read_bytes(path) if is_object_url(path) else path
    image = load_rgb(source, max_pixels=max_pixels)
    return image, model_input(image, image_size)


def _read(path: Path | str, image_size: int, max_pixels: int) -> tuple[Image.Image, torch.Tensor] | Failure:
    try:
        return read_image(path, image_size=image_size, max_pixels=max_pixels)
    except ImageRejected as error:
        return Failure(path, f"{error.reason}: {error.detail}")
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:  # one bad file never ends the run
        return Failure(path, f"image_unreadable: {type(error).__name__}: {error}")


def predict_images(
    model: torch.nn.Module,
    paths: Sequence[Path | str],
    cfg: EvalConfig,
    *,
    min_score: float,
    batch_size: int,
    device: torch.device,
    max_pixels: int,
) -> Iterator[Prediction | Failure]:
    """Run ``model`` (an ``ssd_core.model.SSD``) over ``paths`` (local files, or object-store URLs as
    strings), yielding one result per path, in order.

    Images are read ``batch_size`` at a time on ``READ_THREADS`` threads, the next batch while the model
    runs on this one; the images of a batch that could be read go through one forward pass.
    """
    if batch_size < 1:
        raise InputError(f"predict: --batch-size: expected a positive number, got {batch_size}")
    model.eval()
    image_size = int(model.image_size)
    settings = DetectSettings.from_eval(cfg, min_score)
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, batch_size))) as pool:

        def submit(chunk: list[Path | str]) -> list[Future]:
            return [pool.submit(_read, p, image_size, max_pixels) for p in chunk]

        pending = submit(chunks[0]) if chunks else []
        for k, chunk in enumerate(chunks):
            current, pending = pending, (submit(chunks[k + 1]) if k + 1 < len(chunks) else [])
            read = [future.result() for future in current]
            ok = [i for i, r in enumerate(read) if not isinstance(r, Failure)]
            detections = []
            if ok:
                batch = torch.stack([read[i][1] for i in ok]).to(device)  # uint8 [B, 3, S, S]
                sizes = [read[i][0].size for i in ok]  # [B] (width, height) of the upright originals
                detections = detect(model, batch, sizes, settings)
            by_index = dict(zip(ok, detections, strict=True))
            for i, path in enumerate(chunk):
                if i not in by_index:
                    yield read[i]
                    continue
                det, (image, _) = by_index[i], read[i]
                yield Prediction(path, image.width, image.height, det.boxes, det.scores, det.labels, image)


# ----------------------------------------------------------------------------------------------- main
def load_model(model: str | Path, params: Params, map_location: str | torch.device = "cpu"):
    """``--model`` loaded (``pipeline.artifacts.model_file.LoadedModel``): a model file as given, or the model
    file of a registered model ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``, downloaded from the store of
    ``params.tracking`` into a temporary folder that is removed once the file is loaded.

    Raises:
        FileNotFoundError: no model file there. ValueError: not a model file, or a malformed ``models:/`` URI.
        TrackingError: the store has no such model, alias or version, or does not answer.
    """
    import shutil

    from pipeline.artifacts.model_file import load_model_file
    from pipeline.serving.model_uri import download_model_file, is_model_uri
    from pipeline.storage import check_reachable

    if not is_model_uri(model):
        check_reachable(str(model), "--model")  # an object store that does not answer: seconds, not minutes
        return load_model_file(model, map_location=map_location)
    local = download_model_file(str(model), params.tracking, Path.cwd())
    try:
        return load_model_file(local, map_location=map_location)
    finally:
        shutil.rmtree(local.parent, ignore_errors=True)


def run_info(args: argparse.Namespace, params: Params, loaded) -> dict[str, object]:
    """``detections.json``'s ``info``: the model and the post-processing settings the detections come from."""
    return {
        "model": str(args.model),
        "preset": loaded.preset,
        "min_score": args.min_score,
        "score_threshold": params.eval.score_threshold,
        "nms_iou": params.eval.nms_iou,
        "max_detections": params.eval.max_detections,
    }


def check_options(args: argparse.Namespace, params: Params) -> None:
    """Refuse a bad ``--min-score`` or ``--batch-size`` (``InputError``); warn when ``eval.score_threshold``
    decides before ``--min-score``."""
    if not 0.0 <= args.min_score <= 1.0:
        raise InputError(f"predict: --min-score: expected a score in [0, 1], got {args.min_score}")
    if args.batch_size < 1:
        raise InputError(f"predict: --batch-size: expected a positive number, got {args.batch_size}")
    if args.min_score < params.eval.score_threshold:
        logger.warning(
            "predict: --min-score %.3g is below eval.score_threshold %.3g, which decides first",
            args.min_score,
            params.eval.score_threshold,
        )


def refuse(error: Exception, args: argparse.Namespace) -> int:
    """Log a usage error raised while checking inputs, options or the model; the exit status (2)."""
    if isinstance(error, FileNotFoundError):
        logger.error(
            "predict: model file %s not found (write one with `python -m pipeline train`, or pass --model PATH)",
            args.model,
        )
    elif isinstance(error, InputError):
        logger.error("%s", error)
    else:  # not a model file of this format; no such registered model; an object store that does not answer
        logger.error("predict: %s", error)
    return 2


USAGE_ERRORS = (FileNotFoundError, ValueError, TrackingError)  # InputError and StorageError are ValueErrors


def main(args: argparse.Namespace, params: Params) -> int:
    from tqdm import tqdm

    if getattr(args, "ray", False):
        from pipeline.stages.predict_ray import run_ray  # imports Ray: only here

        return run_ray(args, params)
    started = time.perf_counter()
    out = Path(args.out)
    try:
        if is_object_url(args.out):
            raise InputError(f"predict: --out {args.out}: object-store outputs need --ray")
        paths = collect_inputs(args.inputs)
        owned = check_output(out, args.inputs, paths, draw=not args.no_draw)
        device = resolve_device(args.device)
        check_options(args, params)
        loaded = load_model(args.model, params, map_location=device)
    except USAGE_ERRORS as error:
        return refuse(error, args)

    if owned:
        claim_output_folder(out, PREDICT_STAGE)
    drawn_dir = out / DRAWN_FOLDER
    if not args.no_draw:
        drawn_dir.mkdir(parents=True, exist_ok=True)
    names = drawn_names(paths)
    name_of = {p: names[i] for i, p in enumerate(paths)}
    logger.info(
        "predict: %d input(s) with %s (%s, %d classes) on %s",
        len(paths),
        args.model,
        loaded.preset,
        len(loaded.classes),
        device,
    )

    predictions: list[Prediction] = []
    failures: list[Failure] = []
    drawn: list[str | None] = []
    saving: list[Future] = []
    bar = tqdm(total=len(paths), desc="predict", unit="image", disable=None, leave=False)
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, os.cpu_count() or 1)) as savers:
        results = predict_images(
            loaded.model,
            paths,
            params.eval,
            min_score=args.min_score,
            batch_size=args.batch_size,
            device=device,
            max_pixels=params.prepare.max_image_pixels,
        )
        for result in results:
            bar.update(1)
            if isinstance(result, Failure):
                logger.warning("%s: skipped, not a usable image (%s)", result.path, result.reason)
                failures.append(result)
                continue
            if args.no_draw:
                drawn.append(None)
            else:
                target = drawn_dir / name_of[result.path]
                saving.append(savers.submit(save_drawn, result, loaded.classes, target, overwrite=owned))
                drawn.append(f"{DRAWN_FOLDER}/{target.name}")
            predictions.append(result._replace(image=None))  # keep the numbers only, not every image
            while len(saving) > MAX_PENDING_SAVES:  # bound the images held in memory by waiting saves
                saving.pop(0).result()
            for future in [f for f in saving if f.done()]:
                future.result()  # a failed save (disk full, no permission) ends the run here, with its error
            saving = [f for f in saving if not f.done()]
        for future in saving:
            future.result()
    bar.close()
    elapsed = time.perf_counter() - started
    logger.info("predict: %.1f s, %.1f images/s", elapsed, (len(predictions) + len(failures)) / max(elapsed, 1e-9))

    document = detections_json(predictions, failures, loaded.classes, drawn=drawn, info=run_info(args, params, loaded))
    write_json(out / DETECTIONS_NAME, document, overwrite=owned)
    write_json(out / RESULTS_NAME, results_list(document), overwrite=owned)
    shown = f"{args.min_score:.2f}" if round(args.min_score, 2) == args.min_score else f"{args.min_score:g}"
    logger.info(
        "predict: %d images, %d detections ≥ %s, %d failed (see %s)",
        len(predictions),
        len(document["annotations"]),
        shown,
        len(failures),
        out / DETECTIONS_NAME,
    )
    return 0 if predictions else 1
