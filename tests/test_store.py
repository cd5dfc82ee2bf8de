"""MapStore / LabelStore: round trips, resume, temporaries, killed writers, shards, palette PNGs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from igcam_cli.store import LabelStore, MapRecord, MapStore, voc_palette

REPO = Path(__file__).resolve().parents[1]


def rand_maps(rng: np.random.Generator, k: int, h: int = 6, w: int = 5) -> tuple[np.ndarray, np.ndarray]:
    maps = rng.random((k, h, w), dtype=np.float32)
    classes = np.sort(rng.choice(np.arange(1, 21), size=k, replace=False)).astype(np.uint8)
    return maps, classes


def part_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_round_trip_values_and_attrs(tmp_path):
    rng = np.random.default_rng(0)
    store = MapStore(tmp_path / "cams" / "train")  # directory need not exist
    assert store.ids() == set() and len(store) == 0 and store.attrs == {}
    data = {f"img_{i}.x-{i}": rand_maps(rng, k=i % 3 + 1, h=4 + i, w=7) for i in range(5)}
    with store.writer(part_size=2, attrs={"oracle": True}) as writer:
        for image_id, (maps, classes) in data.items():
            writer.write(image_id, maps * 10, classes, scale=0.5, note="hi")

    assert store.ids() == set(data) and len(store) == 5
    assert part_names(store.directory) == ["part-r0-00000.h5", "part-r0-00001.h5", "part-r0-00002.h5"]
    for image_id, (maps, classes) in data.items():
        assert image_id in store
        rec = store.read(image_id)
        assert isinstance(rec, MapRecord)
        assert rec.maps.dtype == np.float32 and rec.maps.shape == maps.shape
        np.testing.assert_allclose(rec.maps, maps * 10, rtol=1e-3, atol=1e-3)
        assert rec.classes.dtype == np.uint8
        np.testing.assert_array_equal(rec.classes, classes)
        assert rec.attrs == {
            "height": maps.shape[1],
            "width": maps.shape[2],
            "source": "cams",
            "scale": 0.5,
            "note": "hi",
        }
        assert type(rec.attrs["height"]) is int
    assert store.attrs == {"oracle": True} and type(store.attrs["oracle"]) is bool
    with h5py.File(store.directory / "part-r0-00000.h5", "r") as f:
        assert f[next(iter(data))]["maps"].dtype == np.float16

    got = dict(store.iter_records(reversed(list(data))))
    assert set(got) == set(data)
    for image_id, (maps, _) in data.items():
        np.testing.assert_allclose(got[image_id].maps, maps * 10, rtol=1e-3, atol=1e-3)
    with pytest.raises(KeyError):
        store.read("missing")
    with pytest.raises(KeyError):
        list(store.iter_records(["img_0.x-0", "missing"]))
    assert dict(store.iter_attrs(data)) == {i: r.attrs for i, r in got.items()}
    with pytest.raises(KeyError):
        list(store.iter_attrs(["missing"]))
    assert "missing" not in store


def test_k0_records_and_explicit_attrs(tmp_path):
    store = MapStore(tmp_path)
    with store.writer(source="refine") as writer:
        writer.write("empty", np.zeros((0, 3, 4), np.float32), np.zeros(0, np.uint8), oracle=False)
        writer.write("big", np.ones((1, 2, 2)), [7], height=20, width=20)  # original image size wins
    rec = store.read("empty")
    assert rec.maps.shape == (0, 3, 4) and rec.maps.dtype == np.float32
    assert rec.classes.shape == (0,) and rec.classes.dtype == np.uint8
    assert rec.attrs == {"height": 3, "width": 4, "source": "refine", "oracle": False}
    assert store.read("big").attrs["height"] == 20
    np.testing.assert_array_equal(store.read("big").classes, [7])


@pytest.mark.parametrize(
    "image_id, maps, classes",
    [
        ("a", np.zeros((2, 3)), [1, 2]),  # not 3-D
        ("a", np.zeros((2, 3, 3)), [1]),  # K mismatch
        ("a", np.full((1, 3, 3), np.nan), [1]),  # not finite
        ("a", np.full((1, 3, 3), 1e6), [1]),  # overflows float16
        ("a", np.zeros((1, 3, 3)), [300]),  # not a uint8 class
        ("a", np.zeros((1, 0, 3)), [1]),  # empty image
        ("x/y", np.zeros((1, 3, 3)), [1]),  # '/' in the id
        ("", np.zeros((1, 3, 3)), [1]),
    ],
)
def test_invalid_input_raises(tmp_path, image_id, maps, classes):
    store = MapStore(tmp_path)
    with store.writer() as writer:
        with pytest.raises(ValueError):
            writer.write(image_id, maps, classes)
        writer.write("ok", np.zeros((1, 3, 3)), [1])
    assert store.ids() == {"ok"}


def test_resume_appends_parts_and_unions_ids(tmp_path):
    rng = np.random.default_rng(1)
    store = MapStore(tmp_path)
    with store.writer(part_size=2) as writer:
        for i in range(3):
            writer.write(f"a{i}", *rand_maps(rng, 2))
    first = part_names(tmp_path)
    assert first == ["part-r0-00000.h5", "part-r0-00001.h5"]
    before = {p: (tmp_path / p).read_bytes() for p in first}

    assert store.ids() == {"a0", "a1", "a2"}  # index built; must refresh when parts change
    with MapStore(tmp_path).writer(part_size=2) as writer:  # a resumed run
        for i in range(3, 5):
            writer.write(f"a{i}", *rand_maps(rng, 1))
    assert part_names(tmp_path) == first + ["part-r0-00002.h5"]
    assert all((tmp_path / p).read_bytes() == data for p, data in before.items())  # old parts untouched
    assert store.ids() == {f"a{i}" for i in range(5)} and len(store) == 5


def test_later_part_wins_for_duplicate_ids(tmp_path):
    store = MapStore(tmp_path)
    with store.writer() as writer:
        writer.write("dup", np.zeros((1, 2, 2)), [1])
    with store.writer() as writer:
        writer.write("dup", np.ones((2, 2, 2)), [3, 4])
    rec = store.read("dup")
    np.testing.assert_array_equal(rec.classes, [3, 4])
    np.testing.assert_array_equal(rec.maps, np.ones((2, 2, 2)))
    assert dict(store.iter_records(["dup"]))["dup"].classes.tolist() == [3, 4]
    assert len(store) == 1


def test_temporary_file_ignored_and_removed(tmp_path):
    store = MapStore(tmp_path)
    with store.writer() as writer:
        writer.write("good", np.zeros((1, 2, 2)), [1])
    (tmp_path / ".part-r0-00009.h5.tmp").write_bytes(b"garbage, not hdf5")
    (tmp_path / ".part-r1-00000.h5.tmp").write_bytes(b"more garbage")
    assert store.ids() == {"good"}
    assert store.read("good").classes.tolist() == [1]
    assert store.remove_temporaries(rank=1) == 1
    assert store.remove_temporaries() == 1
    assert part_names(tmp_path) == ["part-r0-00000.h5"]
    assert store.remove_temporaries() == 0


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from igcam_cli.store import MapStore
    store = MapStore(sys.argv[1])
    writer = store.writer(rank=0, part_size=3)
    for i in range(8):
        writer.write(f"img{i}", np.full((2, 8, 8), i / 10, np.float32), [1, 2])
    os.kill(os.getpid(), signal.SIGKILL)  # mid-third part, with its file open for writing
    """
)


