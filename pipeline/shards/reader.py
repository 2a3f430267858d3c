"""Ranged reads of single samples from the shards of one split, located by the manifest's member table.

A sample is two tar members, ``<key>.jpg`` and ``<key>.json``, stored next to each other; the manifest
records where their data starts and how long it is (``pipeline.shards.manifest.SampleLoc``), so one sample
is one seek and one read of the byte range spanning both, from a local folder or any ``pipeline.storage`` URL. This is
what lets the loaders assign samples (not whole shards) to ranks and workers.

Each DataLoader worker opens its own file handles lazily, on its first read, and keeps at most
``OPEN_SHARDS_PER_WORKER`` of them, closing the least recently used first. Shards at an object-store URL
are read from this machine's verified copy (``pipeline.shards.cache``: one download per shard and
machine), since a request per sample would cost more CPU than decoding the sample.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from pipeline.shards.cache import local_copy
from pipeline.shards.manifest import ShardError, ShardInfo, join
from pipeline.storage.filesystem import filesystem, is_local

OPEN_SHARDS_PER_WORKER = 16  # file handles a worker keeps open (least recently used closed first)


class CorruptSample(Exception):
    """A sample that cannot be used (unreadable bytes here, a bad record or JPEG in ``pipeline.shards.samples``).

    The loaders catch it per sample: training skips and counts the sample, evaluation raises ``ShardError``.
    """


class ShardReader:
    """Ranged reads of samples from the shards of one split; opened lazily inside each worker process.

    Sample ``index`` is the ``index``-th sample of the split in manifest order (shard by shard, then row by
    row of each shard's member table), the index ``pipeline.shards.order`` deals out.
    """

    def __init__(self, root: str, shards: tuple[ShardInfo, ...]) -> None:
        self.root = root
        self.shards = shards
        self.locations = [(s, loc) for s in shards for loc in s.samples]  # manifest order
        self._shards = {s.name: s for s in shards}
        self._fs: Any = None
        self._base = ""
        self._open: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.locations)

    def describe(self, index: int) -> str:
        shard, loc = self.locations[index]
        return f"{join(self.root, shard.name)} sample {loc.key}"

    def read(self, index: int) -> tuple[bytes, bytes]:
        """(jpg bytes, json bytes) of sample ``index``; ``CorruptSample`` when they cannot be read whole."""
        shard, start, end = self._span(index)
        try:
            handle = self._handle(shard.name)
            handle.seek(start)
            data = handle.read(end - start)
        except OSError as error:
            raise CorruptSample(f"cannot read ({type(error).__name__}: {error})") from None
        return self._split(index, data)

    def _span(self, index: int) -> tuple[ShardInfo, int, int]:
        """(shard, first byte, end byte) of the range holding both members of sample ``index``."""
        shard, loc = self.locations[index]
        start = min(loc.jpg_offset, loc.json_offset)
        end = max(loc.jpg_offset + loc.jpg_size, loc.json_offset + loc.json_size)
        return shard, start, end

    def _split(self, index: int, data: bytes) -> tuple[bytes, bytes]:
        """The two members out of the bytes of ``_span(index)``; ``CorruptSample`` when they are short."""
        _, loc = self.locations[index]
        _, start, end = self._span(index)
        if len(data) != end - start:
            raise CorruptSample(f"shard ends early: read {len(data)} of {end - start} bytes")
        return (
            data[loc.jpg_offset - start : loc.jpg_offset - start + loc.jpg_size],
            data[loc.json_offset - start : loc.json_offset - start + loc.json_size],
        )

    def _handle(self, name: str) -> Any:
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        if len(self._open) >= OPEN_SHARDS_PER_WORKER:
            self._open.popitem(last=False)[1].close()
        if is_local(self.root):
            if self._fs is None:
                self._fs, self._base = filesystem(self.root)
            handle = self._fs.open(join(self._base, name), "rb")
        else:  # an object store: read from this machine's verified copy (pipeline.shards.cache)
            try:
                handle = open(local_copy(join(self.root, name), self._shards[name]), "rb")
            except ShardError as error:
                raise CorruptSample(str(error)) from None
        self._open[name] = handle
        return handle

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
