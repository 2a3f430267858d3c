"""Generated test data: VOC trees, flat VOC folders, COCO JSON and a hostile corpus of bad inputs.

Everything is written into a caller-given folder from code (no binary fixtures in the repo); images are
tiny (tens of pixels) so the tests stay fast.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.config import Params, load_params
from pipeline.sources.records import write_index
from pipeline.stages.prepare import prepare
from pipeline.stages.shard import shard
from ssd_core.augment import normalize_images
from ssd_core.coding import decode_boxes
from ssd_core.model import build_ssd

BACKGROUND = (20, 40, 200)  # blue
MARK = (230, 30, 30)  # red: the annotated region, so tests can see where a box lands after a transform


# ------------------------------------------------------------------------------------------- images
def image_with_box(size: tuple[int, int], box: tuple[int, int, int, int] | None = None, seed: int = 0) -> Image.Image:
    """RGB ``size`` (width, height): blue with light noise, the pixel box ``box`` (x1, y1, x2, y2; x2/y2
    exclusive) painted red."""
    w, h = size
    rng = np.random.default_rng(seed)
    pixels = np.empty((h, w, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    pixels = (pixels + rng.integers(0, 8, (h, w, 3))).astype(np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        pixels[y1:y2, x1:x2] = MARK
    return Image.fromarray(pixels, mode="RGB")


def save_jpeg(path: Path, image: Image.Image, *, orientation: int | None = None, quality: int = 92) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    image.save(path, format="JPEG", quality=quality, **extra)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_broken_data(width: int, height: int) -> bytes:
    """A PNG with a valid header and checksums whose pixel stream is not zlib data: decoding fails."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"definitely not zlib" * 4) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` 8-bit grey pixels but whose data is a few bytes:
    a decompression bomb as far as any reader that trusts the header is concerned."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


def eps_bytes(width: int, height: int) -> bytes:
    """A minimal EPS file (PostScript text; Pillow would hand it to Ghostscript to decode)."""
    return (
        f"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 {width} {height}\n"
        f"0 0 moveto {width} {height} lineto stroke\nshowpage\n%%EOF\n"
    ).encode("ascii")


# ---------------------------------------------------------------------------------------------- VOC
@dataclass(frozen=True)
class Obj:
    """A VOC ``<object>``; coordinates are VOC's 1-based inclusive pixel indices, as strings in the XML."""

    name: str | None
    xmin: object = 1
    ymin: object = 1
    xmax: object = 10
    ymax: object = 10
    difficult: int = 0
    omit: tuple[str, ...] = ()  # bndbox fields to leave out


def voc_xml(filename: str | None, size: tuple[int, int] | None, objects: list[Obj]) -> str:
    parts = ["<annotation>", "<folder>images</folder>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for obj in objects:
        parts.append("<object>")
        if obj.name is not None:
            parts.append(f"<name>{obj.name}</name>")
        parts.append(f"<difficult>{obj.difficult}</difficult><bndbox>")
        for key in ("xmin", "ymin", "xmax", "ymax"):
            if key not in obj.omit:
                parts.append(f"<{key}>{getattr(obj, key)}</{key}>")
        parts.append("</bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def write_voc_sample(
    ann_dir: Path,
    img_dir: Path,
    stem: str,
    size: tuple[int, int],
    objects: list[Obj],
    *,
    seed: int = 0,
    name: str | None = None,
) -> None:
    """A JPEG ``stem.jpg`` with the first object's region painted red, and its XML."""
    first = objects[0] if objects else None
    box = (int(first.xmin) - 1, int(first.ymin) - 1, int(first.xmax), int(first.ymax)) if first else None
    save_jpeg(img_dir / f"{stem}.jpg", image_with_box(size, box, seed))
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"{stem}.xml").write_text(voc_xml(name or f"{stem}.jpg", size, objects), encoding="utf-8")


def make_voc_tree(root: Path, *, trainval: list[str], test: list[str], extra_unlisted: int = 1) -> dict[str, list[Obj]]:
    """A VOCdevkit-style tree with ImageSets/Main/{trainval,test}.txt; returns each stem's objects.

    Sample ``i`` is 48x40 with ``1 + i % 2`` objects alternating cat/dog; one object of every third
    image is difficult. ``extra_unlisted`` XMLs exist but appear in no list (they must be ignored)."""
    annotations, images, lists = root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main"
    lists.mkdir(parents=True, exist_ok=True)
    truth = {}
    stems = trainval + test + [f"unlisted{i}" for i in range(extra_unlisted)]
    for i, stem in enumerate(stems):
        objects = [
            Obj(
                "cat" if (i + k) % 2 == 0 else "dog",
                3 + 10 * k,
                4,
                12 + 10 * k,
                30,
                difficult=int(k == 0 and i % 3 == 0),
            )
            for k in range(1 + i % 2)
        ]
        write_voc_sample(annotations, images, stem, (48, 40), objects, seed=i)
        truth[stem] = objects
    (lists / "trainval.txt").write_text("".join(s + "\n" for s in trainval), encoding="utf-8")
    (lists / "test.txt").write_text("".join(s + "\n" for s in test), encoding="utf-8")
    return {s: truth[s] for s in trainval + test}


