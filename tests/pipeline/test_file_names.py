"""Names from data that are joined to a folder: plain file names and relative paths that stay below it."""

from __future__ import annotations

import pytest

from pipeline.file_names import plain_name_problem, relative_path_problem


@pytest.mark.parametrize("name", ["train-000000.tar", "000005", "a b", "..x", "x..", "...", "C:x", "~"])
def test_plain_names_pass(name):
    assert plain_name_problem(name) == ""


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "is not a file name"),
        (".", "is not a file name"),
        ("..", "is not a file name"),
        ("../outside.tar", "holds '/'"),
        ("/abs", "holds '/'"),
        ("sub/x", "holds '/'"),
        ("..\\outside", "holds '\\'"),
        ("x\0y", "a NUL byte"),
    ],
)
def test_names_that_could_leave_the_folder_are_refused(name, why):
    assert why in plain_name_problem(name)


@pytest.mark.parametrize("name", ["001.jpg", "sub/001.jpg", "a..b/c.jpg", "sub\\001.jpg"])
def test_relative_paths_below_the_folder_pass(name):
    assert relative_path_problem(name) == ""


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty path"),
        ("a\0.jpg", "NUL byte"),
        ("/etc/passwd", "absolute"),
        ("\\\\server\\share", "absolute"),
        ("C:\\x.jpg", "absolute"),
        ("c:/x.jpg", "absolute"),
        ("../x.jpg", "'..' part"),
        ("a/../../x.jpg", "'..' part"),
        ("a\\..\\..\\x.jpg", "'..' part"),
        ("..", "'..' part"),
    ],
)
def test_paths_that_could_leave_the_folder_are_refused(name, why):
    assert why in relative_path_problem(name)
