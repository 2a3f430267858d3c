"""``shards/manifest.json``: what the shard stage wrote, and the check the loader runs before training.

Format (``"format": "ssd-shards/1"``)::

    {"format": "ssd-shards/1",
     "classes": ["ellipse", ...],                       # label i + 1 is classes[i]; no background
     "splits": {"train": {"shards": 4, "samples": 1600, "boxes": 5701, "bytes": ...}, "val": {...}},
     "totals": {"shards": 5, "samples": 1800, "boxes": 6431, "bytes": ...},
     "shards": [{"name": "train-000000.tar", "split": "train", "count": 500, "boxes": 1790,
                 "bytes": 6553600, "sha256": "...",
                 "samples": [["train_0000000", 1024, 5321, 6656, 230], ...]}, ...]}

Each ``samples`` row locates one sample inside its (uncompressed) tar: ``[key, jpg_offset, jpg_size,
json_offset, json_size]``, offsets of the member *data*. This index lets the loader read any sample with
one ranged read, so samples (not whole shards) can be assigned to ranks and workers; the shards stay
plain WebDataset tars that ``webdataset.WebDataset`` streams as usual.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

from pipeline.file_names import plain_name_problem
from pipeline.storage.filesystem import filesystem

FORMAT = "ssd-shards/1"
MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 1 << 20


class ShardError(ValueError):
    """A shard or manifest that does not match what the shard stage wrote; the message names the shard."""


class SampleLoc(NamedTuple):
    key: str
    jpg_offset: int
    jpg_size: int
    json_offset: int
    json_size: int


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the shard folder
    split: str
    count: int  # samples
    boxes: int
    bytes: int
    sha256: str
    samples: tuple[SampleLoc, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "count": self.count,
            "boxes": self.boxes,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "samples": [list(s) for s in self.samples],
        }


@dataclass(frozen=True)
class SplitInfo:
    shards: int
    samples: int
    boxes: int
    bytes: int


@dataclass(frozen=True)
class ShardManifest:
    root: str  # the shard folder or URL the manifest was read from
    classes: list[str]
    shards: tuple[ShardInfo, ...]

    @cached_property
    def splits(self) -> dict[str, SplitInfo]:
        out = {}
        for split in sorted({s.split for s in self.shards}):
            mine = [s for s in self.shards if s.split == split]
            out[split] = SplitInfo(
                len(mine), sum(s.count for s in mine), sum(s.boxes for s in mine), sum(s.bytes for s in mine)
            )
        return out

    def split_shards(self, split: str) -> tuple[ShardInfo, ...]:
        """Shards of ``split`` in name order; ShardError when the split has none."""
        shards = tuple(sorted((s for s in self.shards if s.split == split), key=lambda s: s.name))
        if not shards or not sum(s.count for s in shards):
            raise ShardError(f"{self.root}: no samples in split {split!r}; splits present: {sorted(self.splits)}")
        return shards

    def to_dict(self) -> dict[str, Any]:
        splits = {k: vars(v) for k, v in self.splits.items()}
        totals = {f: sum(v[f] for v in splits.values()) for f in ("shards", "samples", "boxes", "bytes")}
        return {
            "format": FORMAT,
            "classes": list(self.classes),
            "splits": splits,
            "totals": totals,
            "shards": [s.to_dict() for s in sorted(self.shards, key=lambda s: s.name)],
        }


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def parse_manifest(data: Any, root: str) -> ShardManifest:
    """Validate the JSON structure; ShardError naming the first problem."""
    where = join(root, MANIFEST_NAME)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShardError(f'{where}: expected a manifest with "format": "{FORMAT}"; re-run the shard stage')
    classes = data.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ShardError(f"{where}: 'classes' must be a list of names")
    shards = []
    seen: set[str] = set()
    for i, entry in enumerate(data.get("shards") or []):
        try:
            samples = tuple(SampleLoc(str(r[0]), *(int(v) for v in r[1:5])) for r in entry["samples"])
            info = ShardInfo(
                str(entry["name"]),
                str(entry["split"]),
                int(entry["count"]),
                int(entry["boxes"]),
                int(entry["bytes"]),
                str(entry["sha256"]),
                samples,
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ShardError(f"{where}: shards[{i}] is malformed ({type(error).__name__}: {error})") from None
        name = entry["name"]
        unsafe = plain_name_problem(name) if isinstance(name, str) else f"{name!r} is not a string"
        if unsafe:
            raise ShardError(
                f"{where}: shards[{i}]: shard name {unsafe}; a shard name is a plain file name inside the shard folder"
            )
        if info.name in seen:
            raise ShardError(f"{where}: shards[{i}]: shard {info.name!r} is listed twice")
        seen.add(info.name)
        if info.count != len(info.samples):
            raise ShardError(f"{where}: shard {info.name}: count {info.count} but {len(info.samples)} sample rows")
        shards.append(info)
    if not shards:
        raise ShardError(f"{where}: lists no shards")
    return ShardManifest(root, list(classes), tuple(shards))


def load_manifest(shards: str, *, verify: bool = True) -> ShardManifest:
    """Read ``<shards>/manifest.json`` (a local folder or a ``pipeline.storage`` URL) and check the shards against it.

    Every shard must exist with the recorded size (always checked: a cheap stat). With ``verify`` the
    sha256 of every shard is recomputed and its tar members are counted against the manifest.

    Raises:
        ShardError: naming the missing, truncated or tampered shard (or the unreadable manifest).
    """
    root = str(shards)
    fs, path = filesystem(root)
    where = join(root, MANIFEST_NAME)
    try:
        with fs.open(join(path, MANIFEST_NAME), "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{where}: no manifest; run `python -m pipeline shard` first") from None
    except (OSError, ValueError) as error:
        raise ShardError(f"{where}: unreadable manifest ({type(error).__name__}: {error})") from None
    manifest = parse_manifest(data, root)
    for shard in manifest.shards:
        check_shard(fs, join(path, shard.name), shard, root, deep=verify)
    return manifest


def check_shard(fs: Any, path: str, shard: ShardInfo, root: str, *, deep: bool) -> None:
    """Size (always), then sha256 and the member table (``deep``) of one shard; ShardError on a mismatch."""
    where = join(root, shard.name)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise ShardError(f"shard {where}: missing (the manifest lists it)") from None
    if size != shard.bytes:
        kind = "truncated" if size < shard.bytes else "longer than recorded"
        raise ShardError(f"shard {where}: {kind}: {size} bytes, the manifest says {shard.bytes}")
    if not deep:
        return
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
        if digest.hexdigest() != shard.sha256:
            raise ShardError(
                f"shard {where}: sha256 {digest.hexdigest()} differs from the manifest's {shard.sha256} "
                "(the shard was modified after it was written)"
            )
        f.seek(0)
        table = member_table(f, where)
    if table != shard.samples:
        raise ShardError(
            f"shard {where}: holds {len(table)} samples, the manifest lists {shard.count} (or their members differ)"
        )


def member_table(fileobj: Any, where: str) -> tuple[SampleLoc, ...]:
    """Read a shard's tar headers -> one ``SampleLoc`` per key with a ``.jpg`` and a ``.json`` member."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = info
    except tarfile.TarError as error:
        raise ShardError(f"shard {where}: not a readable tar ({error})") from None
    table = []
    for key, parts in members.items():
        if set(parts) != {"jpg", "json"}:
            raise ShardError(f"shard {where}: sample {key!r} has members {sorted(parts)}, expected jpg and json")
        jpg, meta = parts["jpg"], parts["json"]
        table.append(SampleLoc(key, jpg.offset_data, jpg.size, meta.offset_data, meta.size))
    return tuple(table)
