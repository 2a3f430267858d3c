"""PASCAL VOC readers: VOCdevkit trees and flat folders of XML files beside images.

Layouts, per root (several roots are combined, as in the VOC07+12 recipe):

- **tree**: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<set>.txt``. The training split is
  the union of the ``data.voc.train_sets`` lists that exist in the root, the validation split the union of
  ``data.voc.val_sets``; a root with none of these lists is split like a flat folder. The ids of the
  ``data.voc.test_sets`` lists (e.g. ``[test]``, with ``val_sets`` then another list) make the test split
  and are taken out of the other two.
- **flat**: a folder of XML files and a folder of images (``data.voc.annotations_dir`` /
  ``data.voc.images_dir`` relative to the root, or detected: ``annotations``/``Annotations``/``xml``/``labels``
  and ``images``/``JPEGImages``/``imgs``; XML files beside the images in the root itself also work).
  Splits are seeded: ``round(n * data.val_fraction)`` ids (at least one when n >= 2), chosen by a
  permutation of the sorted ids seeded with ``params.seed``.

The image of an XML is ``<filename>`` (its base name only: a path in the XML never leads outside the
image folder), falling back to the XML's stem with a usual image extension.

Coordinates: VOC stores 1-based inclusive pixel indices, so ``xmin=1, xmax=W`` covers the whole image;
in continuous coordinates that is ``[xmin - 1, xmax]`` (as detectron2 reads VOC).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import parse as parse_xml

from pipeline.config import VocConfig
from pipeline.file_names import plain_name_problem
from pipeline.sources.records import Candidate, RawObject, box_from_values
from pipeline.sources.report import PrepareReport

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_ANNOTATION_DIRS = ("Annotations", "annotations", "xml", "xmls", "labels")
_IMAGE_DIRS = ("JPEGImages", "images", "Images", "imgs", "img")


class XmlRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VocLayout:
    root: Path
    name: str  # prefix of the source ids from this root
    annotations: Path
    images: Path
    lists: Path | None  # ImageSets/Main, for trees


@dataclass(frozen=True)
class ParsedXml:
    filename: str | None
    size: tuple[int, int] | None  # (width, height) as declared
    objects: tuple[RawObject, ...]


# ------------------------------------------------------------------------------------------- layout
def find_layout(root: Path, cfg: VocConfig, name: str) -> VocLayout:
    """Detect the layout of one root (see the module docstring).

    Raises:
        ValueError: the root does not exist, or no folder of XML files can be found.
    """
    if not root.is_dir():
        raise ValueError(f"data.root: {root} is not a directory")
    if cfg.annotations_dir or cfg.images_dir:
        annotations = root / cfg.annotations_dir if cfg.annotations_dir else _detect(root, _ANNOTATION_DIRS, "*.xml")
        images = root / cfg.images_dir if cfg.images_dir else _detect(root, _IMAGE_DIRS, None) or annotations
        if annotations is None or not annotations.is_dir():
            raise ValueError(f"data.voc.annotations_dir: {annotations} is not a directory")
        if not images.is_dir():
            raise ValueError(f"data.voc.images_dir: {images} is not a directory")
        return VocLayout(root, name, annotations, images, None)
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        lists = root / "ImageSets" / "Main"
        return VocLayout(root, name, root / "Annotations", root / "JPEGImages", lists if lists.is_dir() else None)
    annotations = _detect(root, _ANNOTATION_DIRS, "*.xml")
    if annotations is None:
        raise ValueError(
            f"data.root: {root}: found neither a VOCdevkit tree (Annotations/, JPEGImages/) nor a folder of "
            f"XML files ({', '.join(_ANNOTATION_DIRS)}, or the root itself); set data.voc.annotations_dir"
        )
    images = _detect(root, _IMAGE_DIRS, None) or annotations
    return VocLayout(root, name, annotations, images, None)


def _detect(root: Path, names: tuple[str, ...], pattern: str | None) -> Path | None:
    """The first ``root/<name>`` folder that exists (and holds ``pattern`` files, when given; then the root
    itself is the last candidate)."""
    candidates = [root / n for n in names] + ([root] if pattern else [])
    return next((f for f in candidates if f.is_dir() and (pattern is None or any(f.glob(pattern)))), None)


def root_names(roots: list[Path]) -> list[str]:
    """Id prefixes: each root's folder name, made unique with a counter where two roots share one."""
    names: list[str] = []
    for root in roots:
        base = root.resolve().name or "root"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


