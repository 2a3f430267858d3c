"""``python -m pipeline predict``: detect objects in image files and folders with a trained model file.

No Ray, no MLflow, no shards: the model file (``pipeline.artifacts.model_file``) and the images are all it needs.

Inputs are files and folders. A folder contributes the files directly inside it (not its subfolders) whose
extension is one of ``IMAGE_EXTENSIONS`` (any case), sorted by name; a file named on the command line is
always tried, whatever its extension. A path given twice is read once. Each image is read with
``pipeline.sources.images.load_rgb`` (decompression-bomb guard ``prepare.max_image_pixels``, EXIF
orientation, RGB), resized to the model's input with ``eval_transform``, and batched; ``postprocess`` with
``eval.score_threshold``/``top_k``/``nms_iou``/``max_detections`` returns boxes in pixels of the upright
original, and detections scoring below ``--min-score`` are left out. An image that cannot be read is
logged, listed under ``"failed"`` and skipped.

Outputs in ``--out`` (files of earlier runs with other names are left alone). Each file is written
atomically. ``--out`` is checked before any work starts (``check_output``): it may be neither an input
folder nor inside one, and no input may lie where outputs go (``--out/images/``, the two JSON files),
resolving symbolic links. A new or empty ``--out`` becomes predict's own (marker file ``.ssd-pipeline``,
``pipeline.artifacts.output_folder``), and a later run replaces its outputs there; in any other existing
folder predict only creates files and refuses, before starting, when one of its output names is taken.

=====================  ==================================================================================
``detections.json``    ``{"info", "images", "categories", "annotations", "failed"}``: COCO ground-truth
                       layout holding results. ``images``: ``{"id", "file_name", "width", "height"}`` (ids
                       1..N in input order, upright size; ``"drawn"``: the drawn copy, relative to
                       ``--out``); ``categories``: ``{"id", "name"}`` with the model's labels 1..C-1;
                       ``annotations``: ``{"id", "image_id", "category_id", "bbox": [x, y, w, h],
                       "score", "area"}`` in original pixels (bbox to 1/100 px, score to 1e-5, per image by
                       decreasing score); ``failed``: ``{"file", "reason"}``
``results.json``       the plain COCO results list ``[{"image_id", "category_id", "bbox", "score"}]``, as
                       ``COCO.loadRes`` / ``faster_coco_eval`` read it (same ids)
``images/<name>``      each image with its detections drawn (``pipeline.report.drawing``), upright, at its
                       original size; PNG for ``.png`` inputs, JPEG otherwise; a name already taken by an
                       earlier input gets ``-2``, ``-3``, ... before its extension
=====================  ==================================================================================

Exit status: 0 when at least one image was read, 1 when every image failed, 2 for a usage error (no
inputs, a missing path, an unreadable model file, a bad ``--device``, an ``--out`` refused as above).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from pipeline.artifacts.atomic_write import write_bytes_atomic
from pipeline.artifacts.output_folder import MARKER_NAME, claim_output_folder, owns
from pipeline.config import EvalConfig, Params
from pipeline.sources.images import ImageRejected, load_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
DETECTIONS_NAME = "detections.json"
RESULTS_NAME = "results.json"
DRAWN_FOLDER = "images"
JPEG_QUALITY = 90  # drawn copies: small files, labels still crisp
MAX_PENDING_SAVES = 16  # drawn images waiting to be written before inference waits for them
READ_THREADS = 4  # decoding and resizing overlap with the forward pass (PIL and torch release the GIL)
_BOX_DECIMALS = 2  # as pipeline.report.coco_eval: 1/100 pixel
_SCORE_DECIMALS = 5
PREDICT_STAGE = "predict"  # the marker of an output folder predict made (pipeline.artifacts.output_folder)


class InputError(ValueError):
    """A usage error: no inputs, a missing path, nothing to read, a bad option value."""


class Prediction(NamedTuple):
    """Detections of one image that was read, boxes in pixels of the upright original."""

    path: Path
    width: int  # upright (EXIF-oriented) size
    height: int
    boxes: np.ndarray  # float64 [K, 4] xyxy pixels, by decreasing score
    scores: np.ndarray  # float64 [K], each >= min_score
    labels: np.ndarray  # int64 [K], 1..C-1
    image: Image.Image | None  # the upright RGB image (for drawing); None once drawn


class Failure(NamedTuple):
    """An input that could not be read; ``reason`` is ``"<kind>: <detail>"``."""

    path: Path
    reason: str


# --------------------------------------------------------------------------------------------- inputs
def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs`` (files and folders), in order, each once.

    A folder gives its direct children with an extension in ``IMAGE_EXTENSIONS`` (any case), sorted by
    name; a file is taken as it is (reading it decides whether it is an image).

    Raises:
        InputError: ``inputs`` is empty, a path does not exist or is neither file nor folder, or no image
            was found at all.
    """
    if not inputs:
        raise InputError("predict: expected at least one image file or folder, got none")
    paths: list[Path] = []
    seen: set[Path] = set()
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(
                (p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                key=lambda p: p.name,
            )
            if not found:
                logger.warning(
                    "%s: no images in this folder (extensions %s; subfolders are not read)",
                    path,
                    ", ".join(sorted(IMAGE_EXTENSIONS)),
                )
        elif path.is_file():
            found = [path]
        elif path.exists():
            raise InputError(f"predict: {path} is neither a file nor a folder")
        else:
            raise InputError(f"predict: {path}: no such file or folder")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)
    if not paths:
        raise InputError(f"predict: no images found in {[str(i) for i in inputs]}")
    return paths


