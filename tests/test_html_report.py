"""`igcam report`: one self-contained HTML page of a workspace, built here without training (maps and labels are
written straight into the stores), and rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_error, igcam, make_workspace, ok
from igcam_cli.config import EvaluateConfig, RunOptions
from igcam_cli.html_report import write_report
from igcam_cli.stages import evaluate
from igcam_cli.workspace import Workspace

OPTS = RunOptions(device="cpu", quiet=True)
N_TRAIN, REFINED = 8, 3  # every train image has CAMs, pseudo-labels and GT; the first REFINED have refined maps
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _maps(sample) -> np.ndarray:
    return np.stack([np.where(sample.mask == c, 0.6, 0.1) for c in sample.labels]).astype(np.float32)


def _fill(ws: Workspace) -> None:
    """CAMs and pseudo-labels (the GT) of every train image, refined maps of a few; cams and crf evaluated."""
    dataset = ws.dataset()
    ids = dataset.ids("train")
    with ws.maps("cams", "train").writer(source="make-cams") as writer:
        for image_id in ids:
            sample = dataset.load(image_id)
            writer.write(image_id, _maps(sample), sample.labels.astype(np.uint8))
            ws.pseudo("train").write(image_id, sample.mask)
    with ws.maps("refined", "train").writer(source="refine") as writer:
        for image_id in ids[:REFINED]:
            sample = dataset.load(image_id)
            writer.write(image_id, _maps(sample), sample.labels.astype(np.uint8))
    for artifact in ("cams", "crf"):
        evaluate.run(EvaluateConfig(artifact=artifact, split="train"), ws, OPTS)


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Path:
    """A workspace with maps, labels and two evaluations, nothing trained. Do not modify: copy it."""
    ws = make_workspace(tmp_path_factory.mktemp("report") / "ws", n_train=N_TRAIN, n_val=4, size=48)
    _fill(ws)
    return ws.root


@pytest.fixture
def ws(filled, tmp_path) -> Workspace:
    return Workspace.open(Path(shutil.copytree(filled, tmp_path / "ws")))


@pytest.fixture(scope="module")
def page(filled, tmp_path_factory) -> str:
    out = write_report(Workspace.open(filled), out=tmp_path_factory.mktemp("page") / "index.html")
    return out.read_text()


def _eval_json(ws: Workspace, name: str) -> dict:
    return json.loads(ws.path("eval", f"{name}.json").read_text())


def test_written_where_asked(ws, tmp_path):
    assert write_report(ws) == ws.path("report", "index.html")
    elsewhere = write_report(ws, out=tmp_path / "out" / "page.html")
    assert elsewhere.is_file() and elsewhere.read_text().startswith("<!DOCTYPE html>")
    assert write_report(ws, out=tmp_path / "out") == tmp_path / "out" / "index.html"


def test_self_contained(page):
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for external in ('src="http', "href=", "<link", "<script", "url(", "@import"):
        assert external not in page, external
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_contact_sheet_cells(page):
    """One picture per image and artifact it has (CAM, pseudo-label, GT for all; refined for a few)."""
    (train,) = re.findall(r'<table class="sheet" data-split="train">.*?</table>', page)
    assert train.count('<tr class="image">') == N_TRAIN
    assert train.count("<img") == N_TRAIN * 4 + REFINED
    assert train.count('<td class="none">-</td>') == N_TRAIN - REFINED  # refined maps missing
    assert 'data-split="val"' not in page  # no artifact of val
    for column in ("image", "CAM", "refined", "pseudo-label", "ground truth"):
        assert f"<th>{column}</th>" in train
    assert "<th>prediction</th>" not in train


def test_sample_is_seeded(filled, tmp_path):
    ws = Workspace.open(filled)

    def rows(seed: int) -> list[str]:
        text = write_report(ws, out=tmp_path / f"{seed}.html", sample=3, seed=seed).read_text()
        return re.findall(r'<tr class="image"><th>([^<]*)</th>', text)

    assert len(rows(0)) == 3 and rows(0) == rows(0)
    assert set(rows(0)) <= set(ws.dataset().ids("train"))


def test_charts_and_honest_headlines(filled, page):
    ws = Workspace.open(filled)
    cams, crf = _eval_json(ws, "cams-train"), _eval_json(ws, "crf-train")
    articles = dict(re.findall(r'<article class="eval" data-file="eval/([^"]+)\.json">(.*?)</article>', page))
    assert list(articles) == ["cams-train", "crf-train"]
    for name, result in (("cams-train", cams), ("crf-train", crf)):
        assert articles[name].count('<rect class="bar"') == len(result["per_class"])
        assert evaluate.describe(result).replace("'", "&#x27;") in articles[name]  # split, GT, CRF, threshold
    curve = re.findall(r'<polyline class="curve" points="([^"]*)"', articles["cams-train"])
    assert len(curve) == 1 and len(curve[0].split()) == len(cams["threshold_curve"]["tau"])
    assert '<line class="mark fixed"' in articles["cams-train"] and '<line class="mark best"' in articles["cams-train"]
    assert f"fixed threshold τ {cams['fixed_tau']:.2f}" in articles["cams-train"]
    assert "tuned on split &#x27;train&#x27; (the scored split)" in articles["cams-train"]
    assert "<polyline" not in articles["crf-train"]  # labels have no threshold


def test_banner_only_with_oracle_or_upper_bound(ws, page):
    assert 'id="banner"' not in page
    ws.start("refine", {"guidance": "gt"}, split="train", oracle=True).finish()
    text = write_report(ws).read_text()
    (banner,) = re.findall(r'<section class="banner" id="banner">.*?</section>', text)
    assert "ORACLE: refine on split &#x27;train&#x27;" in banner and "UPPER BOUND" not in banner

    seg = {**_eval_json(ws, "crf-train"), "artifact": "seg", "upper_bound": True}
    ws.path("eval", "seg-train.json").write_text(json.dumps(seg))
    assert "UPPER BOUND: eval/seg-train.json" in write_report(ws).read_text()


def test_provenance_rows_stale_and_escaped(ws):
    cams = ws.start("make-cams", {"scales": [1.0]}, split="train")
    cams.finish()
    ws.start(
        "refine", {"note": "<script>alert(1)</script>"}, split="train", inputs={"make-cams:train": cams.id}
    ).finish()
    ws.start("make-cams", {"scales": [1.0, 0.5]}, split="train").finish()  # refine's input ran again: stale
    text = write_report(ws).read_text()
    assert len(re.findall(r'<tr class="run[ "]', text)) == len(ws.records())
    assert len(re.findall(r'<tr class="run stale"', text)) == 1
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<details><summary>" in text and cams.id in text


def test_a_run_whose_process_is_gone_shows_as_killed(ws):
    """As `igcam status` says: marked running, but its process on this host no longer exists."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    ws.start("crf", {}, split="train")
    manifest = json.loads(ws.manifest_path.read_text())
    manifest["runs"][-1]["pid"] = gone.pid
    ws.manifest_path.write_text(json.dumps(manifest))
    text = write_report(ws).read_text()
    assert f'<span class="status killed" title="process {gone.pid} is gone">killed</span>' in text