# -------------------------------------------------------------------------------------------- parse
def parse_voc_xml(path: Path) -> ParsedXml:
    """Parse one annotation file with defusedxml (no entity expansion, no external entities or DTDs).

    Raises:
        XmlRejected: ``xml_unsafe`` (entities, DTD, external references), ``xml_malformed`` (not XML,
            or the root element is not ``<annotation>``) or ``xml_unreadable``.
    """
    try:
        tree = parse_xml(path, forbid_dtd=True)
    except DefusedXmlException as error:
        raise XmlRejected("xml_unsafe", f"{type(error).__name__}: {error}") from None
    except ParseError as error:
        raise XmlRejected("xml_malformed", str(error)) from None
    except (OSError, UnicodeError) as error:
        raise XmlRejected("xml_unreadable", f"{type(error).__name__}: {error}") from None
    root = tree.getroot()
    if root.tag != "annotation":
        raise XmlRejected("xml_malformed", f"root element is <{root.tag}>, expected <annotation>")
    filename = _text(root, "filename")
    return ParsedXml(filename, _size(root), tuple(_object(obj) for obj in root.iter("object")))


def _text(node: Element, tag: str) -> str | None:
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text and child.text.strip() else None


def _size(root: Element) -> tuple[int, int] | None:
    size = root.find("size")
    if size is None:
        return None
    try:
        width, height = int(float(_text(size, "width") or "")), int(float(_text(size, "height") or ""))
    except ValueError:
        return None
    return (width, height) if width > 0 and height > 0 else None


def _object(obj: Element) -> RawObject:
    name = _text(obj, "name")
    difficult = (_text(obj, "difficult") or "0").lower() in ("1", "true")
    bndbox = obj.find("bndbox")
    if name is None:
        return RawObject(None, None, difficult, "box_no_class")
    if bndbox is None:
        return RawObject(name, None, difficult, "box_malformed")
    values = box_from_values([_text(bndbox, k) for k in ("xmin", "ymin", "xmax", "ymax")])
    if values is None:
        return RawObject(name, None, difficult, "box_malformed")
    xmin, ymin, xmax, ymax = values
    return RawObject(name, (xmin - 1.0, ymin - 1.0, xmax, ymax), difficult)


# ------------------------------------------------------------------------------------------ collect
def find_image(layout: VocLayout, xml_path: Path, filename: str | None) -> Path | None:
    """The image of an annotation: ``<filename>``'s base name in the image folder, else the XML stem with
    a usual extension (either case), else None."""
    names = [Path(filename.replace("\\", "/")).name] if filename else []
    names += [xml_path.stem + ext for ext in (*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS))]
    for name in names:
        if name and (layout.images / name).is_file():
            return layout.images / name
    return None


def voc_candidates(
    roots: list[Path], cfg: VocConfig, *, val_fraction: float, seed: int, report: PrepareReport
) -> list[Candidate]:
    """Candidates from every root; unparseable XML files and listed ids without XML are counted rejects."""
    if not roots:
        raise ValueError("data.root: data.source is 'voc' but no root was given")
    candidates: list[Candidate] = []
    for root, name in zip(roots, root_names(roots), strict=True):
        layout = find_layout(root, cfg, name)
        logger.info(
            "voc root %s: annotations %s, images %s%s",
            root,
            layout.annotations,
            layout.images,
            f", lists {layout.lists}" if layout.lists else ", seeded split",
        )
        used: set[Path] = set()
        for split, stems in _splits(layout, cfg, val_fraction, seed, report).items():
            for stem in stems:
                candidate = _candidate(layout, stem, split, report)
                if candidate is not None:
                    candidates.append(candidate)
                    used.add(candidate.image_path)
        if layout.lists is None:
            _note_unannotated(layout, used, report)
    return candidates


