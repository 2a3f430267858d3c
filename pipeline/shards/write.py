"""Writing WebDataset shards from the prepared index, deterministically and atomically.

Each sample is two tar members, ``<key>.jpg`` (the image) and ``<key>.json`` (its record)::

    {"boxes": [[x1, y1, x2, y2], ...], "difficult": [false, ...], "height": 417, "id": "raccoon/raccoon-1",
     "labels": [1, ...], "original_size": [650, 417], "width": 650}

with boxes in pixels of the stored JPEG (``width`` x ``height``); ``original_size`` is the upright size
before any ``shard.max_side`` downscaling. The JPEG bytes are copied unchanged unless the index marks the
image for re-encoding (EXIF orientation, not RGB, not JPEG) or it is downscaled; then it is encoded once at
``shard.jpeg_quality``.

Byte-identical output for the same index and params: samples in index order, keys from their position,
members in key order with fixed mtime, mode, uid/gid and user/group names, canonical JSON. Each shard is
written to a hidden temporary file, fsynced and renamed once complete (``pipeline.artifacts.atomic_write``);
the manifest is written last, the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import webdataset as wds
from PIL import Image

from pipeline.artifacts.atomic_write import TEMP_SUFFIX, AtomicFile, write_text_atomic
from pipeline.artifacts.output_folder import MARKER_NAME, OutputFolderError, owns
from pipeline.config import ShardConfig
from pipeline.shards.manifest import MANIFEST_NAME, ShardInfo, ShardManifest, member_table
from pipeline.sources.images import ImageRejected, load_rgb, open_checked
from pipeline.sources.records import IndexRecord

logger = logging.getLogger(__name__)

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: member times never depend on when the stage ran
TAR_USER = "ssd"
SHARD_PATTERN = "{split}-%06d.tar"
SHARD_STAGE = "shard"  # the marker of the output folder (pipeline.artifacts.output_folder)


class ShardWriteError(ValueError):
    """The index points at an image that is missing or no longer matches what prepare recorded."""


def sample_key(split: str, position: int) -> str:
    """Tar key of the ``position``-th sample of ``split``; no dots (WebDataset splits names at the first dot)."""
    return f"{split}_{position:07d}"


def encode_sample(record: IndexRecord, cfg: ShardConfig) -> tuple[bytes, dict[str, Any]]:
    """The JPEG bytes and JSON record of one index record (see the module docstring)."""
    try:
        data = record.image.read_bytes()
    except OSError as error:
        raise ShardWriteError(f"{record.image}: cannot read ({error}); re-run prepare") from None
    width, height = record.width, record.height
    scale = 1.0
    if cfg.max_side and max(width, height) > cfg.max_side:
        scale = cfg.max_side / max(width, height)
    max_pixels = record.width * record.height  # prepare validated exactly this size; refuse anything bigger
    try:
        if record.reencode or scale < 1.0:
            image = load_rgb(data, max_pixels=max_pixels)
            _check_size(record, image.size)
            if scale < 1.0:
                width, height = max(1, round(width * scale)), max(1, round(height * scale))
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=cfg.jpeg_quality)
            data = buffer.getvalue()
        else:
            with open_checked(data, max_pixels=max_pixels) as header:
                _check_size(record, header.size)
    except ImageRejected as rejected:
        raise ShardWriteError(f"{record.image}: {rejected}; re-run prepare") from None
    sx, sy = width / record.width, height / record.height
    meta = {
        "id": record.id,
        "width": width,
        "height": height,
        "original_size": [record.width, record.height],
        "boxes": [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in record.boxes],
        "labels": list(record.labels),
        "difficult": list(record.difficult),
    }
    return data, meta


def _check_size(record: IndexRecord, size: tuple[int, int]) -> None:
    if tuple(size) != (record.width, record.height):
        raise ShardWriteError(
            f"{record.image}: image is {size[0]}x{size[1]}, the index says "
            f"{record.width}x{record.height}; re-run prepare"
        )


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass
class _AtomicFiles:
    """``ShardWriter`` opener/post pair: each shard is an ``AtomicFile`` (a hidden ``.tmp`` file beside it),
    fsynced and renamed to its name when complete, then the folder is fsynced."""

    done: list[str] = field(default_factory=list)
    _open: dict[str, AtomicFile] = field(default_factory=dict)

    def opener(self, name: str) -> BinaryIO:
        file = AtomicFile(name)  # committed in post(), discarded in abort()
        self._open[name] = file
        return file.stream

    def abort(self) -> None:
        """Close and delete every unfinished temporary file; nothing is renamed."""
        for file in self._open.values():
            file.discard()
        self._open.clear()

    def post(self, name: str) -> None:
        self._open.pop(name).commit()
        self.done.append(name)


def write_split(
    records: list[IndexRecord],
    split: str,
    out_dir: Path,
    cfg: ShardConfig,
    *,
    on_sample: Callable[[], None] = lambda: None,
) -> list[ShardInfo]:
    """Write ``split``'s records as ``{split}-%06d.tar`` shards; returns their manifest entries."""
    if not records:
        return []
    files = _AtomicFiles()
    pattern = str(out_dir / SHARD_PATTERN.format(split=split))
    boxes_per_shard: list[int] = []
    writer = wds.ShardWriter(
        pattern,
        maxcount=cfg.maxcount,
        maxsize=cfg.maxsize,
        opener=files.opener,
        post=files.post,
        verbose=0,
        encoder=False,
        mtime=FIXED_MTIME,
        user=TAR_USER,
        group=TAR_USER,
        mode=0o444,
    )
    try:
        for position, record in enumerate(records):
            data, meta = encode_sample(record, cfg)
            shard_before = writer.shard
            writer.write({"__key__": sample_key(split, position), "jpg": data, "json": canonical_json(meta)})
            if writer.shard != shard_before or not boxes_per_shard:
                boxes_per_shard.append(0)
            boxes_per_shard[-1] += len(meta["boxes"])
            on_sample()
    except BaseException:
        # Not writer.close(): that would finish, and so rename, the partial shard. Close its tar stream
        # (into the .tmp file, before the file is closed), then delete the .tmp file.
        if writer.tarstream is not None:
            writer.tarstream.close()
            writer.tarstream = None
        files.abort()
        raise
    writer.close()
    return [_shard_info(Path(name), split, boxes) for name, boxes in zip(files.done, boxes_per_shard, strict=True)]


