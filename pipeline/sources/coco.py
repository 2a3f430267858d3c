"""COCO instances JSON reader (``data.coco.{train,val}_json`` with their image folders).

- Classes: the training JSON's categories in ascending id order become labels 1..C (contiguous, whatever
  the ids are); the validation JSON is mapped by category *name*, so both files may number them differently.
- ``bbox`` is ``[x, y, w, h]`` in continuous pixels -> xyxy ``[x, y, x + w, y + h]``.
- Source ids are ``<split>/<COCO image id>``.
- ``iscrowd: 1`` boxes are kept as *difficult* boxes: matching and VOC-style metrics ignore them, as
  COCO's own evaluation ignores crowd regions.

Every entry is type-checked, and a bad one is counted, never fatal:

- images: not an object, ``id`` not an int (bools are not ids), ``file_name`` not a non-empty string
  (``annotation_malformed``); a file name with a NUL byte, absolute, with a ``..`` part, or leading outside
  the image folder through a link (``unsafe_path``).
- annotations: not an object, ``id``/``image_id``/``category_id`` not an int, ``iscrowd`` not the int 0 or
  1 (``annotation_malformed``; a string ``"0"`` is not 0); an ``image_id`` naming no image (``box_orphan``);
  a ``category_id`` naming no category (``unknown_class``); a ``bbox`` that is not four numbers
  (``box_malformed``) or holds non-finite ones (``box_nonfinite``).

What would make the whole file ambiguous stops the stage with a ``PrepareError`` naming the file and the
entries: not JSON (or nested deeper than the parser can follow), no ``images``/``annotations`` lists, a
malformed category, and a repeated category id or name, image id or annotation id (two categories with one
id would merge two classes and relabel one's boxes; two images with one id would leave it open which one
its annotations describe).
"""

from __future__ import annotations

import json
import logging
import math
import reprlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.config import CocoConfig
from pipeline.file_names import relative_path_problem
from pipeline.sources.records import Candidate, PrepareError, RawObject
from pipeline.sources.report import PrepareReport