def _note_unannotated(layout: VocLayout, used: set[Path], report: PrepareReport) -> None:
    """Count images in a flat folder that no XML file describes (they are not part of the dataset)."""
    xml_stems = {p.stem for p in layout.annotations.glob("*.xml")}
    orphans = sorted(
        p.name
        for p in layout.images.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and p not in used and p.stem not in xml_stems
    )
    if orphans:
        logger.warning(
            "%s: %d images have no annotation file and are not used (e.g. %s)", layout.images, len(orphans), orphans[0]
        )
        report.note("images_without_annotation", len(orphans))


def _splits(
    layout: VocLayout, cfg: VocConfig, val_fraction: float, seed: int, report: PrepareReport
) -> dict[str, list[str]]:
    train = _read_lists(layout, cfg.train_sets)
    val = _read_lists(layout, cfg.val_sets)
    test = _read_lists(layout, cfg.test_sets) or []
    if train is None and val is None:
        stems = sorted(p.stem for p in layout.annotations.glob("*.xml") if p.stem not in set(test))
        return {**seeded_split(stems, val_fraction, seed), "test": test}
    train, val = train or [], val or []
    held_out = set(test)  # a test id never trains or validates
    if held_out & (set(train) | set(val)):
        logger.warning(
            "%s: ids of the test lists %s are also listed for training or validation; kept in test only",
            layout.root,
            cfg.test_sets,
        )
        report.note("ids_in_test_and_another_split_kept_in_test", len(held_out & (set(train) | set(val))))
        train, val = [s for s in train if s not in held_out], [s for s in val if s not in held_out]
    overlap = set(train) & set(val)
    if overlap:
        logger.warning(
            "%s: %d ids are listed for both training and validation; kept in validation only (e.g. %s)",
            layout.root,
            len(overlap),
            sorted(overlap)[0],
        )
        report.note("ids_in_both_splits_kept_in_val", len(overlap))
    return {"train": [s for s in train if s not in overlap], "val": val, "test": test}


def _read_lists(layout: VocLayout, sets: list[str]) -> list[str] | None:
    """Ids of the ``sets`` lists that exist (first column, order kept, duplicates removed); None if none exist."""
    if layout.lists is None:
        return None
    found = [layout.lists / f"{s}.txt" for s in sets if (layout.lists / f"{s}.txt").is_file()]
    if not found:
        return None
    ids: dict[str, None] = {}
    for path in found:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.split():
                ids[line.split()[0]] = None
    return list(ids)


def seeded_split(ids: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Sorted ``ids`` -> ``{"train": [...], "val": [...]}``, ``round(n * val_fraction)`` (>= 1 if n >= 2) in val."""
    ids = sorted(ids)
    n_val = max(1, round(len(ids) * val_fraction)) if len(ids) >= 2 else 0
    order = np.random.default_rng(seed).permutation(len(ids))
    val = {ids[i] for i in order[:n_val]}
    return {"train": [i for i in ids if i not in val], "val": [i for i in ids if i in val]}


def _candidate(layout: VocLayout, stem: str, split: str, report: PrepareReport) -> Candidate | None:
    unsafe = plain_name_problem(stem)  # "../../outside/evil" would read an XML from outside the root
    if unsafe:
        report.reject_image(
            f"{layout.lists} ({split} list) id {stem!r}",
            "unsafe_path",
            f"{unsafe}; an ImageSets id is a plain file stem",
        )
        return None
    xml_path = layout.annotations / f"{stem}.xml"
    where = str(xml_path)
    if not xml_path.is_file():
        report.reject_image(where, "annotation_missing", "listed in ImageSets but no XML file")
        return None
    try:
        parsed = parse_voc_xml(xml_path)
    except XmlRejected as rejected:
        report.reject_image(where, rejected.reason, rejected.detail)
        return None
    image = find_image(layout, xml_path, parsed.filename)
    if image is None:
        report.reject_image(
            where,
            "image_missing",
            f"no image {parsed.filename!r} or {stem}.* in {layout.images}",
            boxes=len(parsed.objects),
        )
        return None
    return Candidate(f"{layout.name}/{stem}", split, image, where, parsed.size, parsed.objects)
