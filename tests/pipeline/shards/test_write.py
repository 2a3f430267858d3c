"""Writing shards: WebDataset round trip, byte-identical reruns, sizing, atomic writes, the output folder."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline import cli
from pipeline.artifacts.output_folder import MARKER_NAME, OutputFolderError, marker_stage
from pipeline.config import ShardConfig
from pipeline.shards.write import ShardWriteError, clear_outputs, write_split
from pipeline.sources.records import read_index
from pipeline.stages.shard import shard


def _names(folder: Path) -> list[str]:
    """The files in ``folder`` besides the marker that says the shard stage made it."""
    assert marker_stage(folder) == "shard"
    return sorted(p.name for p in folder.iterdir() if p.name != MARKER_NAME)


def _stream(shards: Path, split: str) -> list[dict]:
    """Read shards back the ordinary WebDataset way (sequential tar streaming, no manifest)."""
    urls = sorted(str(p) for p in shards.glob(f"{split}-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_round_trip_gives_identical_samples(index_dir, tmp_path):
    manifest = shard(index_dir, tmp_path, ShardConfig(maxcount=3), progress=False)
    for split in ("train", "val"):
        records = read_index(index_dir, split)
        samples = _stream(tmp_path, split)
        assert [s["__key__"] for s in samples] == [f"{split}_{i:07d}" for i in range(len(records))]
        for record, sample in zip(records, samples, strict=True):
            meta = json.loads(sample["json"])
            assert meta["id"] == record.id
            assert (meta["width"], meta["height"]) == (record.width, record.height)
            assert meta["original_size"] == [record.width, record.height]
            assert (meta["boxes"], meta["labels"], meta["difficult"]) == (record.boxes, record.labels, record.difficult)
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (record.width, record.height))
            if not record.reencode:
                assert sample["jpg"] == record.image.read_bytes()  # bytes kept as they are
    assert manifest.splits["train"].samples == 7 and manifest.splits["val"].samples == 2
    assert [s.count for s in manifest.split_shards("train")] == [3, 3, 1]


def test_reencoded_images_are_upright_rgb(index_dir, tmp_path):
    shard(index_dir, tmp_path, ShardConfig(), progress=False)
    samples = {json.loads(s["json"])["id"]: s for s in _stream(tmp_path, "train")}
    rotated = samples["VOC/t5"]
    assert json.loads(rotated["json"])["boxes"] == [[35.0, 10.0, 55.0, 30.0]]
    assert Image.open(io.BytesIO(rotated["jpg"])).getexif().get(0x0112) is None  # no orientation left to apply
    pixels = np.asarray(Image.open(io.BytesIO(rotated["jpg"])))  # [80, 60, 3]: upright
    assert pixels.shape == (80, 60, 3)
    assert pixels[20, 45, 0] > 150 and pixels[20, 45, 2] < 100  # red at the centre of the upright box
    assert pixels[60, 10, 2] > 150  # blue elsewhere
    grey = np.asarray(Image.open(io.BytesIO(samples["VOC/t6"]["jpg"])))
    assert grey.shape == (40, 48, 3)


def test_two_runs_are_byte_identical(index_dir, tmp_path):
    shard(index_dir, tmp_path / "a", ShardConfig(maxcount=4), progress=False)
    shard(index_dir, tmp_path / "b", ShardConfig(maxcount=4), progress=False)
    names = _names(tmp_path / "a")
    assert names == _names(tmp_path / "b")
    assert "manifest.json" in names and len(names) == 4  # 2 + 1 shards and the manifest
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_manifest_records_sha_sizes_and_totals(index_dir, tmp_path):
    shard(index_dir, tmp_path, ShardConfig(maxcount=4), progress=False)
    data = json.loads((tmp_path / "manifest.json").read_text())
    for entry in data["shards"]:
        blob = (tmp_path / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(blob).hexdigest() and entry["bytes"] == len(blob)
    assert data["classes"] == ["cat", "dog"]
    assert data["totals"]["samples"] == 9 == sum(e["count"] for e in data["shards"])
    index_boxes = sum(len(r.boxes) for s in ("train", "val") for r in read_index(index_dir, s))
    assert data["totals"]["boxes"] == index_boxes


def test_maxsize_closes_shards_by_bytes(index_dir, tmp_path):
    records = read_index(index_dir, "train")
    shards = write_split(records, "train", tmp_path, ShardConfig(maxcount=1000, maxsize=3000))
    assert len(shards) > 1 and sum(s.count for s in shards) == len(records)
    for info in shards[:-1]:  # a shard closes at the first sample that brings its payload to maxsize
        payload = [loc.jpg_size + loc.json_size for loc in info.samples]
        assert sum(payload) >= 3000 and sum(payload[:-1]) < 3000


def test_max_side_downscales_image_and_boxes(index_dir, tmp_path):
    shard(index_dir, tmp_path, ShardConfig(max_side=40), progress=False)
    rotated = next(s for s in _stream(tmp_path, "train") if json.loads(s["json"])["id"] == "VOC/t5")
    meta = json.loads(rotated["json"])
    # Upright 60x80 scaled by 40 / 80 = 0.5 -> 30x40; the box [35, 10, 55, 30] halves.
    assert (meta["width"], meta["height"], meta["original_size"]) == (30, 40, [60, 80])
    assert meta["boxes"] == [[17.5, 5.0, 27.5, 15.0]]
    assert Image.open(io.BytesIO(rotated["jpg"])).size == (30, 40)


def test_interrupted_run_leaves_no_shard_that_looks_whole(index_dir, tmp_path):
    records = read_index(index_dir, "train")
    records[4].image.rename(records[4].image.with_suffix(".gone"))  # the 5th image vanished since prepare
    try:
        with pytest.raises(ShardWriteError, match="cannot read"):
            shard(index_dir, tmp_path, ShardConfig(maxcount=3), progress=False)
    finally:
        records[4].image.with_suffix(".gone").rename(records[4].image)
    # Shard 0 (samples 0-2) completed; shard 1 was being written when sample 4 failed.
    assert _names(tmp_path) == ["train-000000.tar"]


def test_stale_shards_of_an_earlier_run_are_removed(index_dir, tmp_path):
    shard(index_dir, tmp_path, ShardConfig(maxcount=3), progress=False)  # the stage's own folder now
    (tmp_path / "train-000099.tar").write_bytes(b"old")
    (tmp_path / "val-000000.tar.tmp").write_bytes(b"half")
    (tmp_path / ".val-000001.tar.123-abcd1234.tmp").write_bytes(b"half, from a killed run")
    shard(index_dir, tmp_path, ShardConfig(), progress=False)
    assert _names(tmp_path) == ["manifest.json", "train-000000.tar", "val-000000.tar"]


def test_a_folder_the_stage_did_not_make_is_refused_untouched(index_dir, tmp_path, caplog):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"the user's own tar")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match=rf"--out {out} is not empty \(notes.txt, train-000000.tar\)"):
        shard(index_dir, out, ShardConfig(), progress=False)
    with pytest.raises(OutputFolderError, match="not deleting anything"):
        clear_outputs(out, ["train"])
    assert cli.main(["shard", "--index", str(index_dir), "--out", str(out)]) == 1
    assert f"--out {out} is not empty" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train-000000.tar"]
    assert (out / "train-000000.tar").read_bytes() == b"the user's own tar"
