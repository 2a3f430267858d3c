"""Output folders: only a new, empty or self-marked folder is written into or replaced, and a replacement
is built beside the folder and swapped in whole."""

from __future__ import annotations

import json

import pytest

from pipeline.artifacts.output_folder import (
    MARKER_NAME,
    OutputFolderError,
    check_output_folder,
    claim_output_folder,
    marker_stage,
    replacing_folder,
)


def test_new_empty_and_marked_folders_are_accepted(tmp_path):
    check_output_folder(tmp_path / "new", "prepare")
    assert not (tmp_path / "new").exists()  # the check has no side effects
    (tmp_path / "empty").mkdir()
    claim_output_folder(tmp_path / "empty", "prepare")
    assert json.loads((tmp_path / "empty" / MARKER_NAME).read_text()) == {"made_by": "ssd-pipeline", "stage": "prepare"}
    (tmp_path / "empty" / "index.jsonl").write_text("{}\n")
    check_output_folder(tmp_path / "empty", "prepare")
    claim_output_folder(tmp_path / "deep" / "new", "shard")
    assert marker_stage(tmp_path / "deep" / "new") == "shard"


def test_a_users_folder_a_file_and_another_stages_folder_are_refused(tmp_path):
    users = tmp_path / "photos"
    users.mkdir()
    (users / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(OutputFolderError, match=rf"--out {users} is not empty \(holiday.jpg\)"):
        claim_output_folder(users, "prepare")
    assert sorted(p.name for p in users.iterdir()) == ["holiday.jpg"]  # no marker added

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        check_output_folder(tmp_path / "file", "shard")

    claim_output_folder(tmp_path / "shards", "shard")
    with pytest.raises(OutputFolderError, match="holds the output of the shard stage"):
        check_output_folder(tmp_path / "shards", "prepare", option="--plots")

    (users / MARKER_NAME).write_text("not json")  # a foreign file of that name is no marker
    with pytest.raises(OutputFolderError, match="not empty"):
        check_output_folder(users, "prepare")


def test_replacing_swaps_in_a_complete_folder_and_leaves_no_sibling(tmp_path):
    out = tmp_path / "prepared"
    with replacing_folder(out, "prepare") as build:
        assert build.parent == tmp_path and build.name.startswith(".prepared.build-")
        (build / "old.txt").write_text("first run")
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "old.txt"]
    with replacing_folder(out, "prepare") as build:
        (build / "new.txt").write_text("second run")
        assert (out / "old.txt").read_text() == "first run"  # the old folder stays until the new one is done
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_a_failed_build_leaves_the_old_folder(tmp_path):
    out = tmp_path / "prepared"
    with replacing_folder(out, "prepare") as build:
        (build / "index.jsonl").write_text("old\n")
    with pytest.raises(ValueError, match="too many bad images"), replacing_folder(out, "prepare") as build:
        (build / "index.jsonl").write_text("half")
        raise ValueError("too many bad images")
    assert (out / "index.jsonl").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_replacing_refuses_a_users_folder_before_the_block_runs(tmp_path):
    out = tmp_path / "data"
    (out / "images" / "sub").mkdir(parents=True)
    (out / "images" / "sub" / "mine.jpg").write_bytes(b"user")
    ran = []
    with pytest.raises(OutputFolderError, match=rf"--out {out} is not empty"):
        with replacing_folder(out, "prepare"):
            ran.append(True)
    assert not ran and (out / "images" / "sub" / "mine.jpg").read_bytes() == b"user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_symlinked_folder_is_replaced_where_it_points(tmp_path):
    real = tmp_path / "storage" / "prepared"
    with replacing_folder(real, "prepare") as build:
        (build / "a").write_text("1")
    link = tmp_path / "prepared"
    link.symlink_to(real, target_is_directory=True)
    with replacing_folder(link, "prepare") as build:
        (build / "b").write_text("2")
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == [MARKER_NAME, "b"]


def test_leftovers_of_killed_runs_are_removed_only_when_marked(tmp_path):
    out = tmp_path / "prepared"
    killed = tmp_path / ".prepared.build-999-dead"
    claim_output_folder(killed, "prepare")
    foreign = tmp_path / ".prepared.old-999-mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not the pipeline's")
    with replacing_folder(out, "prepare"):
        pass
    assert not killed.exists() and (foreign / "keep.txt").exists()
