"""A damaged manifest.json: one line naming it, exit 4, from every command that reads it (status included)."""

from __future__ import annotations

import pytest

from cli_helpers import assert_error, igcam, ok


@pytest.mark.parametrize(
    "text", ['{"runs": [{"id": "a", "stage": "train-cls"', "", "[1, 2]", '{"runs": 3}', '{"runs": [3]}', "\xff\xfe"]
)
def test_a_damaged_manifest_is_one_line_naming_it(tmp_path, text):
    ws = tmp_path / "ws"
    ok("init", "-w", ws, "--dataset", "synthetic", "--n-train", 4, "--n-val", 2, "--image-size", 32)
    manifest = ws / "manifest.json"
    manifest.write_bytes(text.encode("latin-1"))
    for command in (("status",), ("train-cls", "--epochs", "1"), ("run",)):
        assert_error(igcam(command[0], "-w", ws, *command[1:]), 4, f"{manifest} is damaged")
    assert manifest.read_bytes() == text.encode("latin-1")  # nothing rewritten
