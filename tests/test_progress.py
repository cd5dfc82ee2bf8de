"""Progress in a log file (no TTY): a line every ~10 % unless they would come too often, always the last."""

from __future__ import annotations

from igcam_cli.runtime.progress import StageLog


def _track(tmp_path, min_interval: float) -> tuple[list[int], list[str]]:
    log = StageLog(tmp_path / "stage.log", quiet=False)
    seen = list(log.track(iter(range(20)), total=20, description="pass", min_interval=min_interval))
    return seen, [line.split(" ", 2)[2] for line in (tmp_path / "stage.log").read_text().splitlines()]


def test_every_tenth_when_lines_may_come_often(tmp_path):
    seen, lines = _track(tmp_path, min_interval=0.0)
    assert seen == list(range(20))
    assert [line.split(" (")[0] for line in lines] == [f"pass: {k}/20" for k in range(2, 21, 2)]
    assert all(line.endswith(" img/s)") for line in lines)


def test_only_the_last_line_when_the_pass_is_quick(tmp_path):
    seen, lines = _track(tmp_path, min_interval=3600.0)
    assert seen == list(range(20))
    assert [line.split(" (")[0] for line in lines] == ["pass: 20/20"]


def test_the_last_line_gives_the_real_count_when_the_total_was_an_estimate(tmp_path):
    log = StageLog(tmp_path / "stage.log", quiet=False)
    assert len(list(log.track(iter(range(15)), total=10, description="pass", min_interval=0.0))) == 15
    lines = [line.split(" ", 2)[2].split(" (")[0] for line in (tmp_path / "stage.log").read_text().splitlines()]
    assert lines == [f"pass: {k}/10" for k in range(1, 10)] + ["pass: 15/15"]


def test_a_file_name_that_is_not_utf8_is_logged_as_its_bytes(tmp_path):
    import os

    name = os.fsdecode(b"caf\xe9.jpg")  # a file name's bytes as Python decodes them (a lone surrogate)
    StageLog(tmp_path / "stage.log", quiet=True)(f"skipped {name}")
    assert (tmp_path / "stage.log").read_bytes().endswith(b"skipped caf\xe9.jpg\n")