logger = logging.getLogger(__name__)

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def load_coco_json(path: Path) -> dict[str, Any]:
    """Read an instances JSON; PrepareError when it is unreadable or lacks ``images``/``annotations`` lists."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PrepareError(f"{path}: cannot read COCO JSON ({error})") from None
    except (json.JSONDecodeError, UnicodeError) as error:
        raise PrepareError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise PrepareError(f"{path}: JSON nested too deeply to parse (a COCO file is at most ~4 levels deep)") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise PrepareError(f"{path}: expected a COCO instances JSON object with 'images' and 'annotations' lists")
    return data


def category_names(data: dict[str, Any], path: Path) -> dict[int, str]:
    """Category id -> name, in ascending id order.

    Raises:
        PrepareError: no categories, an entry without an int ``id`` and a non-empty string ``name``, or a
            repeated id or name (naming the entries).
    """
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise PrepareError(f"{path}: no 'categories' list (each category needs an int 'id' and a 'name')")
    names: dict[int, str] = {}
    where_id: dict[int, int] = {}
    where_name: dict[str, int] = {}
    for number, cat in enumerate(categories):
        name = cat.get("name") if isinstance(cat, dict) else None
        if not isinstance(cat, dict) or not _is_id(cat.get("id")) or not isinstance(name, str) or not name.strip():
            raise PrepareError(
                f'{path}: categories[{number}]: expected {{"id": <int>, "name": <non-empty string>}}, got {_short(cat)}'
            )
        cat_id, name = cat["id"], name.strip()
        if cat_id in where_id:
            raise PrepareError(
                f"{path}: categories[{where_id[cat_id]}] and categories[{number}] share id {cat_id} "
                f"({names[cat_id]!r}, {name!r}); category ids must be unique"
            )
        if name in where_name:
            raise PrepareError(
                f"{path}: categories[{where_name[name]}] and categories[{number}] share name {name!r}; "
                "category names must be unique"
            )
        names[cat_id], where_id[cat_id], where_name[name] = name, number, number
    return dict(sorted(names.items()))


def coco_candidates(cfg: CocoConfig, report: PrepareReport) -> tuple[list[Candidate], list[str]]:
    """Candidates of both splits and the class names (training categories in id order)."""
    if not cfg.train_json:
        raise PrepareError("data.coco.train_json: data.source is 'coco' but no training JSON was given")
    splits = [("train", cfg.train_json, cfg.train_images)]
    if cfg.val_json:
        splits.append(("val", cfg.val_json, cfg.val_images))
    else:
        logger.warning("data.coco.val_json is empty: the validation split will be empty")
    candidates: list[Candidate] = []
    classes: list[str] | None = None
    for split, json_path, images_dir in splits:
        path = Path(json_path)
        data = load_coco_json(path)
        names = category_names(data, path)
        if classes is None:
            classes = list(names.values())
        images = Path(images_dir) if images_dir else path.parent
        candidates += _split_candidates(data, names, path, images, split, report)
    assert classes is not None
    return candidates, classes


def _split_candidates(
    data: dict[str, Any], names: dict[int, str], path: Path, images_dir: Path, split: str, report: PrepareReport
) -> list[Candidate]:
    _refuse_repeated_ids(data["images"], "images", path)
    _refuse_repeated_ids(data["annotations"], "annotations", path)
    image_ids = {img["id"] for img in data["images"] if isinstance(img, dict) and _is_id(img.get("id"))}
    objects: dict[int, list[RawObject]] = defaultdict(list)
    for number, ann in enumerate(data["annotations"]):
        where = f"{path} annotations[{number}]"
        problem = _annotation_problem(ann)
        if problem:
            report.reject_boxes(where, "annotation_malformed", detail=problem)
        elif ann["image_id"] not in image_ids:
            report.reject_boxes(where, "box_orphan", detail=f"image_id {ann['image_id']!r}")
        else:
            objects[ann["image_id"]].append(_object(ann, names))

    base = images_dir.resolve()
    candidates = []
    for number, img in enumerate(data["images"]):
        image_id = img.get("id") if isinstance(img, dict) else None
        boxes = len(objects[image_id]) if _is_id(image_id) else 0
        file_name = img.get("file_name") if isinstance(img, dict) else None
        if not _is_id(image_id) or not isinstance(file_name, str) or not file_name:
            detail = f"expected an int 'id' and a non-empty string 'file_name', got {_short(img)}"
            report.reject_image(f"{path} images[{number}]", "annotation_malformed", detail, boxes=boxes)
            continue
        where = f"{path} image id {image_id} ({file_name!r})"
        unsafe = relative_path_problem(file_name)
        image_path = None if unsafe else (base / file_name).resolve()
        if image_path is not None and not image_path.is_relative_to(base):
            unsafe = f"leads outside {base} (through a link)"
        if unsafe or image_path is None:
            report.reject_image(where, "unsafe_path", unsafe, boxes=boxes)
            continue
        size = (img.get("width"), img.get("height"))
        declared = size if all(_is_id(v) and v > 0 for v in size) else None
        candidates.append(
            Candidate(f"{split}/{image_id}", split, image_path, where, declared, tuple(objects[image_id]))
        )
    return candidates


def _refuse_repeated_ids(entries: list[Any], key: str, path: Path) -> None:
    """PrepareError naming the first two ``entries`` (``images`` or ``annotations``) that share an int id."""
    first: dict[int, int] = {}
    for number, entry in enumerate(entries):
        entry_id = entry.get("id") if isinstance(entry, dict) else None
        if not _is_id(entry_id):
            continue  # counted as malformed where the entry is read
        if entry_id in first:
            raise PrepareError(
                f"{path}: {key}[{first[entry_id]}] and {key}[{number}] share id {entry_id}; "
                f"{key} ids must be unique (was the file merged from two sources?)"
            )
        first[entry_id] = number


def _annotation_problem(ann: Any) -> str:
    """Why an annotation entry cannot be read (its field types), or "" when it can."""
    if not isinstance(ann, dict):
        return f"expected an object, got {_short(ann)}"
    for key in ("id", "image_id", "category_id"):
        if not _is_id(ann.get(key)):
            return f"{key}: expected an int, got {_short(ann.get(key))}"
    crowd = ann.get("iscrowd", 0)
    if not _is_id(crowd) or crowd not in (0, 1):
        return f"iscrowd: expected 0 or 1, got {_short(crowd)}"
    return ""


def _object(ann: dict[str, Any], names: dict[int, str]) -> RawObject:
    """A type-checked annotation (see ``_annotation_problem``) -> RawObject, with box problems named."""
    name = names.get(ann["category_id"])
    difficult = ann.get("iscrowd", 0) == 1
    bbox = ann.get("bbox")
    if name is None:
        return RawObject(None, None, difficult, "unknown_class")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return RawObject(name, None, difficult, "box_malformed")
    x, y, w, h = (_as_float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return RawObject(name, None, difficult, "box_nonfinite")
    return RawObject(name, (x, y, x + w, y + h), difficult)


def _is_id(value: Any) -> bool:
    """COCO ids (and sizes, and iscrowd) are JSON ints; ``true`` is not 1 and ``"1"`` is not 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: int | float) -> float:
    """``float(value)``; an int too large for a float is infinite (counted as non-finite, never raised)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _short(value: Any) -> str:
    """A bounded ``repr`` of a hostile value for log lines and errors: at most 3 levels deep (a deeply
    nested value cannot exhaust the stack here), long strings and containers abbreviated."""
    return _REPR.repr(value)
