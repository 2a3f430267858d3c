"""Which files predict reads, the names of their drawn copies, and ``--device``; the ``--out`` refusals are
tested through the command in ``test_predict.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.stages.predict_inputs import InputError, collect_inputs, drawn_names, resolve_device


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
