"""Bad inputs, each with its documented behaviour: handled correctly, or one line naming the file or path."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cli_helpers import assert_error, igcam
from igcam_cli.config import TrainSegConfig
from igcam_cli.data.imageio import read_image
from igcam_cli.data.synthetic import SyntheticDataset
from igcam_cli.stages import train_seg


def test_a_16_bit_greyscale_png_keeps_its_grey_levels(tmp_path):
    levels = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "wide.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith("I")
    image = read_image(path)
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    assert image[..., 0].tolist() == [[0, 64], [128, 255]] and (image == image[..., :1]).all()


def test_init_on_a_file_or_below_one_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a workspace")
    assert_error(igcam("init", "-w", afile, "--dataset", "synthetic"), 2, "is a file, not a directory")
    assert_error(igcam("init", "-w", afile / "ws", "--dataset", "synthetic"), 2, "cannot create the workspace")
    assert afile.read_text() == "not a workspace"


def test_a_validation_split_the_dataset_lacks_is_said_not_skipped_silently():
    dataset = SyntheticDataset(n_train=4, n_val=2, size=32)
    said: list[str] = []
    assert train_seg._val_ids(TrainSegConfig(val_split="nosuch"), dataset, said.append) == []
    assert said == ["train-seg: no validation: the dataset has no split 'nosuch' (train, val)"]
    assert train_seg._val_ids(TrainSegConfig(val_split=""), dataset, said.append) == [] and len(said) == 1
    assert train_seg._val_ids(TrainSegConfig(), dataset, said.append) == dataset.ids("val")
