"""atomic.py: a write that fails leaves the old file as it was and no temporary beside it."""

from __future__ import annotations

import pytest

from igcam_cli.atomic import write_atomically, write_csv_atomically, write_text_atomically


def test_a_whole_write_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "fit.json"
    assert write_text_atomically(path, "one") == path
    write_text_atomically(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["fit.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


def test_a_csv_is_written_whole_with_its_header(tmp_path):
    path = write_csv_atomically(tmp_path / "labels.csv", ("id", "labels"), [("a", "cat dog"), ("b", "")])
    assert path.read_text().splitlines() == ["id,labels", "a,cat dog", "b,"]
