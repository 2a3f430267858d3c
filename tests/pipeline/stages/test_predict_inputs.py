"""Which files predict reads, the names of their drawn copies, and ``--device``; the local ``--out`` refusals
are tested through the command in ``test_predict.py``, those on an object store (``predict --ray``) here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.artifacts.output_folder import write_marker
from pipeline.stages.predict_inputs import InputError, check_output, collect_inputs, drawn_names, resolve_device


def test_collect_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ["b.PNG", "a.jpg", "c.webp", "z.txt", "y.json"]:
        (tmp_path / "d" / name).write_bytes(b"x")
    (tmp_path / "d" / "sub.jpg").mkdir()  # a folder with an image extension is not an image
    (tmp_path / "empty").mkdir()
    got = collect_inputs([tmp_path / "d", tmp_path / "d" / "a.jpg", tmp_path / "d" / "z.txt", tmp_path / "empty"])
    assert [p.name for p in got] == ["a.jpg", "b.PNG", "c.webp", "z.txt"]  # a.jpg once; z.txt named explicitly
    with pytest.raises(InputError, match="no images found"):
        collect_inputs([tmp_path / "empty"])
    with pytest.raises(InputError, match="at least one"):
        collect_inputs([])
    with pytest.raises(InputError, match="no such file or folder"):
        collect_inputs([tmp_path / "missing"])


def test_drawn_names_are_unique_and_stable():
    paths = [Path(p) for p in ["a/x.png", "b/x.png", "c/X.PNG", "d/x.jpg", "e/x.jpeg", "f/x-2.png", "g/y.tif"]]
    # x.png free; x.png taken -> x-2.png; X.png clashes case-insensitively with x.png and x-2.png -> X-3.png;
    # x.jpg free; x.jpeg -> x.jpg taken -> x-2.jpg; x-2.png taken -> x-2-2.png; y.tif -> y.jpg.
    assert drawn_names(paths) == ["x.png", "x-2.png", "X-3.png", "x.jpg", "x-2.jpg", "x-2-2.png", "y.jpg"]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="CUDA device"):
        resolve_device("cuda:99")
    with pytest.raises(InputError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")


# ------------------------------------------------------------------- object stores (predict --ray)
@pytest.mark.slow
def test_collect_inputs_lists_an_object_store_prefix(s3_env, tmp_path):
    prefix = s3_env.fresh_url("photos")
    for name in ["b.PNG", "a.jpg", "z.txt", "sub/deep.jpg"]:
        storage.put_bytes(storage.join(prefix, name), b"x")
    (tmp_path / "local.jpg").write_bytes(b"x")
    got = collect_inputs([prefix + "/", storage.join(prefix, "a.jpg"), tmp_path / "local.jpg"], urls=True)
    # The prefix's images by name (subfolders and other extensions left out), a.jpg once, then the local file.
    assert got == [storage.join(prefix, "a.jpg"), storage.join(prefix, "b.PNG"), tmp_path / "local.jpg"]
    assert collect_inputs([storage.join(prefix, "z.txt")], urls=True) == [storage.join(prefix, "z.txt")]
    with pytest.raises(InputError, match="no such object or prefix"):
        collect_inputs([s3_env.fresh_url("nothing")], urls=True)
    with pytest.raises(InputError, match="object-store inputs need --ray"):
        collect_inputs([prefix])


@pytest.mark.slow
def test_check_output_on_an_object_store(s3_env):
    photos = s3_env.fresh_url("photos")
    storage.put_bytes(storage.join(photos, "a.jpg"), b"x")
    paths = collect_inputs([photos], urls=True)
    names = ["results.parquet"]

    new = s3_env.fresh_url("out")
    assert check_output(new, [photos], paths, draw=False, extra=names) is True  # nothing there: predict's own
    for inside in (photos, storage.join(photos, "out")):
        with pytest.raises(InputError, match="input folder"):
            check_output(inside, [photos], paths, draw=False)
    with pytest.raises(InputError, match="is an object"):
        check_output(storage.join(photos, "a.jpg"), [], paths, draw=False)

    theirs = s3_env.fresh_url("theirs")
    storage.put_bytes(storage.join(theirs, "notes.md"), b"mine")
    assert check_output(theirs, [photos], paths, draw=False, extra=names) is False  # only new files there
    storage.put_bytes(storage.join(theirs, "results.parquet"), b"mine")
    with pytest.raises(InputError, match="was not made by predict"):
        check_output(theirs, [photos], paths, draw=False, extra=names)
    write_marker(theirs, "predict")  # predict's own now: its files may be replaced
    assert check_output(theirs, [photos], paths, draw=False, extra=names) is True
