"""The one atomic write: old file or whole new one, fsynced file and folder, no temporary file left behind,
and a guard that no module of ``pipeline/`` writes an output in place."""

from __future__ import annotations

import csv
import os
import re
import stat
from pathlib import Path

import pytest

from pipeline.artifacts.atomic_write import (
    AtomicFile,
    write_bytes_atomic,
    write_csv_atomic,
    write_text_atomic,
)

PIPELINE = Path(__file__).resolve().parents[3] / "pipeline"


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failing_write_leaves_the_old_file_and_no_temporary_file(tmp_path, failure):
    path = tmp_path / "out.bin"
    write_bytes_atomic(path, b"old")
    seen: list[Path] = []

    def fail(temp: Path) -> None:  # between the fsync and the rename: a full disk, or the process stopped
        seen.append(temp)
        assert temp.read_bytes() == b"new" and temp.parent == path.parent  # complete, beside the target
        raise failure

    with pytest.raises(type(failure)):
        write_bytes_atomic(path, b"new", before_rename=fail)
    assert path.read_bytes() == b"old"
    assert seen and not seen[0].exists()  # the temporary file is cleaned up when the process survives
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_file_and_folder_are_fsynced(tmp_path, monkeypatch):
    synced: list[tuple[int, bool]] = []  # (inode, is a folder) of every fsync
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((info.st_ino, stat.S_ISDIR(info.st_mode)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tmp_path / "sub" / "eval.json"
    write_text_atomic(path, '{"map": 0.5}\n')
    assert path.read_text() == '{"map": 0.5}\n'
    # The renamed temporary file is the file now at ``path`` (same inode); then its folder.
    assert synced == [(path.stat().st_ino, False), (path.parent.stat().st_ino, True)]


def test_no_overwrite_keeps_an_existing_file(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"the user's photo")
    with pytest.raises(FileExistsError, match="photo.jpg"):
        write_bytes_atomic(path, b"drawn copy", overwrite=False)
    assert path.read_bytes() == b"the user's photo"
    assert [p.name for p in tmp_path.iterdir()] == ["photo.jpg"]
    write_bytes_atomic(tmp_path / "new.jpg", b"drawn copy", overwrite=False)
    assert (tmp_path / "new.jpg").read_bytes() == b"drawn copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jpg", "photo.jpg"]


def test_new_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "a", b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644  # 0o666 & ~umask, not mkstemp's 0o600


def test_atomic_file_discards_on_an_exception(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(b"complete")
    with pytest.raises(RuntimeError), AtomicFile(path) as file:
        file.stream.write(b"half")
        raise RuntimeError("writer died")
    assert path.read_bytes() == b"complete" and [p.name for p in tmp_path.iterdir()] == ["shard.tar"]
    with AtomicFile(path) as file:
        file.stream.write(b"whole")
    assert path.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["shard.tar"]


def test_csv_matches_the_csv_module_writing_a_file(tmp_path):
    rows = [["a,b", 0.5, None], ["c", 1, 'say "hi"']]
    with open(tmp_path / "reference.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "ap", "note"])
        writer.writerows(rows)
    write_csv_atomic(tmp_path / "table.csv", ["class", "ap", "note"], rows)
    assert (tmp_path / "table.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()


# A file write that goes around pipeline.artifacts.atomic_write: text/bytes helpers, open() for writing,
# renames, and PIL/matplotlib saves to a path (saves into an in-memory buffer are fine).
IN_PLACE = re.compile(
    r"\.write_text\(|\.write_bytes\(|open\(.*[\"'][wx]b?\+?[\"']|os\.replace\(|os\.rename\(|\.rename\("
    r"|\.savefig\((?!buffer)|(?<!torch)\.save\((?!buffer)"
)
WRITERS = {"artifacts/atomic_write.py", "artifacts/output_folder.py", "storage/objects.py"}  # implement the writes
ALLOWED = {
    # Generated images go into the hidden build folder that replacing_folder fsyncs and swaps in whole.
    ("sources/synthetic.py", "sample.image.save(path"),
    # The run-folder lease: a compare-and-swap under flock (temporary file, fsync, replace), which a plain
    # atomic write cannot express.
    ("training/lease_store.py", "os.replace(tmp, self.path)"),
}


def test_no_module_writes_in_place():
    found = []
    for path in sorted(PIPELINE.rglob("*.py")):
        relative = path.relative_to(PIPELINE).as_posix()
        if relative in WRITERS:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if IN_PLACE.search(code) and not any(relative == f and s in code for f, s in ALLOWED):
                found.append(f"pipeline/{relative}:{number}: {line.strip()}")
    assert not found, "write through pipeline.artifacts.atomic_write instead:\n" + "\n".join(found)