def drawn_names(paths: Sequence[Path]) -> list[str]:
    """File name of each input's drawn copy: its stem with ``.png`` for ``.png`` inputs, ``.jpg`` otherwise.

    Names are unique without regard to case (case-insensitive file systems): a name an earlier input took
    gets ``-2``, ``-3``, ... before the extension. Computed from the paths alone, so the names do not
    depend on which images fail.
    """
    taken: set[str] = set()
    names = []
    for path in paths:
        ext = ".png" if path.suffix.lower() == ".png" else ".jpg"
        name, n = f"{path.stem}{ext}", 1
        while name.lower() in taken:
            n += 1
            name = f"{path.stem}-{n}{ext}"
        taken.add(name.lower())
        names.append(name)
    return names


def check_output(out: Path, inputs: Sequence[str | Path], paths: Sequence[Path], *, draw: bool) -> bool:
    """Refuse an ``--out`` that could overwrite an input or a file the pipeline did not make, before any work.

    ``inputs``: the files and folders as given; ``paths``: the images ``collect_inputs`` found in them.
    Returns whether ``out`` is predict's own (new, empty, or carrying its marker), where earlier outputs may
    be replaced; otherwise only new files may be written.

    Raises:
        InputError: ``out`` is, or lies inside, an input folder; an input folder or file lies in
            ``out/images`` or is one of the output files; ``out`` is a file; or ``out`` is not predict's and
            already holds one of the files this run would write (all named, with their resolved paths).
    """
    real_out = out.resolve()
    real_drawn = (out / DRAWN_FOLDER).resolve()
    outputs = {(out / DETECTIONS_NAME).resolve(), (out / RESULTS_NAME).resolve()}
    for given in inputs:
        path = Path(given)
        real = path.resolve()
        if path.is_dir() and (real_out == real or real_out.is_relative_to(real)):
            where = "is the input folder" if real_out == real else "lies inside the input folder"
            raise InputError(
                f"predict: --out {out} ({real_out}) {where} {path} ({real}); its outputs could overwrite the "
                "images or mix with them. Choose an output folder outside every input folder"
            )
        if real.is_relative_to(real_drawn) or real in outputs:  # is_relative_to: equal, or inside
            raise InputError(
                f"predict: the input {path} ({real}) lies where --out {out} ({real_out}) writes its outputs "
                f"({DRAWN_FOLDER}/, {DETECTIONS_NAME}, {RESULTS_NAME}); choose another --out"
            )
    if out.exists() and not out.is_dir():
        raise InputError(f"predict: --out {out} is a file; expected a folder")
    if not out.exists() or owns(out, PREDICT_STAGE) or not any(out.iterdir()):
        return True
    targets = [out / DETECTIONS_NAME, out / RESULTS_NAME]
    if draw:
        targets += [out / DRAWN_FOLDER / name for name in drawn_names(paths)]
    taken = [t for t in targets if t.exists() or t.is_symlink()]
    if taken:
        shown = ", ".join(str(t) for t in taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
        raise InputError(
            f"predict: --out {out} was not made by predict (no {MARKER_NAME} marker) and already holds {shown}; "
            "predict writes only new files there. Choose a new or empty --out, or move those files away"
        )
    return False


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch device.

    Raises:
        InputError: another value, or CUDA asked for where there is none (or not that many devices).
    """
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(spec[5:]) if ":" in spec else 0
        if index >= count:
            raise InputError(f"predict: --device {spec}: this machine has {count} CUDA device(s)")
        return torch.device(spec)
    raise InputError(f"predict: --device: expected auto, cpu, cuda or cuda:N, got {spec!r}")


# ------------------------------------------------------------------------------------------ inference
def read_image(path: Path, *, image_size: int, max_pixels: int) -> tuple[Image.Image, torch.Tensor]:
    """The upright RGB image and its uint8 ``[3, S, S]`` model input (``S = image_size``).

    Raises:
        ImageRejected: the file is not a usable image (reason as ``pipeline.sources.images``).
    """
    from ssd_core.augment import eval_transform

    image = load_rgb(path, max_pixels=max_pixels)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W, 3], a writable copy
    return image, eval_transform(pixels.permute(2, 0, 1), image_size)  # [3, S, S]


def _read(path: Path, image_size: int, max_pixels: int) -> tuple[Image.Image, torch.Tensor] | Failure:
    try:
        return read_image(path, image_size=image_size, max_pixels=max_pixels)
    except ImageRejected as error:
        return Failure(path, f"{error.reason}: {error.detail}")
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:  # one bad file never ends the run
        return Failure(path, f"image_unreadable: {type(error).__name__}: {error}")


def predict_images(
    model: torch.nn.Module,
    paths: Sequence[Path],
    cfg: EvalConfig,
    *,
    min_score: float,
    batch_size: int,
    device: torch.device,
    max_pixels: int,
) -> Iterator[Prediction | Failure]:
    """Run ``model`` (an ``ssd_core.model.SSD``) over ``paths``, yielding one result per path, in order.

    Images are read ``batch_size`` at a time on ``READ_THREADS`` threads, the next batch while the model
    runs on this one; the images of a batch that could be read go through one forward pass.
    """
    from ssd_core.augment import normalize_images
    from ssd_core.postprocess import postprocess

    if batch_size < 1:
        raise InputError(f"predict: --batch-size: expected a positive number, got {batch_size}")
    model.eval()
    image_size = int(model.image_size)
    priors = model.priors().to(device)  # [P, 4] cxcywh
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, batch_size))) as pool:

        def submit(chunk: list[Path]) -> list[Future]:
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
                with torch.inference_mode():
                    output = model(normalize_images(batch))
                    detections = postprocess(
                        output.loc,
                        output.cls_logits,
                        priors,
                        sizes,
                        score_threshold=cfg.score_threshold,
                        top_k=cfg.top_k,
                        nms_iou=cfg.nms_iou,
                        max_detections=cfg.max_detections,
                    )
            by_index = dict(zip(ok, detections, strict=True))
            for i, path in enumerate(chunk):
                if i not in by_index:
                    yield read[i]
                    continue
                det, (image, _) = by_index[i], read[i]
                scores = det.scores.float().cpu().numpy().astype(np.float64)  # [K]
                keep = scores >= min_score
                yield Prediction(
                    path,
                    image.width,
                    image.height,
                    det.boxes.float().cpu().numpy().astype(np.float64).reshape(-1, 4)[keep],  # [K', 4]
                    scores[keep],
                    det.labels.cpu().numpy().astype(np.int64)[keep],
                    image,
                )


# -------------------------------------------------------------------------------------------- outputs
def detections_json(
    predictions: Sequence[Prediction],
    failures: Sequence[Failure],
    classes: Sequence[str],
    *,
    drawn: Sequence[str | None] | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``detections.json`` document (see the module docstring); image ids are 1..N in ``predictions``
    order, annotation ids 1..M. ``drawn[i]``: the drawn copy of ``predictions[i]``, relative to the output
    folder (omitted when None)."""
    images, annotations = [], []
    for index, pred in enumerate(predictions):
        entry: dict[str, Any] = {
            "id": index + 1,
            "file_name": str(pred.path),
            "width": pred.width,
            "height": pred.height,
        }
        if drawn is not None and drawn[index] is not None:
            entry["drawn"] = drawn[index]
        images.append(entry)
        xy = pred.boxes[:, :2]
        wh = pred.boxes[:, 2:] - xy  # [K, 2]
        bboxes = np.round(np.concatenate([xy, wh], axis=1), _BOX_DECIMALS)  # [K, 4] xywh
        for box, score, label in zip(bboxes.tolist(), pred.scores.tolist(), pred.labels.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(label),
                    "bbox": box,
                    "score": round(float(score), _SCORE_DECIMALS),
                    "area": round(box[2] * box[3], _BOX_DECIMALS),
                }
            )
    return {
        "info": dict(info or {}),
        "images": images,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
        "annotations": annotations,
        "failed": [{"file": str(f.path), "reason": f.reason} for f in failures],
    }


