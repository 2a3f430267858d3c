"""Fixtures of the shard tests: a small prepared VOC index with an EXIF-rotated and a grayscale image."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.sources.records import write_index
from pipeline.stages.prepare import prepare
from tests.pipeline.fixtures import Obj, image_with_box, make_params, make_voc_tree, save_jpeg, voc_xml


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    """A VOC tree (7 plain JPEGs) plus an EXIF-rotated and a grayscale image, prepared into an index."""
    root = tmp_path_factory.mktemp("voc")
    make_voc_tree(root / "VOC", trainval=[f"t{i}" for i in range(5)], test=["v0", "v1"])
    # Same 80x60 stored image with orientation 6 as the hostile corpus: the upright box is [35, 10, 55, 30].
    save_jpeg(root / "VOC" / "JPEGImages" / "t5.jpg", image_with_box((80, 60), (10, 5, 30, 25)), orientation=6)
    save_jpeg(root / "VOC" / "JPEGImages" / "t6.jpg", image_with_box((48, 40), (3, 4, 12, 30)).convert("L"))
    for stem, size in (("t5", (80, 60)), ("t6", (48, 40))):
        obj = Obj("cat", 11, 6, 30, 25) if stem == "t5" else Obj("dog", 4, 5, 12, 30)
        (root / "VOC" / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", size, [obj]))
    lists = root / "VOC" / "ImageSets" / "Main" / "trainval.txt"
    lists.write_text(lists.read_text() + "t5\nt6\n")
    params = make_params(**{"data.source": "voc", "data.root": str(root / "VOC")})
    result = prepare(params, root / "index", progress=False)
    write_index(root / "index", result.records, result.classes)
    return root / "index"
