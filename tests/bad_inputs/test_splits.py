"""Split files, for the folder and VOC adapters: CRLF, a BOM and blank lines are fine; an id listed twice
and a split that lists no image are one line naming the file (exit 4 from a command)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import assert_error, igcam
from igcam_cli.data.folder import FolderDataset
from igcam_cli.data.voc import VocDataset
from igcam_cli.errors import BadData


def folder_with_split(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels.csv").write_text("id,labels\na,cat\nb,dog\n")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_bytes(text.encode("utf-8"))
    return root


def voc_with_split(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_bytes(text.encode("utf-8"))
    return root


@pytest.mark.parametrize("make, open_", [(folder_with_split, FolderDataset), (voc_with_split, VocDataset)])
def test_crlf_bom_and_blank_lines_are_read(tmp_path, make, open_):
    root = make(tmp_path, "\ufeffa\r\n\r\n  b  \r\n")
    assert open_(root).ids("train") == ["a", "b"]


@pytest.mark.parametrize("make, open_", [(folder_with_split, FolderDataset), (voc_with_split, VocDataset)])
def test_an_id_listed_twice_names_both_lines(tmp_path, make, open_):
    root = make(tmp_path, "a\nb\na\n")
    with pytest.raises(BadData, match=r"train\.txt, line 3: image 'a' is listed twice \(first on line 1\)"):
        open_(root).ids("train")


@pytest.mark.parametrize("make, open_", [(folder_with_split, FolderDataset), (voc_with_split, VocDataset)])
def test_an_empty_split_is_an_error_not_a_nan(tmp_path, make, open_):
    root = make(tmp_path, "\n \n")
    with pytest.raises(BadData, match=r"train\.txt lists no image"):
        open_(root).ids("train")


def test_init_names_the_empty_split_file(tmp_path):
    root = folder_with_split(tmp_path, "")
    assert_error(igcam("init", "-w", tmp_path / "ws", "--dataset", "folder", "--root", root), 4, "lists no image")


def test_a_voc_root_without_split_files_fails_init(tmp_path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    result = igcam("init", "-w", tmp_path / "ws", "--dataset", "voc", "--root", root, "--classes", "cat,dog")
    assert_error(result, 4, str(root), "has no splits", "ImageSets/Segmentation/<split>.txt")
    assert not (tmp_path / "ws" / "igcam.toml").exists()