def results_list(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The plain COCO results list of a ``detections_json`` document."""
    keys = ("image_id", "category_id", "bbox", "score")
    return [{k: a[k] for k in keys} for a in document["annotations"]]


def _save_drawn(pred: Prediction, classes: Sequence[str], path: Path, *, overwrite: bool) -> None:
    from pipeline.report.drawing import draw_detections

    order = np.argsort(pred.scores, kind="stable")  # ascending: the best box is drawn last, on top
    drawn = draw_detections(pred.image, pred.boxes[order], pred.scores[order], pred.labels[order], classes)
    buffer = io.BytesIO()
    if path.suffix == ".png":
        drawn.save(buffer, format="PNG")
    else:
        drawn.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    write_bytes_atomic(path, buffer.getvalue(), overwrite=overwrite)


def dumps_by_record(document: dict[str, Any] | list[Any]) -> str:
    """JSON with one record per line: a list's items, or each top-level value (lists: item by item).

    Easy to read and to ``grep``, and a fraction of the size of ``indent=`` output with its one line per
    number; ``json.loads`` gives back ``document``.
    """

    def items(values: list[Any], pad: str) -> str:
        if not values:
            return "[]"
        return "[\n" + ",\n".join(pad + json.dumps(v, ensure_ascii=False) for v in values) + "\n" + pad[:-1] + "]"

    if isinstance(document, list):
        return items(document, " ") + "\n"
    fields = [
        f" {json.dumps(k)}: {items(v, '  ') if isinstance(v, list) else json.dumps(v, ensure_ascii=False)}"
        for k, v in document.items()
    ]
    return "{\n" + ",\n".join(fields) + "\n}\n"


def _write_json(path: Path, document: dict[str, Any] | list[Any], *, overwrite: bool) -> None:
    write_bytes_atomic(path, dumps_by_record(document).encode("utf-8"), overwrite=overwrite)


# ----------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace, params: Params) -> int:
    from tqdm import tqdm

    from pipeline.artifacts.model_file import load_model_file

    started = time.perf_counter()
    out = Path(args.out)
    try:
        paths = collect_inputs(args.inputs)
        owned = check_output(out, args.inputs, paths, draw=not args.no_draw)
        device = resolve_device(args.device)
        if not 0.0 <= args.min_score <= 1.0:
            raise InputError(f"predict: --min-score: expected a score in [0, 1], got {args.min_score}")
        if args.batch_size < 1:
            raise InputError(f"predict: --batch-size: expected a positive number, got {args.batch_size}")
        loaded = load_model_file(args.model, map_location=device)
    except InputError as error:
        logger.error("%s", error)
        return 2
    except FileNotFoundError:
        logger.error(
            "predict: model file %s not found (write one with `python -m pipeline train`, or pass --model PATH)",
            args.model,
        )
        return 2
    except ValueError as error:  # not a model file of this format
        logger.error("predict: %s", error)
        return 2
    if args.min_score < params.eval.score_threshold:
        logger.warning(
            "predict: --min-score %.3g is below eval.score_threshold %.3g, which decides first",
            args.min_score,
            params.eval.score_threshold,
        )

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
                saving.append(savers.submit(_save_drawn, result, loaded.classes, target, overwrite=owned))
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

    info = {
        "model": str(args.model),
        "preset": loaded.preset,
        "min_score": args.min_score,
        "score_threshold": params.eval.score_threshold,
        "nms_iou": params.eval.nms_iou,
        "max_detections": params.eval.max_detections,
    }
    document = detections_json(predictions, failures, loaded.classes, drawn=drawn, info=info)
    _write_json(out / DETECTIONS_NAME, document, overwrite=owned)
    _write_json(out / RESULTS_NAME, results_list(document), overwrite=owned)
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
