"""`zimage_core.train.inputs`: the trainer node's text widgets and relative paths → checked values.

Locks in: captions are one line per image, one line for all, or the default caption (blank lines ignored), and
any other count is one error naming both counts; resolutions parse from "512, 768" (multiples of 16, ≥ 64,
duplicates dropped); a user path must stay inside its root (absolute paths, drives, '..' parts and links that
lead out are refused, naming the widget); the progress text gives step, loss, s/step and an ETA measured on this
session's steps only. Breaks on a path check that lets a workflow read outside ComfyUI's input folder, or a caption
count mismatch that trains silently on the wrong captions.
"""

from __future__ import annotations

import os

import pytest

from zimage_core.train.inputs import (
    caption_lines,
    duration,
    inside,
    parse_resolutions,
    progress_line,
    prompt_lines,
    relative_name,
)


def test_caption_lines():
    assert caption_lines("a [trigger]\n\n", 3) == ["a [trigger]"] * 3
    assert caption_lines(" one \ntwo\n three", 3) == ["one", "two", "three"]
    assert caption_lines("\n  \n", 2, default="dflt") == ["dflt", "dflt"]
    with pytest.raises(ValueError, match="captions has 2 lines for 3 image"):
        caption_lines("a\nb", 3)
    with pytest.raises(ValueError, match="captions is empty and default_caption too"):
        caption_lines("", 2, default=" ")
    assert prompt_lines("a\n\n b \n") == ["a", "b"]


def test_parse_resolutions():
    assert parse_resolutions("512") == (512,)
    assert parse_resolutions(" 512, 768;1024 , 512") == (512, 768, 1024)
    for bad, says in (("", "empty"), ("512, big", "'big' is not a whole number"), ("520", "520 must be a multiple"),
                      ("48", "at least 64")):
        with pytest.raises(ValueError, match=says):
            parse_resolutions(bad)


def test_paths_stay_inside_their_root(tmp_path):
    root = tmp_path / "input"
    (root / "set" / "sub").mkdir(parents=True)
    assert inside(root, "set/sub", "folder") == (root / "set" / "sub").resolve()
    assert inside(root, "set\\sub", "folder") == (root / "set" / "sub").resolve()
    assert relative_name(" a/b.state.safetensors ", "resume") == "a/b.state.safetensors"
    for bad in ("", "  ", "/etc", "../input", "set/../../x", "C:\\data", "\\\\server\\share"):
        with pytest.raises(ValueError, match=r"folder .*without '\.\.'"):
            inside(root, bad, "folder")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(ValueError, match="leads outside"):
        inside(root, "link", "folder")


def test_progress_line_and_duration():
    assert progress_line(0, 10, 0.5, 0.0) == "step 0/10 · loss 0.5000"
    assert progress_line(4, 10, 0.123456, 2.0) == "step 4/10 · loss 0.1235 · 0.50 s/step · ETA 3 s"
    # a resumed run (from step 100): speed from the 10 steps of this session, ETA for the 890 left
    assert progress_line(110, 1000, 0.2, 20.0, start=100) == "step 110/1000 · loss 0.2000 · 2.00 s/step · ETA 29m40s"
    assert [duration(s) for s in (0.4, 59, 60, 3599, 3600, 7384)] == ["0 s", "59 s", "1m00s", "59m59s", "1h00m",
                                                                        "2h03m"]
