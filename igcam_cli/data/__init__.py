"""Dataset adapters behind one interface, and `open_dataset` to build one from igcam.toml's [dataset]."""

from __future__ import annotations

from typing import Any

from igcam_cli.data.base import Dataset, Sample
from igcam_cli.data.classes import VOC_CLASSES, parse_class_list
from igcam_cli.errors import UsageError

FORMATS = ("voc", "folder", "coco", "synthetic")
FILE_FORMAT_KEYS = {"format", "root", "classes"}

__all__ = ["Dataset", "Sample", "VOC_CLASSES", "FORMATS", "open_dataset", "parse_class_list"]


def open_dataset(spec: dict[str, Any]) -> Dataset:
    """Build a dataset from `{format, root, classes?}` (synthetic: `{format, **generator params}`).

    `classes` may be a list of names, or a string (a class-list file or `a,b,c`).
    """
    spec = dict(spec)
    fmt = spec.pop("format", None)
    if fmt not in FORMATS:
        raise UsageError(f"unknown dataset format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if isinstance(spec.get("classes"), str):
        spec["classes"] = parse_class_list(spec["classes"])
    if fmt == "synthetic":
        from igcam_cli.data.synthetic import SyntheticDataset

        return SyntheticDataset(**spec)
    unknown = sorted(set(spec) - FILE_FORMAT_KEYS)
    if unknown:
        raise UsageError(f"unknown key(s) for a {fmt} dataset: {', '.join(unknown)} (expected root, classes)")
    if not spec.get("root"):
        raise UsageError(f"a {fmt} dataset needs a root folder")
    if fmt == "voc":
        from igcam_cli.data.voc import VocDataset

        return VocDataset(spec["root"], spec.get("classes"))
    if fmt == "coco":
        from igcam_cli.data.coco import CocoDataset

        return CocoDataset(spec["root"], spec.get("classes"))
    from igcam_cli.data.folder import FolderDataset

    return FolderDataset(spec["root"], spec.get("classes"))