def make_flat_voc(root: Path, count: int, *, ann_name: str = "annotations", img_name: str = "images") -> None:
    """``count`` samples as ``root/<ann_name>/s<i>.xml`` beside ``root/<img_name>/s<i>.jpg``, one box each."""
    for i in range(count):
        write_voc_sample(
            root / ann_name, root / img_name, f"s{i:03d}", (40, 32), [Obj("thing", 5, 5, 20 + i % 10, 25)], seed=i
        )


# ------------------------------------------------------------------------------------- hostile corpus
@dataclass(frozen=True)
class Case:
    """One bad (or tricky) input and what prepare must do with it."""

    stem: str
    rejected: str = ""  # image reject reason; "" if the image is kept
    box_rejects: dict[str, int] = field(default_factory=dict)  # reason -> boxes dropped
    image_fixes: tuple[str, ...] = ()  # image corrections counted
    box_fixes: dict[str, int] = field(default_factory=dict)
    kept_boxes: list[list[float]] | None = None  # exact expected boxes (pixels, upright) when kept
    size: tuple[int, int] | None = None  # expected (width, height) when kept
    difficult: list[bool] | None = None
    reencode: bool | None = None


XXE = """<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<annotation><filename>&xxe;</filename></annotation>"""

LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotation><filename>&lol3;</filename></annotation>"""


def make_hostile_corpus(root: Path) -> list[Case]:
    """A flat VOC folder (``root/annotations``, ``root/images``) of >= 20 bad-input cases, plus one image
    without annotation. Classes are meant to be ``["cat", "dog"]`` (non-strict), with ``max_bad_fraction=1``.

    Box derivations: VOC (xmin, ymin, xmax, ymax) = (11, 6, 30, 25) is [10, 5, 30, 25] in continuous pixels.
    """
    ann, img = root / "annotations", root / "images"
    ann.mkdir(parents=True)
    img.mkdir(parents=True)
    good = Obj("cat", 11, 6, 30, 25)
    cases: list[Case] = []

    def xml(stem: str, text: str) -> None:
        (ann / f"{stem}.xml").write_text(text, encoding="utf-8")

    def sample(
        stem: str, objects: list[Obj], *, size=(64, 48), xml_size=None, filename=None, image=None, ext=".jpg"
    ) -> None:
        xml(stem, voc_xml(filename or f"{stem}{ext}", xml_size or size, objects))
        if image is None:
            save_jpeg(img / f"{stem}{ext}", image_with_box(size, (10, 5, 30, 25)))
        else:
            image(img / f"{stem}{ext}")

    # -- kept, nothing to correct
    sample("ok", [good])
    cases.append(Case("ok", kept_boxes=[[10, 5, 30, 25]], size=(64, 48), reencode=False))
    sample("no_objects", [])
    cases.append(Case("no_objects", kept_boxes=[], size=(64, 48)))
    sample("difficult", [Obj("dog", 11, 6, 30, 25, difficult=1), good])
    cases.append(Case("difficult", kept_boxes=[[10, 5, 30, 25]] * 2, difficult=[True, False]))

    # -- XML problems: the image is rejected
    xml("xml_malformed", "<annotation><filename>x.jpg</filename><object>")
    save_jpeg(img / "xml_malformed.jpg", image_with_box((64, 48)))
    cases.append(Case("xml_malformed", rejected="xml_malformed"))
    xml("xml_wrong_root", "<html><body>not an annotation</body></html>")
    cases.append(Case("xml_wrong_root", rejected="xml_malformed"))
    xml("xml_external_entity", XXE)
    cases.append(Case("xml_external_entity", rejected="xml_unsafe"))
    xml("xml_billion_laughs", LAUGHS)
    cases.append(Case("xml_billion_laughs", rejected="xml_unsafe"))
    (ann / "xml_binary.xml").write_bytes(b"\xff\xfe\x00garbage\x00\x01")
    cases.append(Case("xml_binary", rejected="xml_malformed"))

    # -- image problems: rejected, their parseable boxes counted as image_rejected
    xml("image_missing", voc_xml("nowhere.jpg", (64, 48), [good]))
    cases.append(Case("image_missing", rejected="image_missing", box_rejects={"image_rejected": 1}))
    sample("image_empty", [good], image=lambda p: p.write_bytes(b""))
    cases.append(Case("image_empty", rejected="image_unreadable", box_rejects={"image_rejected": 1}))
    sample("image_text", [good], image=lambda p: p.write_text("this is not a JPEG"))
    cases.append(Case("image_text", rejected="image_unreadable", box_rejects={"image_rejected": 1}))

    def truncated(p: Path) -> None:
        save_jpeg(p, image_with_box((64, 48), (10, 5, 30, 25)))
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    sample("image_truncated", [good], image=truncated)
    cases.append(Case("image_truncated", rejected="image_truncated", box_rejects={"image_rejected": 1}))
    # 30000 x 30000 = 9e8 pixels: above twice PIL's limit, so PIL itself refuses at open.
    sample("image_bomb_huge", [good], ext=".png", image=lambda p: p.write_bytes(png_header_only(30000, 30000)))
    cases.append(Case("image_bomb_huge", rejected="image_too_large", box_rejects={"image_rejected": 1}))
    # 10000 x 9000 = 9e7 pixels: just above prepare.max_image_pixels (89,478,485), below PIL's hard limit.
    sample("image_bomb_edge", [good], ext=".png", image=lambda p: p.write_bytes(png_header_only(10000, 9000)))
    cases.append(Case("image_bomb_edge", rejected="image_too_large", box_rejects={"image_rejected": 1}))

    sample("image_corrupt", [good], ext=".png", image=lambda p: p.write_bytes(png_broken_data(64, 48)))
    cases.append(Case("image_corrupt", rejected="image_corrupt", box_rejects={"image_rejected": 1}))
    sample(
        "image_float", [good], ext=".tif", image=lambda p: Image.fromarray(np.zeros((48, 64), dtype=np.float32)).save(p)
    )
    cases.append(Case("image_float", rejected="image_unsupported_mode", box_rejects={"image_rejected": 1}))

    # -- image formats Pillow knows but the README does not list: refused before their plugin parses the file
    # (EPS would run Ghostscript to decode; TGA and SGI decode with little-used code).
    picture = image_with_box((64, 48), (10, 5, 30, 25))
    for stem, ext, fmt in (("format_eps", ".eps", "EPS"), ("format_tga", ".tga", "TGA"), ("format_sgi", ".sgi", "SGI")):
        sample(stem, [good], ext=ext, image=lambda p, fmt=fmt: picture.save(p, format=fmt))
        cases.append(Case(stem, rejected="image_format_not_allowed", box_rejects={"image_rejected": 1}))
    sample("format_eps_as_jpg", [good], image=lambda p: p.write_bytes(eps_bytes(64, 48)))  # named .jpg, EPS inside
    cases.append(Case("format_eps_as_jpg", rejected="image_format_not_allowed", box_rejects={"image_rejected": 1}))
    # Allowed formats besides JPEG/PNG: kept, re-encoded by shard.
    sample("format_bmp", [good], ext=".bmp", image=lambda p: picture.save(p, format="BMP"))
    cases.append(Case("format_bmp", kept_boxes=[[10, 5, 30, 25]], size=(64, 48), reencode=True))
    sample("format_webp", [good], ext=".webp", image=lambda p: picture.save(p, format="WEBP"))
    cases.append(Case("format_webp", kept_boxes=[[10, 5, 30, 25]], size=(64, 48), reencode=True))
    sample("format_pgm", [good], ext=".pgm", image=lambda p: picture.convert("L").save(p, format="PPM"))
    cases.append(Case("format_pgm", image_fixes=("converted_to_rgb",), kept_boxes=[[10, 5, 30, 25]], reencode=True))

    # -- found through the fallback, or despite a hostile file name
    sample("fallback_stem", [good], filename="renamed_long_ago.jpg")
    cases.append(Case("fallback_stem", kept_boxes=[[10, 5, 30, 25]]))
    sample("path_traversal", [good], filename="../../../../etc/passwd")
    cases.append(Case("path_traversal", kept_boxes=[[10, 5, 30, 25]]))

    # -- conversions: kept, corrected, re-encoded by shard
    sample("grey", [good], image=lambda p: save_jpeg(p, image_with_box((64, 48), (10, 5, 30, 25)).convert("L")))
    cases.append(Case("grey", image_fixes=("converted_to_rgb",), kept_boxes=[[10, 5, 30, 25]], reencode=True))
    sample("cmyk", [good], image=lambda p: save_jpeg(p, image_with_box((64, 48), (10, 5, 30, 25)).convert("CMYK")))
    cases.append(Case("cmyk", image_fixes=("converted_to_rgb",), kept_boxes=[[10, 5, 30, 25]], reencode=True))
    sample(
        "palette", [good], ext=".png", image=lambda p: image_with_box((64, 48), (10, 5, 30, 25)).convert("P").save(p)
    )
    cases.append(Case("palette", image_fixes=("converted_to_rgb",), kept_boxes=[[10, 5, 30, 25]], reencode=True))
    sample(
        "alpha", [good], ext=".png", image=lambda p: image_with_box((64, 48), (10, 5, 30, 25)).convert("RGBA").save(p)
    )
    cases.append(Case("alpha", image_fixes=("converted_to_rgb",), kept_boxes=[[10, 5, 30, 25]], reencode=True))
    sample(
        "grey16", [good], ext=".png", image=lambda p: Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16)).save(p)
    )
    cases.append(Case("grey16", image_fixes=("converted_to_rgb",), kept_boxes=[[10, 5, 30, 25]], reencode=True))
    # Stored 80x60 with EXIF orientation 6 (display = stored turned 90 degrees clockwise, 60x80). A point
    # (x, y) of the stored image lands at (H - y, x) = (60 - y, x): the stored box [10, 5, 30, 25] has
    # corners (10, 5) -> (55, 10) and (30, 25) -> (35, 30), so the upright box is [35, 10, 55, 30].
    sample(
        "exif_rotated",
        [good],
        size=(80, 60),
        image=lambda p: save_jpeg(p, image_with_box((80, 60), (10, 5, 30, 25)), orientation=6),
    )
    cases.append(
        Case(
            "exif_rotated",
            image_fixes=("exif_orientation",),
            kept_boxes=[[35, 10, 55, 30]],
            size=(60, 80),
            reencode=True,
        )
    )
    sample("size_mismatch", [good], xml_size=(999, 777))
    cases.append(Case("size_mismatch", image_fixes=("size_mismatch",), kept_boxes=[[10, 5, 30, 25]], size=(64, 48)))

    # -- box problems: the image is kept, bad boxes dropped and counted
    sample("box_outside", [Obj("cat", 51, 31, 80, 70), good])  # [50, 30, 80, 70] clipped to [50, 30, 64, 48]
    cases.append(Case("box_outside", box_fixes={"box_clipped": 1}, kept_boxes=[[50, 30, 64, 48], [10, 5, 30, 25]]))
    sample("box_inverted", [Obj("cat", 30, 6, 11, 25), good])
    cases.append(Case("box_inverted", box_rejects={"box_inverted": 1}, kept_boxes=[[10, 5, 30, 25]]))
    sample("box_nonfinite", [Obj("cat", "nan", 6, 30, 25), Obj("cat", 11, 6, "inf", 25), good])
    cases.append(Case("box_nonfinite", box_rejects={"box_nonfinite": 2}, kept_boxes=[[10, 5, 30, 25]]))
    # VOC xmin=11, xmax=10 is [10, 10]: zero width; a box entirely right of the image clips to zero width.
    sample("box_degenerate", [Obj("cat", 11, 6, 10, 25), Obj("cat", 71, 6, 90, 25), good])
    cases.append(Case("box_degenerate", box_rejects={"box_degenerate": 2}, box_fixes={}, kept_boxes=[[10, 5, 30, 25]]))
    sample("box_malformed", [Obj("cat", "abc", 6, 30, 25), Obj("cat", omit=("ymax",)), good])
    cases.append(Case("box_malformed", box_rejects={"box_malformed": 2}, kept_boxes=[[10, 5, 30, 25]]))
    sample("box_no_class", [Obj(None, 11, 6, 30, 25), good])
    cases.append(Case("box_no_class", box_rejects={"box_no_class": 1}, kept_boxes=[[10, 5, 30, 25]]))
    sample("unknown_class", [Obj("zebra", 11, 6, 30, 25), good])
    cases.append(Case("unknown_class", box_rejects={"unknown_class": 1}, kept_boxes=[[10, 5, 30, 25]]))

    # An image nobody annotated: not part of the dataset, but noted.
    save_jpeg(img / "orphan.jpg", image_with_box((64, 48)))
    return cases


# ---------------------------------------------------------------------------------------------- COCO
def make_coco(root: Path) -> dict:
    """``root/instances.json`` + ``root/images``: category ids 7 ("b") and 3 ("a") (deliberately unsorted and
    sparse), six image entries (four files) with ordinary, crowd and bad annotations. Returns the JSON written."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(1, 5):
        save_jpeg(images / f"{i:03d}.jpg", image_with_box((50, 40), (5, 5, 25, 20), seed=i))
    data = {
        "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
        "images": [
            {"id": 1, "file_name": "001.jpg", "width": 50, "height": 40},
            {"id": 2, "file_name": "002.jpg", "width": 50, "height": 40},
            {"id": 3, "file_name": "003.jpg", "width": 60, "height": 40},  # wrong width: corrected
            {"id": 4, "file_name": "../004.jpg", "width": 50, "height": 40},  # outside the folder
            {"id": 5, "file_name": "", "width": 50, "height": 40},  # empty file name
            {"file_name": "004.jpg"},  # no id
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 15], "iscrowd": 0},  # a -> label 1
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 1},  # b crowd
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [10, 10, 5, 5], "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5]},  # unknown category
            {"id": 5, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5]},  # malformed bbox
            {"id": 6, "image_id": 2, "category_id": 3, "bbox": [20, 10, -5, 5]},  # negative width: inverted
            {"id": 7, "image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5]},  # no such image
            {"id": 8, "image_id": 3, "category_id": 3, "bbox": [40, 30, 30, 30]},  # clipped to [40, 30, 50, 40]
            {"id": 9, "image_id": 4, "category_id": 3, "bbox": [1, 1, 5, 5]},  # of the unsafe-path image
        ],
    }
    (root / "instances.json").write_text(json.dumps(data), encoding="utf-8")
    return data