def test_a_run_lists_the_images_it_skipped_as_unreadable(ws):
    ws.start("make-cams", {}, split="train").finish(
        metrics={"images": 3, "skipped": 1}, skipped={"img_<7>": "cannot read image img_<7>.jpg: truncated"}
    )
    text = write_report(ws).read_text()
    assert "skipped as unreadable (1)" in text
    assert "<th>img_&lt;7&gt;</th><td>cannot read image img_&lt;7&gt;.jpg: truncated</td>" in text


@pytest.mark.parametrize(
    "content, reason",
    [("{not json", "JSONDecodeError"), ('{"artifact": "cams"}', "KeyError"), ("[1, 2]", "a JSON object")],
)
def test_damaged_eval_is_one_line(ws, content, reason):
    ws.path("eval", "cams-train.json").write_text(content)
    text = write_report(ws).read_text()
    (notice,) = re.findall(r'<p class="notice error">([^<]*)</p>', text)
    assert notice.startswith("could not read eval/cams-train.json: ") and reason in notice
    assert 'data-file="eval/crf-train.json"' in text  # the others still render


def test_ablation_and_influence_sections(ws):
    scored = {"artifact": "cams", "miou": 0.4, "threshold": 0.3, "threshold_tuned_on": "train", "crf": False}
    maps = {
        **scored,
        "oracle": False,
        "gt_source": "synthetic",
        "n_images": 8,
        "fixed_tau": 0.15,
        "miou_fixed_tau": 0.35,
    }
    ablation = {"split": "train", "rows": [{"variant": "CAM", "maps": maps, "crf": {**scored, "miou": 0.6}}]}
    ws.path("eval", "ablation-train.json").write_text(json.dumps(ablation))
    row = {"rank": 1, "id": "train_00003", "labels": ["ambra"], "suggested": ["brio"], "atypicality": 4.2}
    influence = {"split": "train", "n_images": 8, "n_suggested": 1, "classifier_fit": None, "rows": [row]}
    ws.path("eval", "influence-train.json").write_text(
        json.dumps({**influence, "auroc": 0.9, "auroc_loss": 0.8, "n_mislabelled": 1})
    )
    text = write_report(ws).read_text()
    assert "<td>CAM</td><td>35.0 (τ 0.15)</td><td>40.0 (τ 0.30)</td><td>60.0</td>" in text
    assert "<td>train_00003</td><td>ambra</td><td>brio</td><td>4.20</td>" in text
    assert "AUROC 0.900" in text
    assert "ablation-train" not in re.sub(r'<section id="ablation">.*?</section>', "", text)  # not an artifact eval


def test_empty_workspace_renders(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=2, size=32)
    text = write_report(ws).read_text()
    assert text.rstrip().endswith("</html>") and "<img" not in text and "<svg" not in text
    assert "not run yet: no CAMs" in text and "no stage has run yet" in text
    assert "igcam evaluate -w" in text


def test_cli(filled, tmp_path):
    out = tmp_path / "page" / "index.html"
    result = ok("report", "-w", filled, "--sample", "2", "--out", out, "--quiet")
    assert result.stdout.strip() == str(out)
    assert out.read_text().count('<tr class="image">') == 2
    assert_error(igcam("report", "-w", tmp_path / "nowhere"), 3, "not an igcam workspace")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (.ci/run installs it)")
def test_renders_in_headless_chromium(filled, tmp_path):
    out = write_report(Workspace.open(filled), out=tmp_path / "index.html")
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        out.as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    for heading in ("igcam report", "Pictures", "Evaluation", "Provenance"):
        assert re.search(rf"<h[12]>{heading}</h[12]>", dom), heading
    assert dom.count("<img") == N_TRAIN * 4 + REFINED
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', dom)) == N_TRAIN * 4 + REFINED
    assert dom.count("<svg") == 3  # two bar charts, one threshold curve
    assert dom.count('<rect class="bar"') == 2 * (len(Workspace.open(filled).dataset().classes) + 1)
    assert dom.count("<polyline") == 1
