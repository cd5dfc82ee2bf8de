"""A damaged HDF5 map part (truncated, or not HDF5 at all): one line naming it, exit 4; deleting it and rerunning
the stage redoes that part's images and ends where an uninterrupted run ends."""

from __future__ import annotations

import numpy as np
import pytest

from cli_helpers import CAMS, assert_error, igcam, ok
from igcam_cli.errors import BadData
from igcam_cli.store import MapStore


def _two_parts(directory) -> MapStore:
    store = MapStore(directory)
    with store.writer(part_size=2) as writer:
        for i in range(4):
            writer.write(f"a{i}", np.full((1, 3, 3), i / 4, np.float32), np.array([1], np.uint8))
    return store


@pytest.mark.parametrize("damage", ["truncate", "text"])
def test_every_read_names_the_damaged_part(tmp_path, damage):
    store = _two_parts(tmp_path)
    part = store.parts()[1]
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not an HDF5 file\n" * 40)
    fresh = MapStore(tmp_path)
    for read in (fresh.ids, lambda: fresh.read("a3"), lambda: dict(fresh.iter_attrs(["a3"])), lambda: fresh.attrs):
        with pytest.raises(BadData, match=f"map part {part} is damaged.*delete it and rerun"):
            read()


@pytest.mark.slow
def test_make_cams_names_a_damaged_part_and_redoes_it_once_deleted(trained_ws):
    cams = ["make-cams", "-w", trained_ws, "--split", "train", *CAMS, "--quiet"]
    ok(*cams)
    store = MapStore(trained_ws / "cams" / "train")
    whole = {i: r.maps for i, r in store.iter_records(sorted(store.ids()))}
    part = store.parts()[0]
    part.write_bytes(part.read_bytes()[:500])
    assert_error(igcam(*cams), 4, f"map part {part} is damaged")
    assert_error(igcam("refine", "-w", trained_ws, "--split", "train", "--workers", "0"), 4, str(part))
    part.unlink()
    ok(*cams)  # resumes: only the deleted part's images are made again
    again = MapStore(trained_ws / "cams" / "train")
    assert again.ids() == set(whole)
    for image_id, record in again.iter_records(sorted(whole)):
        assert np.array_equal(record.maps, whole[image_id])