# ------------------------------------------------------------------------------------------ stages
def make_params(**overrides: object) -> Params:
    """Validated defaults with dotted overrides: ``make_params(**{"data.source": "voc"})``."""
    return load_params(None, [f"{key}={_yaml(value)}" for key, value in overrides.items()])


def _yaml(value: object) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def prepare_and_shard(params: Params, base: Path) -> tuple[Path, Path]:
    """Run prepare (into ``base/prepared``) and shard (into ``base/shards``); returns both folders."""
    index, shards = base / "prepared", base / "shards"
    result = prepare(params, index, progress=False)
    write_index(index, result.records, result.classes)
    shard(index, shards, params.shard, progress=False)
    return index, shards


def synthetic_shards(base: Path, *, num_train: int, num_val: int, image_size: int) -> str:
    """The synthetic source (schema defaults, seed 0) with these sizes, prepared and sharded under ``base``;
    returns the shards folder."""
    sizes = {"data.synthetic.num_train": num_train, "data.synthetic.num_val": num_val}
    return str(prepare_and_shard(make_params(**sizes, **{"data.synthetic.image_size": image_size}), base)[1])


def run_evaluate(model: str | Path, shards: str | Path, out: Path, *overrides: str, metrics: Path | None = None) -> int:
    """``python -m pipeline evaluate`` (in-process) of ``model`` on ``shards``: its metrics in ``metrics``
    (default ``out/eval.json``), plots in ``out/plots``, detections in ``out/eval``. Returns the exit code."""
    outputs = [
        "--metrics",
        str(metrics or out / "eval.json"),
        "--plots",
        str(out / "plots"),
        "--out",
        str(out / "eval"),
    ]
    return cli_main(["evaluate", "--model", str(model), "--shards", str(shards), *outputs, *overrides])


# ------------------------------------------------------------------------------------------ models
def random_tiny_ssd(num_classes: int, seed: int = 0) -> torch.nn.Module:
    """ssd_tiny (160 x 160 input, P = 2390 priors) in eval mode with random weights, its batch norm running
    statistics and heads randomised so that eval mode matters and scores and boxes are spread out."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_ssd("ssd_tiny", num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # eval uses these, batch statistics would not
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        for head in [*model.conf, *model.loc]:  # spread the scores and move boxes off their priors
            head.weight.normal_(0.0, 0.05, generator=generator)
    return model.eval()


def reference_boxes_scores(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes and scores computed without the deployment wrapper: normalise, forward, decode + clip, softmax.

    ``images``: uint8 ``[B, 3, S, S]``. Returns boxes float32 ``[B, P, 4]`` xyxy normalised, scores ``[B, P, C]``.
    """
    with torch.no_grad():
        out = model(normalize_images(images))
        boxes = decode_boxes(out.loc, model.priors()).clamp(0.0, 1.0)  # [B, P, 4]
        scores = torch.softmax(out.cls_logits, dim=-1)  # [B, P, C]
    return boxes, scores