def test_killed_writer_keeps_completed_parts(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert part_names(tmp_path) == [".part-r0-00002.h5.tmp", "part-r0-00000.h5", "part-r0-00001.h5"]
    store = MapStore(tmp_path)
    assert store.ids() == {f"img{i}" for i in range(6)}
    for image_id, rec in store.iter_records(sorted(store.ids())):
        np.testing.assert_allclose(rec.maps, int(image_id[3:]) / 10, atol=1e-3)
    assert store.remove_temporaries() == 1
    # a resumed writer continues after the complete parts
    with store.writer(rank=0, part_size=3) as writer:
        writer.write("img6", np.zeros((1, 8, 8)), [1])
    assert part_names(tmp_path) == ["part-r0-00000.h5", "part-r0-00001.h5", "part-r0-00002.h5"]
    assert len(store) == 7


def test_two_ranks_write_disjoint_parts(tmp_path):
    store = MapStore(tmp_path)
    w0, w1 = store.writer(rank=0, part_size=2), store.writer(rank=1, part_size=2)
    with w0, w1:  # interleaved, as two processes would be
        for i in range(4):
            w0.write(f"r0_{i}", np.zeros((1, 2, 2)), [1])
            w1.write(f"r1_{i}", np.zeros((1, 2, 2)), [2])
    assert part_names(tmp_path) == ["part-r0-00000.h5", "part-r0-00001.h5", "part-r1-00000.h5", "part-r1-00001.h5"]
    assert not set(w0.written) & set(w1.written)
    assert store.ids() == {f"r{r}_{i}" for r in (0, 1) for i in range(4)}
    assert store.read("r1_3").classes.tolist() == [2]


def test_exception_inside_with_flushes_finished_images(tmp_path):
    store = MapStore(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer(part_size=32) as writer:
            writer.write("done0", np.zeros((1, 2, 2)), [1])
            writer.write("done1", np.zeros((1, 2, 2)), [1])
            raise RuntimeError("boom")
    assert store.ids() == {"done0", "done1"}
    assert part_names(tmp_path) == ["part-r0-00000.h5"]


def test_flush_commits_now_and_is_noop_when_empty(tmp_path):
    store = MapStore(tmp_path)
    writer = store.writer(part_size=32)
    writer.flush()
    assert not tmp_path.exists() or part_names(tmp_path) == []
    writer.write("a", np.zeros((1, 2, 2)), [1])
    assert store.ids() == set()  # still in a temporary part
    writer.flush()
    assert store.ids() == {"a"}
    writer.close()
    assert part_names(tmp_path) == ["part-r0-00000.h5"]


def test_map_store_clear(tmp_path):
    store = MapStore(tmp_path)
    with store.writer(part_size=1) as writer:
        writer.write("a", np.zeros((1, 2, 2)), [1])
        writer.write("b", np.zeros((1, 2, 2)), [1])
    (tmp_path / ".part-r0-00007.h5.tmp").write_bytes(b"x")
    assert len(store) == 2
    store.clear()
    assert store.ids() == set() and len(store) == 0 and part_names(tmp_path) == []
    with store.writer() as writer:  # numbering starts again; the index must not be stale
        writer.write("c", np.zeros((1, 2, 2)), [1])
    assert store.ids() == {"c"}


def test_clear_images_deletes_the_parts_holding_them_and_a_part_deleted_meanwhile_is_not_damage(tmp_path):
    store = MapStore(tmp_path)
    with store.writer(part_size=2) as writer:
        for image_id in "abcde":
            writer.write(image_id, np.zeros((1, 2, 2)), [1])
    store.clear_images(["c"])  # its part goes with "d"
    assert part_names(tmp_path) == ["part-r0-00000.h5", "part-r0-00002.h5"] and store.ids() == {"a", "b", "e"}

    reader = MapStore(tmp_path)  # another shard's --force deletes a part between its listing and its reading
    listed = reader._list_parts()
    (tmp_path / "part-r0-00000.h5").unlink()
    reader._list_parts = lambda: listed
    assert reader.ids() == {"e"}


def test_voc_palette():
    pal = voc_palette()
    assert len(pal) == 768 and all(0 <= v <= 255 for v in pal)
    assert pal[0:3] == [0, 0, 0]
    assert pal[3:6] == [128, 0, 0]
    assert pal[6:9] == [0, 128, 0]
    assert pal[15 * 3 : 16 * 3] == [192, 128, 128]  # person
    assert pal[255 * 3 :] == [224, 224, 192]


def test_label_store_round_trip_and_clear(tmp_path):
    store = LabelStore(tmp_path / "pseudo" / "train")
    assert store.ids() == set()
    label = np.zeros((5, 7), np.uint8)
    label[1, 2] = 1
    label[2:4, 3:6] = 15
    label[4, :] = 255
    store.write("2007_000032", label)
    store.write("other", np.ones((3, 3), np.int64))
    assert store.ids() == {"2007_000032", "other"}
    assert store.path("2007_000032") == tmp_path / "pseudo" / "train" / "2007_000032.png"
    got = store.read("2007_000032")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, label)

    with Image.open(store.path("2007_000032")) as im:
        assert im.mode == "P"
        assert im.getpalette()[: 3 * 256] == voc_palette()
        rgb = np.asarray(im.convert("RGB"))
    assert tuple(rgb[1, 2]) == (128, 0, 0)
    assert tuple(rgb[0, 0]) == (0, 0, 0)
    assert tuple(rgb[4, 0]) == (224, 224, 192)

    with pytest.raises(KeyError):
        store.read("missing")
    with pytest.raises(ValueError):
        store.write("bad", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError):
        store.write("a/b", label)
    (store.directory / ".x.png.tmp").write_bytes(b"partial")
    (store.directory / ".y.png.4242.tmp").write_bytes(b"partial")  # atomic.py's name, a process id in it
    assert store.ids() == {"2007_000032", "other"}  # temporaries are not labels
    store.clear()
    assert store.ids() == set() and list(store.directory.iterdir()) == []