def _shard_info(path: Path, split: str, boxes: int) -> ShardInfo:
    data = path.read_bytes()
    table = member_table(io.BytesIO(data), str(path))
    return ShardInfo(path.name, split, len(table), boxes, len(data), hashlib.sha256(data).hexdigest(), table)


def write_manifest(out_dir: Path, classes: list[str], shards: Iterable[ShardInfo]) -> ShardManifest:
    manifest = ShardManifest(str(out_dir), list(classes), tuple(shards))
    write_text_atomic(out_dir / MANIFEST_NAME, manifest_text(manifest.to_dict()))
    return manifest


def manifest_text(data: dict[str, Any]) -> str:
    """Readable, deterministic JSON: one line per shard field and per sample row (``json.loads`` reads it)."""
    head = {k: v for k, v in data.items() if k != "shards"}
    shards = []
    for entry in data["shards"]:
        fields = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in entry.items() if k != "samples"]
        rows = ",\n   ".join(json.dumps(row) for row in entry["samples"])
        shards.append(" {\n" + ",\n".join(fields) + f',\n  "samples": [\n   {rows}\n  ]\n }}')
    return json.dumps(head, indent=1)[:-2] + ',\n "shards": [\n' + ",\n".join(shards) + "\n ]\n}\n"


def clear_outputs(out_dir: Path, splits: Iterable[str]) -> None:
    """Remove the manifest, then every shard (and leftover temporary file) of ``splits``: no stale shard
    survives. Only in a folder the shard stage made (``pipeline.artifacts.output_folder``).

    Raises:
        OutputFolderError: ``out_dir`` does not carry the shard stage's marker.
    """
    if not owns(out_dir, SHARD_STAGE):
        raise OutputFolderError(
            f"{out_dir} was not made by the shard stage (no {MARKER_NAME} marker); not deleting anything in it"
        )
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for split in splits:
        leftovers = [*out_dir.glob(f"{split}-*.tar.tmp"), *out_dir.glob(f".{split}-*.tar.*{TEMP_SUFFIX}")]
        for path in [*out_dir.glob(f"{split}-*.tar"), *leftovers]:
            path.unlink()
