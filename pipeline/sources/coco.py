"""COCO instances JSON reader (``data.coco.{train,val}_json`` with their image folders).

- Classes: the training JSON's categories in ascending id order become labels 1..C (contiguous, whatever
  the ids are); the validation JSON is mapped by category *name*, so both files may number them differently.
- ``bbox`` is ``[x, y, w, h]`` in continuous pixels -> xyxy ``[x, y, x + w, y + h]``.
- Source ids are ``<split>/<COCO image id>``.
- ``iscrowd: 1`` boxes are kept as *difficult* boxes: matching and VOC-style metrics ignore them, as
  COCO's own evaluation ignores crowd regions.
- Bad entries are counted, never fatal: an image entry without id/file name (``annotation_malformed``),
  a repeated image id (``duplicate_id``), a file name leading outside the image folder (``unsafe_path``),
  an annotation naming no known image (``box_orphan``) or no known category (``unknown_class``), a bbox
  that is not four numbers (``box_malformed``). A file that is not a COCO JSON at all stops the stage.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.config import CocoConfig
from pipeline.sources.records import Candidate, PrepareError, RawObject, box_from_values
from pipeline.sources.report import PrepareReport

logger = logging.getLogger(__name__)


def load_coco_json(path: Path) -> dict[str, Any]:
    """Read an instances JSON; PrepareError when it is unreadable or lacks ``images``/``annotations`` lists."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PrepareError(f"{path}: cannot read COCO JSON ({error})") from None
    except (json.JSONDecodeError, UnicodeError) as error:
        raise PrepareError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise PrepareError(f"{path}: expected a COCO instances JSON object with 'images' and 'annotations' lists")
    return data


def category_names(data: dict[str, Any], path: Path) -> dict[Any, str]:
    """Category id -> name, in ascending id order."""
    categories = data.get("categories", [])
    pairs = []
    for cat in categories if isinstance(categories, list) else []:
        if isinstance(cat, dict) and _is_id(cat.get("id")) and isinstance(cat.get("name"), str):
            pairs.append((cat["id"], cat["name"].strip()))
    if not pairs:
        raise PrepareError(f"{path}: no usable 'categories' (each needs an 'id' and a 'name')")
    names = [name for _, name in pairs]
    if len(set(names)) != len(names):
        raise PrepareError(f"{path}: category names must be unique, got {names}")
    return dict(sorted(pairs, key=lambda p: (str(type(p[0])), p[0])))


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
    data: dict[str, Any], names: dict[Any, str], path: Path, images_dir: Path, split: str, report: PrepareReport
) -> list[Candidate]:
    image_ids = {img.get("id") for img in data["images"] if isinstance(img, dict) and _is_id(img.get("id"))}
    objects: dict[Any, list[RawObject]] = defaultdict(list)
    for number, ann in enumerate(data["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not _is_id(image_id) or image_id not in image_ids:
            report.reject_boxes(f"{path} annotations[{number}]", "box_orphan", detail=f"image_id {image_id!r}")
            continue
        objects[image_id].append(_object(ann, names))

    base = images_dir.resolve()
    seen: set[Any] = set()
    candidates = []
    for number, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_id(img.get("id")) or not isinstance(img.get("file_name"), str):
            report.reject_image(f"{path} images[{number}]", "annotation_malformed", "needs 'id' and 'file_name'")
            continue
        image_id, file_name = img["id"], img["file_name"]
        where = f"{path} image id {image_id} ({file_name})"
        if image_id in seen:
            report.reject_image(where, "duplicate_id", "an earlier entry has this id and keeps its annotations")
            continue
        seen.add(image_id)
        image_path = (base / file_name).resolve()
        if not image_path.is_relative_to(base):
            report.reject_image(where, "unsafe_path", f"outside {base}", boxes=len(objects[image_id]))
            continue
        size = (img.get("width"), img.get("height"))
        declared = size if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size) else None
        candidates.append(
            Candidate(f"{split}/{image_id}", split, image_path, where, declared, tuple(objects[image_id]))
        )
    return candidates


def _object(ann: dict[str, Any], names: dict[Any, str]) -> RawObject:
    category = ann.get("category_id")
    name = names.get(category) if _is_id(category) else None
    difficult = bool(ann.get("iscrowd", 0))
    bbox = ann.get("bbox")
    values = box_from_values(bbox) if isinstance(bbox, list) and len(bbox) == 4 else None
    if name is None:
        return RawObject(None, None, difficult, "unknown_class")
    if values is None:
        return RawObject(name, None, difficult, "box_malformed")
    x, y, w, h = values
    return RawObject(name, (x, y, x + w, y + h), difficult)


def _is_id(value: Any) -> bool:
    """COCO ids are ints (strings tolerated); anything else (lists, null) cannot name an image or category."""
    return isinstance(value, int | str) and not isinstance(value, bool)
