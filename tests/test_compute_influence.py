"""compute-influence through the stage (shards, resume, stored values), fusion in make-cams,
progressive training (round 2 with influence weights), the mislabel report and label noise."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_helpers import OPTS, assert_error, igcam, ok, tiny_cls_config
from igcam_cli import influence_io
from igcam_cli.config import (
    ComputeInfluenceConfig,
    CrfConfig,
    EvaluateConfig,
    InfluenceReportConfig,
    MakeCamsConfig,
    RefineConfig,
    build,
)
from igcam_cli.core import influence as inf
from igcam_cli.core.fusion import fuse, influence_heat
from igcam_cli.core.metrics import auroc, class_prior_loss, learned_fractions
from igcam_cli.data.noise import corrupt_labels
from igcam_cli.data.synthetic import SyntheticDataset
from igcam_cli.data.transforms import normalize
from igcam_cli.errors import BadData, UsageError
from igcam_cli.models.classifier import load_checkpoint
from igcam_cli.runtime.distributed import Shard
from igcam_cli.stages import (
    compute_influence,
    crf,
    evaluate,
    influence_report,
    make_cams,
    refine,
    train_cls,
)
from igcam_cli.store import MapStore
from igcam_cli.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_thread")


# The 1-epoch classifier of these workspaces has not learned (its loss is above the class-prior
# loss), so the guard would flatten every weight and withhold every suggestion: off, except in the
# guard's own tests.
GUARD_OFF = {"learned_low": -math.inf, "learned_high": -math.inf}
DEFAULT_GUARD = {"learned_low": ComputeInfluenceConfig.learned_low, "learned_high": ComputeInfluenceConfig.learned_high}


def _influence_cfg(ws: Workspace, **overrides) -> ComputeInfluenceConfig:
    values = {
        "scope": "head",
        "batch_size": 3,
        "workers": 0,
        "w_threshold": 0.0,
        **GUARD_OFF,
    }  # 8 images: weigh above the median
    values.update(overrides)
    return build(ComputeInfluenceConfig, ws.stage_table("compute-influence"), values)


@pytest.fixture(scope="module")
def influenced(stage_trained_template, tmp_path_factory) -> Path:
    """`stage_trained_template` + compute-influence (EK-FAC on the head) for 'train'. Do not modify."""
    root = Path(shutil.copytree(stage_trained_template, tmp_path_factory.mktemp("influenced") / "ws"))
    ws = Workspace.open(root)
    compute_influence.run(_influence_cfg(ws), ws, OPTS)
    return root


def _copy(src: Path, dst: Path) -> Workspace:
    return Workspace.open(Path(shutil.copytree(src, dst)))


def _stored(ws: Workspace, split: str = "train") -> dict:
    store = MapStore(ws.influence_dir(split))
    out = {}
    for image_id in sorted(store.ids()):
        maps, classes, attrs = influence_io.read_maps(store, image_id)
        out[image_id] = (maps, classes, attrs)
    return out


# ---------------------------------------------------------------------------------------------
# compute-influence
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_stage_equals_unsharded(influenced, stage_trained_template, tmp_path):
    ws = _copy(stage_trained_template, tmp_path / "sharded")
    cfg = _influence_cfg(ws)
    first = compute_influence.run(cfg, ws, OPTS, Shard(0, 2))
    assert first == {"phase": "waiting", "stage": "factors", "missing": 1, "scored": 0}
    second = compute_influence.run(cfg, ws, OPTS, Shard(1, 2))  # factors of both: on to lambda, waits for shard 0
    assert second["phase"] == "waiting" and second["stage"] == "lambda"
    assert compute_influence.run(cfg, ws, OPTS, Shard(0, 2)) == {"phase": "done", "scored": 4}
    assert not (ws.influence_dir("train") / influence_io.SCORES_NAME).exists()  # shard 1 has not scored yet
    assert compute_influence.run(cfg, ws, OPTS, Shard(1, 2)) == {"phase": "done", "scored": 4}
    assert compute_influence.run(cfg, ws, OPTS, Shard(1, 2)) == {"phase": "done", "scored": 0}  # resumed: nothing left

    whole = Workspace.open(influenced)
    ids = whole.dataset().ids("train")
    a = influence_io.read_scores(whole.influence_dir("train"), ids, "x", 5)
    b = influence_io.read_scores(ws.influence_dir("train"), ids, "x", 5)
    for i in ids:
        for field in ("self_influence", "loss", "atypicality", "weight"):
            assert getattr(b[i], field) == pytest.approx(getattr(a[i], field), rel=1e-4, abs=1e-6), (i, field)
    sa, sb = _stored(whole), _stored(ws)
    assert sa.keys() == sb.keys() == set(ids)
    for i in ids:
        np.testing.assert_array_equal(sa[i][1], sb[i][1])
        per_class = np.asarray(sa[i][2]["per_class"])  # float32 batch sums in other groupings: relative to the scale
        np.testing.assert_allclose(sb[i][2]["per_class"], per_class, rtol=1e-4, atol=1e-4 * np.abs(per_class).max())
        np.testing.assert_allclose(sb[i][0], sa[i][0], rtol=1e-2, atol=1e-3 * np.abs(sa[i][0]).max())
    records = [r for r in ws.records() if r["stage"] == "compute-influence"]
    assert {r["shard"] for r in records} == {"0/2", "1/2"}
    assert all(r["classifier"]["round"] == 1 and r["classifier"]["path"] == "cls/model.pt" for r in records)


@pytest.mark.slow
def test_stored_values_match_autograd_and_maps_sum_to_scores(influenced):
    """hessian none: self-influence = |grad of the head|^2 per image, from a plain autograd loop."""
    ws = Workspace.open(influenced)
    model = load_checkpoint(ws.cls_dir / "model.pt", "x").eval()
    dataset = ws.dataset()
    stored = _stored(ws)
    for image_id, (maps, classes, attrs) in list(stored.items())[:4]:
        sample = dataset.load(image_id, with_mask=False)
        np.testing.assert_array_equal(classes, sample.labels.astype(np.uint8))  # maps of the labelled classes
        per_class = np.asarray(attrs["per_class"])
        np.testing.assert_allclose(
            maps.sum((1, 2)), per_class[classes.astype(int) - 1], rtol=2e-3, atol=2e-3 * np.abs(maps).sum()
        )
        assert attrs["self_influence"] > 0 and (attrs["image_height"], attrs["image_width"]) == (64, 64)
        target = torch.zeros(1, 5)
        target[0, torch.as_tensor(sample.labels) - 1] = 1
        with torch.no_grad():
            logits = model(normalize(sample.image)[None])[0]
        assert attrs["loss"] == pytest.approx(float(F.multilabel_soft_margin_loss(logits, target).detach()), rel=1e-5)
        np.testing.assert_allclose(attrs["probs"], torch.sigmoid(logits[0]).numpy(), rtol=1e-5, atol=1e-6)
    # scores.csv's suggestions are suggest_labels of the stored scores.
    ids = dataset.ids("train")
    scores = influence_io.read_scores(ws.influence_dir("train"), ids, "x", 5)
    labels = torch.zeros(len(ids), 5, dtype=torch.bool)
    for k, i in enumerate(ids):
        labels[k, torch.as_tensor(dataset.labels(i)) - 1] = True
    probs = torch.tensor(np.stack([stored[i][2]["probs"] for i in ids]))
    cfg = _influence_cfg(ws)
    expected = inf.suggest_labels(
        labels,
        probs,
        torch.tensor([scores[i].atypicality for i in ids]),
        cfg.relabel_threshold,
        cfg.relabel_confidence,
        cfg.relabel_drop_below,
    )
    assert [scores[i].suggested for i in ids] == [
        " ".join(str(int(c) + 1) for c in torch.nonzero(row).flatten()) for row in expected
    ]


@pytest.mark.slow
def test_identity_curvature_is_plain_gradient_norm(stage_trained_template, tmp_path):
    ws = _copy(stage_trained_template, tmp_path / "none")
    compute_influence.run(_influence_cfg(ws, hessian="none", maps="none"), ws, OPTS)
    model = load_checkpoint(ws.cls_dir / "model.pt", "x").eval()
    stored = _stored(ws)
    for image_id, (maps, classes, attrs) in stored.items():
        assert maps.shape[0] == 0 and len(classes) == 0
        sample = ws.dataset().load(image_id, with_mask=False)
        target = torch.zeros(1, 5)
        target[0, torch.as_tensor(sample.labels) - 1] = 1
        model.zero_grad()
        F.multilabel_soft_margin_loss(model(normalize(sample.image)[None])[0], target).backward()
        assert attrs["self_influence"] == pytest.approx(float(model.head.weight.grad.square().sum()), rel=1e-4)
    assert not (ws.influence_dir("train") / "eigen.pt").exists()  # no curvature for hessian none


@pytest.mark.slow
def test_resume_refuses_other_settings_and_force_redoes(influenced, tmp_path):
    ws = _copy(influenced, tmp_path / "ws")
    before = {p.name for p in MapStore(ws.influence_dir("train")).parts()}
    assert compute_influence.run(_influence_cfg(ws), ws, OPTS)["scored"] == 0
    with pytest.raises(UsageError, match="damping"):
        compute_influence.run(_influence_cfg(ws, damping=0.5), ws, OPTS)
    # Weight settings only rewrite scores.csv: no image is scored again.
    assert compute_influence.run(_influence_cfg(ws, w_threshold=5.0), ws, OPTS)["scored"] == 0
    ids = ws.dataset().ids("train")
    assert all(s.weight == 1.0 for s in influence_io.read_scores(ws.influence_dir("train"), ids, "x", 5).values())
    # The same classifier named by its round rather than as the latest: the same run, nothing to redo.
    assert compute_influence.run(_influence_cfg(ws, round=1), ws, OPTS)["scored"] == 0
    out = compute_influence.run(_influence_cfg(ws, damping=0.5), ws, OPTS, force=True)
    assert out["scored"] == 8
    assert {p.name for p in MapStore(ws.influence_dir("train")).parts()} == before  # same names, new content
    a = influence_io.read_scores(Workspace.open(influenced).influence_dir("train"), ["train_00000"], "x", 5)
    b = influence_io.read_scores(ws.influence_dir("train"), ["train_00000"], "x", 5)
    assert b["train_00000"].self_influence < a["train_00000"].self_influence  # more damping, smaller H^-1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"relabel_confidence": 0.4}, "relabel-confidence: 0.4 is not allowed (a number in [0.5, 1))"),
        ({"relabel_drop_below": 0.6}, "relabel_drop_below = 0.6, relabel_confidence = 0.7; need relabel_drop_below <="),
        ({"relabel_confidence": 0.8, "relabel_drop_below": 0.3}, "relabel_drop_below = 0.3, relabel_confidence = 0.8"),
    ],
)
@pytest.mark.slow
def test_bad_suggestion_settings_are_refused_before_any_work(stage_trained_template, settings, message):
    ws = Workspace.open(stage_trained_template)
    with pytest.raises(UsageError) as raised:
        compute_influence.run(_influence_cfg(ws, **settings), ws, OPTS)
    assert message in str(raised.value)
    assert not ws.influence_dir("train").exists()


@pytest.mark.slow
def test_refuses_files_of_another_run_and_wait_gives_up(influenced, stage_trained_template, tmp_path):
    ws = _copy(influenced, tmp_path / "stats")
    own = ws.influence_dir("train") / "stats-factors-r0-of-1.pt"
    influence_io.save_state(own, "another run's key", {})
    with pytest.raises(UsageError, match="other settings or another classifier"):
        compute_influence.run(_influence_cfg(ws), ws, OPTS)

    ws = _copy(influenced, tmp_path / "classifier")
    checkpoint = torch.load(ws.cls_dir / "model.pt", weights_only=True)
    checkpoint["model"]["head.weight"] += 0.01  # a retrained classifier, as far as the checksum can tell
    torch.save(checkpoint, ws.cls_dir / "model.pt")
    with pytest.raises(UsageError, match="another classifier"):
        compute_influence.run(_influence_cfg(ws), ws, OPTS)
    assert compute_influence.run(_influence_cfg(ws), ws, OPTS, force=True)["scored"] == 8

    ws = _copy(stage_trained_template, tmp_path / "wait")
    with pytest.raises(UsageError, match="did not all appear"):
        compute_influence.run(_influence_cfg(ws), ws, OPTS, Shard(0, 2), wait=True, wait_timeout_s=0.0)
    assert (ws.influence_dir("train") / "stats-factors-r0-of-2.pt").is_file()  # its own work is kept


@pytest.mark.slow
def test_cli_errors(fresh_ws, stage_trained_template, tmp_path):
    assert_error(igcam("compute-influence", "-w", fresh_ws, "--scope", "head"), 3, "igcam train-cls -w")
    ws = _copy(stage_trained_template, tmp_path / "ws")
    assert_error(igcam("compute-influence", "-w", ws.root, "--hessian", "exact"), 2, "--hessian")
    assert_error(igcam("compute-influence", "-w", ws.root, "--scope", "nope"), 2, "--scope nope")
    assert_error(
        igcam("make-cams", "-w", ws.root, "--influence-fusion", "0.3", "--workers", "0"),
        3,
        "igcam compute-influence -w",
    )
    assert_error(
        igcam("train-cls", "-w", ws.root, "--round", "2", "--sample-weights", "influence", "--epochs", "1"),
        3,
        "igcam compute-influence -w",
    )
    assert_error(igcam("train-cls", "-w", ws.root, "--sample-weights", "influence"), 2, "--round 2")
    assert_error(igcam("train-cls", "-w", ws.root, "--round", "3", "--epochs", "1"), 3, "--round 2")
    # A shard without its partner's statistics writes its own and stops cleanly (exit 0).
    ok("compute-influence", "-w", ws.root, "--scope", "head", "--workers", "0", "--shard", "0/2", "--device", "cpu")
    assert (ws.influence_dir("train") / "stats-factors-r0-of-2.pt").is_file()
    assert "rerun this command" in ws.log_path("compute-influence").read_text()
    assert not MapStore(ws.influence_dir("train")).ids()


# ---------------------------------------------------------------------------------------------
# make-cams fusion
# ---------------------------------------------------------------------------------------------


def _cams_cfg(ws: Workspace, **overrides) -> MakeCamsConfig:
    values = {"workers": 0, "scales": [1.0], "flip": False}
    values.update(overrides)
    return build(MakeCamsConfig, ws.stage_table("make-cams"), values)


@pytest.mark.slow
def test_fusion_zero_is_byte_identical_and_fusion_mixes_the_maps(influenced, tmp_path):
    ws = _copy(influenced, tmp_path / "ws")
    make_cams.run(_cams_cfg(ws), ws, OPTS)
    plain = {i: ws.maps("cams", "train").read(i) for i in ws.dataset().ids("train")}
    make_cams.run(_cams_cfg(ws, influence_fusion=0.0), ws, OPTS, force=True)
    for i, record in plain.items():
        assert ws.maps("cams", "train").read(i).maps.tobytes() == record.maps.tobytes()
    lam = 0.5
    make_cams.run(_cams_cfg(ws, influence_fusion=lam), ws, OPTS, force=True)
    assert "compute-influence:train" in ws.latest("make-cams", "train")["inputs"]
    changed = 0
    for i, record in plain.items():
        fused = ws.maps("cams", "train").read(i)
        infl, classes, _ = influence_io.read_maps(MapStore(ws.influence_dir("train")), i)
        np.testing.assert_array_equal(fused.classes, classes)
        expected = fuse(torch.from_numpy(record.maps), torch.from_numpy(infl), lam).numpy()
        np.testing.assert_allclose(fused.maps, expected, atol=3e-3)
        assert np.allclose(fused.maps.reshape(len(classes), -1).max(1), 1.0, atol=1e-3)
        changed += not np.allclose(fused.maps, record.maps, atol=1e-2)
    assert changed >= len(plain) // 2


@pytest.mark.slow
def test_fusion_refuses_influence_computed_without_maps(influenced, tmp_path):
    ws = _copy(influenced, tmp_path / "ws")
    manifest = ws.manifest_path
    text = manifest.read_text()
    assert '"maps": "labelled"' in text
    manifest.write_text(text.replace('"maps": "labelled"', '"maps": "none"'))
    with pytest.raises(UsageError, match="--maps none"):
        make_cams.run(_cams_cfg(ws, influence_fusion=0.5), ws, OPTS, force=True)


def test_images_are_drawn_at_the_classifiers_input_scale(tmp_path):
    dataset = SyntheticDataset(n_train=2, n_val=0, size=64)
    ids = dataset.ids("train")
    own = compute_influence._Images(dataset, ids, 0, 1.0)[0]
    assert own.image.shape == (3, 64, 64) and torch.equal(own.image, normalize(dataset.load(ids[0]).image))
    drawn = compute_influence._Images(dataset, ids, 0, 2.0)[0]
    assert drawn.image.shape == (3, 128, 128) and drawn.size == (64, 64)  # the maps are stored for the image
    assert compute_influence._Images(dataset, ids, 96, 2.0)[0].image.shape == (3, 96, 96)  # --size wins


def test_fusion_math():
    cams = torch.rand(2, 8, 8)
    cams = cams / cams.flatten(1).amax(1)[:, None, None]
    infl = torch.tensor([[[-1.0, 2.0], [0.5, -3.0]], [[-1.0, -2.0], [-0.5, -3.0]]])
    heat = influence_heat(infl, (8, 8))
    assert float(heat[0].max()) == pytest.approx(1.0) and float(heat[0].min()) == 0.0
    assert float(heat[1].abs().max()) == 0.0  # nothing helps class 2: no heat
    torch.testing.assert_close(influence_heat(infl * 1e-9, (8, 8)), heat)  # the scale does not matter
    assert fuse(cams, infl, 0.0) is cams
    irn_eps = {"atol": 1e-6, "rtol": 5e-5}  # normalize_cams divides by max + 1e-5, as IRN
    torch.testing.assert_close(fuse(cams, infl, 1.0)[0], heat[0], **irn_eps)
    torch.testing.assert_close(fuse(cams, infl, 0.3)[1], cams[1], **irn_eps)  # 0.7 cam renormalised = cam
    with pytest.raises(ValueError):
        fuse(cams, infl, 1.5)


# ---------------------------------------------------------------------------------------------
# Progressive training
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_round2_fine_tunes_with_weights_and_later_stages_use_it(influenced, tmp_path):
    ws = _copy(influenced, tmp_path / "ws")
    round1 = torch.load(ws.cls_dir / "model.pt", weights_only=True)["model"]
    scores = influence_io.read_scores(ws.influence_dir("train"), ws.dataset().ids("train"), "x", 5)
    weights = [s.weight for s in scores.values()]
    assert np.mean(weights) == pytest.approx(1.0, abs=1e-5) and min(weights) < 1.0
    seen = {}
    original = train_cls._initial_model

    def spy(cfg, num_classes, init_from, ws_):
        model = original(cfg, num_classes, init_from, ws_)
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    make_cams.run(_cams_cfg(ws), ws, OPTS)  # round 1: the latest so far
    round1_cams = ws.latest("make-cams", "train")
    assert round1_cams["classifier"]["round"] == 1 and not ws.is_stale(round1_cams)
    train_cls._initial_model = spy
    try:
        train_cls.run(
            tiny_cls_config(ws, epochs=1, round=2, sample_weights="influence"),
            ws,
            OPTS,
            train_cls.TrainOptions(force=True),  # over the template's round 2
        )
    finally:
        train_cls._initial_model = original
    assert all(torch.equal(seen[k], round1[k]) for k in round1)  # round 2 starts from round 1
    round2 = torch.load(ws.cls_round_dir(2) / "model.pt", weights_only=True)
    assert round2["config"]["round"] == 2 and round2["config"]["sample_weights"] == "influence"
    assert all(
        torch.equal(torch.load(ws.cls_dir / "model.pt", weights_only=True)["model"][k], round1[k]) for k in round1
    )
    record = ws.latest("train-cls")
    assert record["round"] == 2 and record["classifier"]["path"] == "cls/round2/model.pt"
    assert set(record["inputs"]) == {"train-cls@1", "compute-influence:train"}
    assert not ws.is_stale(record)  # its own round-1 input is still the latest of round 1
    assert ws.is_stale(round1_cams)  # made from "the latest classifier", which is now round 2

    # The same round without weights ends elsewhere: the weights reach the loss.
    other = _copy(influenced, tmp_path / "unweighted")
    train_cls.run(tiny_cls_config(other, epochs=1, round=2), other, OPTS, train_cls.TrainOptions(force=True))
    unweighted = torch.load(other.cls_round_dir(2) / "model.pt", weights_only=True)["model"]
    assert not torch.equal(unweighted["head.weight"], round2["model"]["head.weight"])

    with pytest.raises(UsageError, match="round"):
        make_cams.run(_cams_cfg(ws), ws, OPTS)  # no mixing of two classifiers in one output
    make_cams.run(_cams_cfg(ws), ws, OPTS, force=True)
    latest = ws.latest("make-cams", "train")
    assert latest["classifier"]["round"] == 2 and not ws.is_stale(latest)  # the latest round by default
    assert "classifier round 2" in ws.log_path("make-cams").read_text()
    make_cams.run(_cams_cfg(ws, round=1), ws, OPTS, force=True)
    assert ws.latest("make-cams", "train")["classifier"] == {
        "round": 1,
        "path": "cls/model.pt",
        "run": ws.records()[0]["id"],
        "input_scale": 1.0,
    }
    compute_influence.run(_influence_cfg(ws), ws, OPTS, force=True)
    assert ws.latest("compute-influence", "train")["classifier"]["round"] == 2


@pytest.mark.slow
def test_round2_trains_on_suggested_labels_and_make_cams_follows_it(influenced, tmp_path):
    ws = _copy(influenced, tmp_path / "ws")
    ids = ws.dataset().ids("train")
    scores = influence_io.read_scores(ws.influence_dir("train"), ids, "x", 5)
    with open(ws.influence_dir("train") / influence_io.SCORES_NAME) as fh:
        assert "suggested" in fh.readline().strip().split(",")  # compute-influence wrote the column
    # Hand a suggestion to one image, as compute-influence would for a mislabelled one (and none to the others).
    for image_id in ids:
        scores[image_id].suggested = ""
    target = ids[2]
    own = set(ws.dataset().labels(target).tolist())
    new = [c for c in range(1, ws.dataset().num_classes + 1) if c not in own][:1]
    scores[target].suggested = " ".join(map(str, new))
    influence_io.write_scores(ws.influence_dir("train"), [scores[i] for i in ids])
    assert influence_io.read_scores(ws.influence_dir("train"), ids, "x", 5)[target].relabelled

    seen = []
    original = train_cls._ClassifierImages.__getitem__

    def spy(self, index):
        out = original(self, index)
        if self.train and self.ids[index] == target:
            seen.append(out[1].clone())
        return out

    train_cls._ClassifierImages.__getitem__ = spy
    try:
        train_cls.run(
            tiny_cls_config(ws, epochs=1, round=2, sample_weights="influence"),
            ws,
            OPTS,
            train_cls.TrainOptions(force=True),  # over the template's round 2
        )
    finally:
        train_cls._ClassifierImages.__getitem__ = original
    assert seen and all(torch.nonzero(t).flatten().add(1).tolist() == new for t in seen)
    relabelled = influence_io.read_relabelled(ws.cls_round_dir(2) / influence_io.RELABELLED_NAME, 5)
    assert list(relabelled) == [target] and relabelled[target].tolist() == new
    record = ws.latest("train-cls")
    assert record["metrics"]["relabelled"] == 1
    # The gentle fine-tune: lr x 0.2, half the epochs (at least 1).
    assert (
        record["metrics"]["lr"] == pytest.approx(tiny_cls_config(ws, epochs=1).lr * 0.2)
        and record["metrics"]["epochs"] == 1
    )

    make_cams.run(_cams_cfg(ws), ws, OPTS)  # auto: the labels round 2 trained on
    cams = MapStore(ws.path("cams") / "train")
    assert cams.read(target).classes.tolist() == new
    assert cams.read(ids[0]).classes.tolist() == ws.dataset().labels(ids[0]).tolist()
    assert ws.latest("make-cams", "train")["relabelled"] == 1
    result = evaluate.run(build(EvaluateConfig, None, {"artifact": "cams", "split": "train"}), ws, OPTS)
    assert result["relabelled"] == 1 and "1 images with labels suggested by compute-influence" in evaluate.describe(
        result
    )
    assert (result["classifier_round"], result["stale"]) == (2, False)
    assert "CAMs of classifier round 2" in evaluate.describe(result) and "STALE" not in evaluate.describe(result)
    refine.run(build(RefineConfig, None, {"workers": 0, "scales": [1.0], "iterations": 2}), ws, OPTS)
    crf.run(build(CrfConfig, None, {"workers": 0}), ws, OPTS)
    for artifact in ("refined", "crf"):  # descendants of those CAMs say so too
        result = evaluate.run(build(EvaluateConfig, None, {"artifact": artifact, "split": "train"}), ws, OPTS)
        assert result["relabelled"] == 1
    make_cams.run(_cams_cfg(ws, label_source="labels"), ws, OPTS, force=True)
    assert MapStore(ws.path("cams") / "train").read(target).classes.tolist() == sorted(own)

    # --no-relabel trains on the labels as given and leaves no relabelled.csv behind.
    train_cls.run(
        tiny_cls_config(ws, epochs=1, round=2, sample_weights="influence", relabel=False),
        ws,
        OPTS,
        train_cls.TrainOptions(force=True),
    )
    assert not (ws.cls_round_dir(2) / influence_io.RELABELLED_NAME).exists()
    result = evaluate.run(build(EvaluateConfig, None, {"artifact": "cams", "split": "train"}), ws, OPTS)
    assert result["stale"] and "STALE" in evaluate.describe(result)  # made by the round-2 run before this one
    make_cams.run(_cams_cfg(ws), ws, OPTS, force=True)
    assert MapStore(ws.path("cams") / "train").read(target).classes.tolist() == sorted(own)


# ---------------------------------------------------------------------------------------------
# The guard: no suggestions and flat weights from a classifier that has not learned
# ---------------------------------------------------------------------------------------------


def _scores_and_fit(ws: Workspace, **overrides) -> tuple[dict, dict]:
    """Rerun compute-influence with other weight / suggestion settings (nothing is recomputed but scores.csv)."""
    cfg = _influence_cfg(ws, relabel_threshold=-100.0, relabel_confidence=0.5, relabel_drop_below=0.5, **overrides)
    assert compute_influence.run(cfg, ws, OPTS)["scored"] == 0
    scores = influence_io.read_scores(ws.influence_dir("train"), ws.dataset().ids("train"), "x", 5)
    return scores, influence_io.read_fit(ws.influence_dir("train"))


@pytest.mark.slow
def test_guard_withholds_suggestions_and_flattens_weights_unless_the_classifier_has_learned(influenced, tmp_path):
    ws = _copy(influenced, tmp_path / "ws")
    ids = ws.dataset().ids("train")
    # Every image a suspect (relabel_threshold -100) and every labelled class below 0.5 dropped: suggestions.
    today, fit = _scores_and_fit(ws)
    suggested = sum(s.relabelled for s in today.values())
    assert suggested > 0 and min(s.weight for s in today.values()) < 1
    labels = np.zeros((len(ids), 5))
    for k, i in enumerate(ids):
        labels[k, ws.dataset().labels(i) - 1] = 1
    losses = np.array([today[i].loss for i in ids])
    assert fit["prior_loss"] == pytest.approx(class_prior_loss(labels), rel=1e-12)
    assert fit["mean_loss"] == pytest.approx(losses.mean(), rel=1e-12)
    g = fit["learned_fraction"]
    assert g == pytest.approx(np.median(learned_fractions(losses, labels)), rel=1e-12)
    assert g < DEFAULT_GUARD["learned_low"]  # 1 epoch: not learned
    assert (fit["trust"], fit["suggestions_suppressed"], fit["suggestions_withheld"]) == (1.0, False, 0)

    # The defaults: no weights, no suggestions.
    guarded, fit = _scores_and_fit(ws, **DEFAULT_GUARD)
    assert not any(s.relabelled for s in guarded.values()) and all(s.weight == 1.0 for s in guarded.values())
    assert [guarded[i].atypicality for i in ids] == [today[i].atypicality for i in ids]  # the ranking stays
    assert (fit["trust"], fit["suggestions_suppressed"], fit["suggestions_withheld"]) == (0.0, True, suggested)
    assert fit["learned_fraction"] == pytest.approx(g)
    record = ws.latest("compute-influence", "train")
    assert record["metrics"]["fit"] == fit
    line = [x for x in ws.log_path("compute-influence").read_text().splitlines() if "classifier fit on 'train'" in x][
        -1
    ]
    assert (
        f"learned fraction {g:.2f} < {DEFAULT_GUARD['learned_high']:g} (median" in line
        and "): the classifier has not learned enough" in line
        and f"sample weights all 1, no label suggestions ({suggested} withheld)" in line
    )

    # Half-way up the ramp: weights half-way to 1, still no suggestions.
    half, fit = _scores_and_fit(ws, learned_low=g - 1.0, learned_high=g + 1.0)
    assert fit["trust"] == pytest.approx(0.5) and fit["suggestions_suppressed"]
    for i in ids:
        assert half[i].weight == pytest.approx(1 + 0.5 * (today[i].weight - 1), rel=1e-12)
        assert not half[i].relabelled
    # A classifier that counts as learned (g at learned_high): as without the guard.
    learned, fit = _scores_and_fit(ws, learned_low=g - 1.0, learned_high=g)
    assert (fit["trust"], fit["suggestions_suppressed"]) == (1.0, False)
    assert {i: (s.weight, s.suggested) for i, s in learned.items()} == {
        i: (s.weight, s.suggested) for i, s in today.items()
    }


@pytest.mark.slow
def test_influence_report_says_when_suggestions_were_withheld(influenced, tmp_path):
    ws = _copy(influenced, tmp_path / "ws")
    _, fit = _scores_and_fit(ws, **DEFAULT_GUARD)
    printed = ok("influence-report", "-w", ws.root, "--split", "train", "--top-k", "2").stdout
    assert "warning: classifier fit on 'train'" in printed and "no label suggestions" in printed
    result = json.loads((ws.path("eval") / "influence-train.json").read_text())
    assert result["classifier_fit"] == fit and result["n_suggested"] == 0
    markdown = (ws.path("eval") / "influence-train.md").read_text()
    assert "**Warning:** classifier fit on 'train'" in markdown and "read this ranking as noise" in markdown
    assert ws.latest("influence-report", "train")["metrics"] == {
        "learned_fraction": fit["learned_fraction"],
        "suggestions_suppressed": True,
    }
    said = ok("influence-report", "-w", ws.root, "--split", "train", "--quiet").stdout
    assert said == (
        f"influence / train: 0 images with suggested labels (suggestions suppressed: the classifier "
        f"has not learned, learned fraction {fit['learned_fraction']:.2f} < {fit['learned_high']:g})\n"
    )
    # A learned one: no warning.
    _scores_and_fit(ws, learned_low=fit["learned_fraction"], learned_high=fit["learned_fraction"])
    printed = ok("influence-report", "-w", ws.root, "--split", "train", "--top-k", "2").stdout
    assert "warning" not in printed and "weights and label suggestions as computed" in printed
    # scores.csv from before the guard: the report says it does not know; a damaged fit.json is one line.
    fit_path = ws.influence_dir("train") / influence_io.FIT_NAME
    fit_path.unlink()
    result = influence_report.run(build(InfluenceReportConfig, None, {"top_k": 2}), ws, OPTS)
    assert result["classifier_fit"] is None and "classifier fit: not recorded" in influence_report.markdown(result)
    fit_path.write_text("{not json")
    assert_error(igcam("influence-report", "-w", ws.root, "--split", "train"), 4, str(fit_path))


# ---------------------------------------------------------------------------------------------
# Mislabel report, label noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_influence_report_lists_images_and_scores_the_truth(influenced, tmp_path):
    ws = _copy(influenced, tmp_path / "ws")
    ids = ws.dataset().ids("train")
    scores = influence_io.read_scores(ws.influence_dir("train"), ids, "x", 5)
    truth = tmp_path / "bad.txt"
    truth.write_text("train_00001\ntrain_00005\n")
    result = influence_report.run(build(InfluenceReportConfig, None, {"top_k": 3, "truth": str(truth)}), ws, OPTS)
    ranked = sorted(ids, key=lambda i: -scores[i].atypicality)
    assert [r["id"] for r in result["rows"]] == ranked[:3]
    positive = np.array([i in ("train_00001", "train_00005") for i in ids])
    assert result["auroc"] == pytest.approx(auroc(np.array([scores[i].atypicality for i in ids]), positive))
    assert result["n_mislabelled"] == 2
    assert result["n_suggested"] == sum(s.relabelled for s in scores.values())
    names = ws.dataset().classes
    for r in result["rows"]:
        own = scores[r["id"]]
        assert r["suggested"] == ([names[int(k) - 1] for k in own.suggested.split()] if own.relabelled else [])
    assert result["rows"][0]["labels"] == [names[k - 1] for k in ws.dataset().labels(ranked[0])]
    for suffix in ("json", "md", "png"):
        assert (ws.path("eval") / f"influence-train.{suffix}").is_file()
    assert "AUROC" in (ws.path("eval") / "influence-train.md").read_text()
    assert ws.latest("influence-report", "train")["metrics"]["auroc"] == pytest.approx(result["auroc"])
    (ws.path("eval") / "influence-train.json").unlink()
    # The same report; --quiet says what it found in one line (no --truth here, so no AUROC).
    said = ok("evaluate", "-w", ws.root, "--artifact", "influence", "--split", "train", "--quiet").stdout
    assert said == f"influence / train: {result['n_suggested']} images with suggested labels\n"
    assert influence_report.summary(result) == (
        f"influence / train: {result['n_suggested']} images with suggested labels, {result['suggested_mislabelled']} "
        f"of them known mislabelled; AUROC {result['auroc']:.3f} (per-image loss: {result['auroc_loss']:.3f}) "
        f"against {result['n_mislabelled']} known mislabelled"
    )
    assert (ws.path("eval") / "influence-train.json").is_file()


@pytest.mark.slow
def test_report_sheet_shows_the_labelled_classes_when_every_class_has_maps(
    stage_trained_template, tmp_path, monkeypatch
):
    ws = _copy(stage_trained_template, tmp_path / "ws")
    compute_influence.run(_influence_cfg(ws, maps="all"), ws, OPTS)
    record = MapStore(ws.influence_dir("train")).read("train_00000")
    assert record.classes.tolist() == [1, 2, 3, 4, 5]
    drawn = []
    monkeypatch.setattr(
        influence_report.report, "contact_sheet", lambda rows, titles, path, cell: drawn.extend(rows) or path
    )
    result = influence_report.run(build(InfluenceReportConfig, None, {"top_k": 8}), ws, OPTS)
    blank = np.full((influence_report.CELL, influence_report.CELL, 3), 255, np.uint8)
    for row, tiles in zip(result["rows"], drawn):
        assert sum(not np.array_equal(t, blank) for t in tiles) == 1 + len(row["labels"])


def test_auroc_by_hand():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.array([1.0, 1.0, 2.0]), np.array([1, 0, 0])) == 0.25  # a tie counts half
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([0, 0])))


def test_corrupt_labels_is_seeded_and_changes_one_class():
    labels = {f"i{k:02d}": np.array(sorted({1 + k % 5, 1 + (k * 3) % 5}), dtype=np.int64) for k in range(40)}
    noisy = corrupt_labels(labels, 5, 0.1, seed=3)
    assert len(noisy) == 4 and noisy.keys() == corrupt_labels(labels, 5, 0.1, seed=3).keys()
    assert noisy.keys() != corrupt_labels(labels, 5, 0.1, seed=4).keys()
    for i, new in noisy.items():
        old = labels[i]
        assert len(new) == len(old) and len(set(new) - set(old)) == 1 and len(set(old) - set(new)) == 1


def test_corrupt_labels_adds_or_drops_one_class():
    labels = {f"i{k:02d}": np.array(sorted({1 + k % 5, 1 + (k * 3) % 5}), dtype=np.int64) for k in range(40)}
    added = corrupt_labels(labels, 5, 0.1, seed=3, kind="add")
    assert len(added) == 4
    for i, new in added.items():
        assert set(labels[i]) < set(new) and len(new) == len(labels[i]) + 1
    dropped = corrupt_labels(labels, 5, 0.1, seed=3, kind="drop")
    assert len(dropped) == 4
    for i, new in dropped.items():
        assert set(new) < set(labels[i]) and len(new) == len(labels[i]) - 1 >= 1
    singles = {i: v[:1] for i, v in labels.items()}
    assert corrupt_labels(singles, 5, 0.5, seed=3, kind="drop") == {}  # nothing to drop without losing the only class
    with pytest.raises(UsageError, match="--noise-kind"):
        corrupt_labels(labels, 5, 0.1, seed=3, kind="shuffle")


def test_synth_label_noise_writes_the_corrupted_list(tmp_path):
    out = tmp_path / "data"
    ok("synth", out, "--n-train", 20, "--n-val", 2, "--image-size", 32, "--label-noise", 0.1, "--seed", 1)
    with open(out / "corrupted.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    with open(out / "labels.csv") as fh:
        labels = {r["id"]: r["labels"] for r in csv.DictReader(fh)}
    for r in rows:
        assert labels[r["id"]] == r["noisy_labels"] != r["true_labels"]
    ws = tmp_path / "ws"
    ok("init", "-w", ws, "--dataset", "folder", "--root", out)
    assert len(Workspace.open(ws).dataset().ids("train")) == 20
    said = ok(
        "synth",
        tmp_path / "added",
        "--n-train",
        20,
        "--n-val",
        2,
        "--image-size",
        32,
        "--label-noise",
        0.1,
        "--noise-kind",
        "add",
    ).stdout
    assert "corrupted the labels of 2 train images (add;" in said
    with open(tmp_path / "added" / "corrupted.csv") as fh:
        for r in csv.DictReader(fh):
            assert set(r["true_labels"].split()) < set(r["noisy_labels"].split())


def test_synthetic_label_noise_matches_synth_and_keeps_the_masks_true(tmp_path):
    out = tmp_path / "data"
    ok("synth", out, "--n-train", 20, "--n-val", 2, "--image-size", 32, "--label-noise", 0.1, "--seed", 1)
    with open(out / "corrupted.csv") as fh:
        written = {r["id"]: r["noisy_labels"] for r in csv.DictReader(fh)}
    noisy = SyntheticDataset(n_train=20, n_val=2, size=32, seed=1, label_noise=0.1)
    clean = SyntheticDataset(n_train=20, n_val=2, size=32, seed=1)
    assert noisy.known_mislabelled() == set(written) and len(written) == 2 and clean.known_mislabelled() is None
    for image_id in noisy.ids("train") + noisy.ids("val"):
        sample, truth = noisy.load(image_id), clean.load(image_id)
        assert np.array_equal(sample.labels, noisy.labels(image_id))
        assert np.array_equal(sample.mask, truth.mask) and np.array_equal(noisy.true_labels(image_id), truth.labels)
        if image_id in written:
            assert " ".join(noisy.classes[k - 1] for k in sample.labels) == written[image_id]
            assert not np.array_equal(sample.labels, truth.labels)
        else:
            assert np.array_equal(sample.labels, truth.labels)
    with pytest.raises(UsageError, match="noise_kind"):
        SyntheticDataset(n_train=4, n_val=2, size=32, noise_kind="flip")


@pytest.mark.slow
def test_damaged_scores_relabelled_and_truth_files_are_one_line_errors(influenced, tmp_path):
    ws = _copy(influenced, tmp_path / "ws")
    path = ws.influence_dir("train") / influence_io.SCORES_NAME
    good = path.read_text()
    lines = good.splitlines()
    first = lines[1].split(",")
    for column, value, message in (
        (1, "0", "class indices 1..5"),
        (1, "2 x", "class indices 1..5"),
        (6, "9", "class indices 1..5"),
        (5, "nan", "weight nan"),
        (5, "-1", "weight -1"),
    ):
        row = list(first)
        row[column] = value
        path.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
        assert_error(igcam("influence-report", "-w", ws.root), 4, f"{path}, line 2", message)
    path.write_text("id,score\nx,1\n")
    assert_error(igcam("influence-report", "-w", ws.root), 4, "no column labels")
    path.write_text(good)

    relabelled = ws.cls_round_dir(2) / influence_io.RELABELLED_NAME
    relabelled.parent.mkdir(parents=True)
    relabelled.write_text("id,labels,trained_labels\ntrain_00000,1,6\n")
    with pytest.raises(BadData, match="line 2: '6' is not a list of class indices 1..5"):
        influence_io.read_relabelled(relabelled, 5)

    truth = tmp_path / "truth.txt"
    truth.write_bytes(b"\xff\xfe\x00bad")
    assert_error(igcam("influence-report", "-w", ws.root, "--truth", truth), 4, "cannot read the list of corrupted ids")
    truth.write_text("val_00000\n")
    assert_error(igcam("influence-report", "-w", ws.root, "--truth", truth), 4, "names none of the 8 images")


@pytest.mark.parametrize("full_layer4", [False, True])
def test_influence_logits_split_the_forward_pass_without_changing_it(full_layer4):
    from igcam_cli.models.classifier import CamClassifier

    model = CamClassifier("resnet18", 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        split = compute_influence.influence_logits(model, torch.device("cpu"), full_layer4)(x)
        torch.testing.assert_close(split, model(x)[0])
