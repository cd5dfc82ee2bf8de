"""compute-influence: influence of each training image on the classifier (docs/METHOD.md §2), sharded.

Four passes over the data (core/influence.py); curvature statistics are sums over images, so each
shard writes its own sums and every shard fits the same preconditioner from their total:

1. factors: K-FAC factor sums of this shard's training images + per-class query gradient sums of
   this shard's query images -> ``stats-factors-r{i}-of-{n}.pt``
2. lambda (EK-FAC only, after all shards did 1): eigenvalue sums in the summed factors' basis
   -> ``stats-lambda-r{i}-of-{n}.pt``
3. (after all shards did 2) preconditioner from the total; the query gradients preconditioned
4. scores: self-influence, per-class influence and spatial maps of this shard's images -> parts;
   the shard that completes the split writes ``scores.csv`` (atypicality and sample weights need
   every image).

A shard whose partners have not finished a reduction either waits (``--wait``, automatic under
torchrun) or stops after writing its own statistics; rerunning it continues. Finished images and
statistics are never recomputed unless --force. Files written with other settings or another
classifier are refused (own shard) or ignored (other shards).
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from igcam_cli import influence_io as io
from igcam_cli import map_stage
from igcam_cli.config import ComputeInfluenceConfig, RunOptions, to_dict
from igcam_cli.core import influence as inf
from igcam_cli.core.metrics import image_prior_losses, learned_fractions
from igcam_cli.data.base import Dataset
from igcam_cli.data.transforms import multi_hot, normalize, resize_long
from igcam_cli.errors import BadData, UsageError
from igcam_cli.models.classifier import CamClassifier, load_checkpoint
from igcam_cli.runtime.batching import image_loader, same_size_batches
from igcam_cli.runtime.devices import autocast, describe, memory_format, place_model, resolve_device
from igcam_cli.runtime.distributed import Shard, local_device
from igcam_cli.runtime.progress import StageLog
from igcam_cli.store import MapStore
from igcam_cli.workspace import Workspace, classifier_key

STAGE = "compute-influence"
WAIT_POLL_S = 5.0


@dataclass
class _Item:
    id: str
    image: torch.Tensor  # 3 x h x w, normalised
    target: torch.Tensor  # C multi-hot
    size: tuple[int, int]  # original H, W


class _Images(TorchDataset):
    """Images, long side at `size`, or (size 0) at their own size times `scale` (the classifier's input_scale)."""

    def __init__(self, dataset: Dataset, ids: list[str], size: int, scale: float):
        self.dataset, self.ids, self.size, self.scale = dataset, ids, size, scale

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> _Item:
        sample = self.dataset.load(self.ids[index], with_mask=False)
        size = self.size or (round(max(sample.image.shape[:2]) * self.scale) if self.scale != 1 else 0)
        image = resize_long(sample.image, size) if size else sample.image
        return _Item(
            sample.id,
            normalize(image),
            multi_hot(sample.labels, self.dataset.num_classes),
            tuple(sample.image.shape[:2]),
        )


@dataclass
class _Context:
    cfg: ComputeInfluenceConfig
    model: CamClassifier
    layers: dict
    device: torch.device
    dataset: Dataset
    key: str
    directory: Path
    shard: Shard
    log: StageLog
    seed: int
    files: io.StateFiles


def run(
    cfg: ComputeInfluenceConfig,
    ws: Workspace,
    opts: RunOptions,
    shard: Shard = Shard(),
    force: bool = False,
    wait: bool = False,
    wait_timeout_s: float = 24 * 3600.0,
) -> dict:
    """Runs every pass this shard can; returns {"phase": "done" | "waiting", "scored": n}."""
    log = StageLog(ws.log_path(STAGE), quiet=opts.quiet)
    dataset = ws.dataset()
    cfg = resolve(cfg, dataset)
    ids, query_ids = dataset.ids(cfg.split), dataset.ids(cfg.query_split)
    if not ids:
        raise BadData(f"split '{cfg.split}' has no images")
    model_path, round_ = ws.cls_model(cfg.round)
    model = load_checkpoint(model_path, ws.cls_command(round_), dataset.num_classes)
    device = local_device(resolve_device(opts.device))
    place_model(model, device).eval()
    try:
        layers = inf.tracked_layers(model, _scope(cfg.scope))
    except ValueError as exc:
        raise UsageError(f"--scope {cfg.scope}: {exc}") from None
    model_sha = _sha256(model_path)
    key = _key(cfg, model_sha, ids, query_ids, shard.count)
    directory = ws.influence_dir(cfg.split)
    store = MapStore(directory)
    if force:
        _clear_statistics(directory, shard)
    cls_record = ws.classifier_run(round_)
    inputs = {classifier_key(round_): cls_record["id"] if cls_record else None}
    job = map_stage.prepare(ws, STAGE, cfg, store, cfg.split, ids, shard, force, inputs, log, f"influence/{cfg.split}")
    old = store.attrs.get("model_sha256")
    if len(store) and old and old != model_sha:
        raise UsageError(f"influence/{cfg.split} was computed with another classifier; pass --force to redo it")
    files = io.StateFiles(key)
    for phase in ("factors", "lambda"):
        own = io.stats_path(directory, phase, shard.index, shard.count)
        if own.is_file() and files.key_of(own) != key:
            raise UsageError(f"{own} was computed with other settings or another classifier; pass --force to redo it")

    classifier = {
        "round": round_,
        "path": str(model_path.relative_to(ws.root)),
        "run": (cls_record or {}).get("id"),
        "sha256": model_sha,
    }
    record = job.start(describe(device), classifier=classifier)
    log(
        f"{STAGE} '{cfg.split}' shard {shard}: classifier round {round_} ({model_path}), hessian {cfg.hessian}, "
        f"damping {cfg.damping} ({cfg.damping_mode}), {len(layers)} tracked layers ({cfg.scope}), "
        f"queries '{cfg.query_split}' ({len(query_ids)} images), device {device}"
    )
    ctx = _Context(cfg, model, layers, device, dataset, key, directory, shard, log, opts.seed, files)
    with record:
        result = _passes(ctx, ids, query_ids, store, model_sha, wait, wait_timeout_s)
        complete = store.ids() >= set(ids)
        fit = _write_scores(ctx, store, ids) if complete and result["phase"] == "done" else None
        job.finish(split_images=len(ids), phase=result["phase"], **({"fit": fit} if fit else {}))
    if result["phase"] == "waiting":
        log(
            f"shard {shard}: {result['missing']} of {shard.count} shards still lack '{result['stage']}' statistics; "
            "rerun this command when they are done (or pass --wait)"
        )
    elif complete:
        log(f"wrote {directory / io.SCORES_NAME}")
    return result


# ---- the passes ------------------------------------------------------------------------------


def _passes(
    ctx: _Context, ids: list[str], query_ids: list[str], store: MapStore, model_sha: str, wait: bool, timeout: float
) -> dict:
    cfg, shard, directory = ctx.cfg, ctx.shard, ctx.directory
    own = io.stats_path(directory, "factors", shard.index, shard.count)
    if ctx.files.load(own) is None:
        factors, queries = _factor_pass(ctx, shard.select(ids), shard.select(query_ids))
        io.save_state(own, ctx.key, {"factors": factors.to_state(), "queries": queries.to_state()})
    states = _gather(ctx, "factors", wait, timeout)
    if states is None:
        return _waiting(ctx, "factors")
    queries = inf.QueryStats.merge(inf.QueryStats.from_state(s["queries"]) for s in states)
    eigen = None
    if cfg.hessian != "none":
        eigen = _eigen(ctx, states)
    eigenvalues = None
    if cfg.hessian == "ekfac" and eigen is not None:  # ekfac always has eigen
        own = io.stats_path(directory, "lambda", shard.index, shard.count)
        if ctx.files.load(own) is None:
            lam = _lambda_pass(ctx, eigen, shard.select(ids))
            io.save_state(own, ctx.key, {"lambda": lam.to_state()})
        lam_states = _gather(ctx, "lambda", wait, timeout)
        if lam_states is None:
            return _waiting(ctx, "lambda")
        eigenvalues = inf.EigenvalueStats.merge(
            inf.EigenvalueStats.from_state(s["lambda"]) for s in lam_states
        ).finalize()
    pre = _preconditioner(ctx, eigen, eigenvalues).to(ctx.device)
    class_queries = pre.precondition({n: q.to(ctx.device) for n, q in queries.finalize().items()})
    done = store.ids()
    todo = [i for i in shard.select(ids) if i not in done]
    ctx.log(f"scores: {len(todo)} images to do, {len(shard.select(ids)) - len(todo)} already done")
    with store.writer(
        rank=shard.index, source=STAGE, attrs={"model_sha256": model_sha, "hessian": cfg.hessian}
    ) as writer:
        for batch in _batches(ctx, todo, "scores"):
            _score(ctx, pre, class_queries, batch, writer)
    return {"phase": "done", "scored": len(todo)}


def _factor_pass(ctx: _Context, ids: list[str], query_ids: list[str]) -> tuple[inf.FactorStats, inf.QueryStats]:
    factors, queries = inf.FactorStats(), inf.QueryStats()
    if ctx.cfg.hessian != "none":
        for batch in _batches(ctx, ids, "factors"):
            x, y = _stack(ctx, batch)
            factors = factors + inf.covariance_stats(
                ctx.model,
                ctx.layers,
                x,
                y,
                fisher=ctx.cfg.fisher,
                generator=_generator(ctx, batch, 1),
                logits_fn=_logits_fn(ctx),
            )
    for batch in _batches(ctx, query_ids, "queries"):
        x, y = _stack(ctx, batch)
        queries = queries + inf.query_stats(ctx.model, ctx.layers, x, y, logits_fn=_logits_fn(ctx))
    return factors.to("cpu"), queries.to("cpu")


def _lambda_pass(ctx: _Context, eigen: inf.KroneckerEigen, ids: list[str]) -> inf.EigenvalueStats:
    total = inf.EigenvalueStats()
    eigen = eigen.to(ctx.device)
    for batch in _batches(ctx, ids, "eigenvalues"):
        x, y = _stack(ctx, batch)
        total = total + inf.eigenvalue_stats(
            ctx.model,
            ctx.layers,
            eigen,
            x,
            y,
            fisher=ctx.cfg.fisher,
            generator=_generator(ctx, batch, 2),
            logits_fn=_logits_fn(ctx),
        )
    return total.to("cpu")


def _eigen(ctx: _Context, states: list[dict]) -> inf.KroneckerEigen:
    """The summed factors' eigendecompositions, computed once and kept in eigen.pt."""
    path = ctx.directory / io.EIGEN_NAME
    saved = io.load_state(path, ctx.key)
    if saved is not None:
        return inf.KroneckerEigen.from_state(saved["eigen"])
    ctx.log("eigendecomposition of the summed K-FAC factors")
    factors = inf.FactorStats.merge(inf.FactorStats.from_state(s["factors"]) for s in states)
    eigen = factors.finalize()
    io.save_state(path, ctx.key, {"eigen": eigen.to_state()})
    return eigen


def _preconditioner(ctx: _Context, eigen, eigenvalues) -> inf.Preconditioner:
    cfg = ctx.cfg  # config.build checked every value fit_preconditioner refuses
    return inf.fit_preconditioner(cfg.hessian, eigen, eigenvalues, damping=cfg.damping, damping_mode=cfg.damping_mode)


def _score(ctx: _Context, pre: inf.Preconditioner, queries: dict, batch: list[_Item], writer) -> None:
    x, y = _stack(ctx, batch)
    out = inf.score_batch(ctx.model, ctx.layers, pre, queries, x, y, maps=ctx.cfg.maps, logits_fn=_logits_fn(ctx))
    self_inf, per_class, loss, probs = (
        t.double().cpu().numpy() for t in (out.self_influence, out.per_class, out.loss, out.probs)
    )
    maps = out.maps.double().cpu().numpy() if out.maps is not None else None
    for b, item in enumerate(batch):
        labels = (torch.nonzero(item.target).flatten() + 1).numpy().astype(np.uint8)
        if maps is None:
            classes, item_maps = np.zeros(0, np.uint8), np.zeros((0, 1, 1))
        else:
            classes = labels if ctx.cfg.maps == "labelled" else np.arange(1, maps.shape[1] + 1, dtype=np.uint8)
            item_maps = maps[b, classes.astype(np.int64) - 1]
        peak = np.abs(item_maps).reshape(len(classes), -1).max(axis=1) if len(classes) else np.zeros(0)
        scale = np.where(peak > 0, peak, 1.0)
        writer.write(
            item.id,
            (item_maps / scale.reshape(-1, 1, 1)).astype(np.float32),
            classes,
            self_influence=float(self_inf[b]),
            loss=float(loss[b]),
            per_class=per_class[b],
            labels=labels,
            probs=probs[b],
            map_scale=scale,
            image_height=item.size[0],
            image_width=item.size[1],
        )


def _write_scores(ctx: _Context, store: MapStore, ids: list[str]) -> dict:
    cfg = ctx.cfg
    attrs = dict(store.iter_attrs(ids))
    self_inf = torch.tensor([float(attrs[i]["self_influence"]) for i in ids], dtype=torch.float64)
    atyp = inf.atypicality(self_inf)
    labels = torch.zeros(len(ids), ctx.dataset.num_classes, dtype=torch.bool)
    for k, i in enumerate(ids):
        labels[k, torch.as_tensor(np.atleast_1d(attrs[i]["labels"]).astype(np.int64) - 1)] = True
    if all("probs" in attrs[i] for i in ids):
        probs = torch.tensor(np.stack([np.asarray(attrs[i]["probs"], dtype=np.float64) for i in ids]))
        suggested = inf.suggest_labels(
            labels, probs, atyp, cfg.relabel_threshold, cfg.relabel_confidence, cfg.relabel_drop_below
        )
    else:
        ctx.log(
            "note: these influence parts predate label suggestions (no classifier scores stored); "
            "rerun with --force for them"
        )
        suggested = labels
    losses = np.array([float(attrs[i]["loss"]) for i in ids])
    fit = _fit(cfg, losses, labels.numpy(), int((suggested != labels).any(dim=1).sum()))
    if fit["suggestions_suppressed"]:
        suggested = labels
    relabelled = (suggested != labels).any(dim=1)
    weights = inf.damp_weights(
        inf.sample_weights(
            atyp, w_min=cfg.w_min, w_max=cfg.w_max, threshold=cfg.w_threshold, temperature=cfg.w_temperature
        ).double(),
        fit["trust"],
    )

    def text(row: torch.Tensor) -> str:
        return " ".join(str(int(c) + 1) for c in torch.nonzero(row).flatten())

    rows = [
        io.ImageScore(
            i,
            text(labels[k]),
            float(attrs[i]["loss"]),
            float(self_inf[k]),
            float(atyp[k]),
            float(weights[k]),
            text(suggested[k]),
        )
        for k, i in enumerate(ids)
    ]
    (ctx.directory / io.FIT_NAME).unlink(missing_ok=True)  # never beside scores.csv of another run
    io.write_scores(ctx.directory, rows)
    io.write_fit(ctx.directory, fit)
    ctx.log(io.describe_fit(fit, cfg.split))
    low = int((weights < 1).sum())
    ctx.log(
        f"sample weights: mean {float(weights.mean()):.3f}, {low} images below 1, min {float(weights.min()):.3f}; "
        f"{int(relabelled.sum())} images with suggested labels"
    )
    return fit


def _fit(cfg: ComputeInfluenceConfig, losses: np.ndarray, labels: np.ndarray, would_suggest: int) -> dict:
    """The guard. Atypicality ranks images by how much the classifier needs each one, which means
    something only when the classifier has learned the labels. g is the median over the split of
    1 - (image's loss in the scoring pass) / (its loss under the class-prior predictor): 0 = no
    better than the label frequencies. The median, not the mean loss: the mislabelled images a
    well-learned classifier contradicts carry huge losses (the demo's 12-epoch classifier scored
    against its labels with 10 % of them swapped: 1 - mean loss / prior 0.87 -> 0.31, the median
    0.96 -> 0.95). Weights act with
    trust = fit_trust(g, learned_low, learned_high), w -> 1 + trust (w - 1); labels are suggested
    only from g >= learned_high. Defaults 0.3 and 0.65 (config.py says what they were measured on): on the
    demo's data (clean labels) its 12-epoch classifier has g = 0.96 (1 suggestion), a 3-epoch one g = 0.57
    and 10 suggestions, all wrong; a classifier whose loss is barely below the prior's sits near 0."""
    image_prior = image_prior_losses(labels)
    g = float(np.median(learned_fractions(losses, labels)))
    suppressed = g < cfg.learned_high
    return {
        "learned_fraction": g,
        "prior_loss": float(image_prior.mean()),
        "mean_loss": float(losses.mean()),
        "trust": inf.fit_trust(g, cfg.learned_low, cfg.learned_high),
        "learned_low": cfg.learned_low,
        "learned_high": cfg.learned_high,
        "suggestions_suppressed": suppressed,
        "suggestions_withheld": would_suggest if suppressed else 0,
    }


# ---- reductions across shards --------------------------------------------------------------


def _gather(ctx: _Context, phase: str, wait: bool, timeout: float) -> list[dict] | None:
    """Every shard's saved state of `phase` in rank order, or None (not all there, not waiting)."""
    start = time.time()
    announced = False
    while True:
        paths = [io.stats_path(ctx.directory, phase, r, ctx.shard.count) for r in range(ctx.shard.count)]
        states = [ctx.files.load(p) for p in paths]
        loaded = [s for s in states if s is not None]
        if len(loaded) == len(states):
            ctx.files.forget()
            return loaded
        if not wait:
            return None
        if time.time() - start > timeout:
            raise UsageError(f"--wait: shards' '{phase}' statistics did not all appear within {timeout:.0f} s")
        if not announced:
            ctx.log(f"waiting for {sum(s is None for s in states)} shard(s) to finish their '{phase}' statistics")
            announced = True
        time.sleep(WAIT_POLL_S)


def _waiting(ctx: _Context, phase: str) -> dict:
    paths = [io.stats_path(ctx.directory, phase, r, ctx.shard.count) for r in range(ctx.shard.count)]
    missing = sum(ctx.files.load(p) is None for p in paths)
    return {"phase": "waiting", "stage": phase, "missing": missing, "scored": 0}


def _clear_statistics(directory: Path, shard: Shard) -> None:
    """--force, besides this shard's parts (map_stage.prepare): its statistics, and what is fitted from
    everyone's statistics."""
    paths = [io.stats_path(directory, phase, shard.index, shard.count) for phase in ("factors", "lambda")]
    if shard.count == 1:
        paths += directory.glob("stats-*.pt")
    for path in [*paths, directory / io.EIGEN_NAME, directory / io.SCORES_NAME, directory / io.FIT_NAME]:
        path.unlink(missing_ok=True)


# ---- helpers -------------------------------------------------------------------------------


def resolve(cfg: ComputeInfluenceConfig, dataset: Dataset) -> ComputeInfluenceConfig:
    """The config as the stage runs (and records) it: `query_split` None becomes the split it means."""
    for split in (cfg.split, cfg.query_split):
        if split is not None and split not in dataset.splits():
            raise BadData(f"dataset has no split '{split}' (splits: {', '.join(dataset.splits())})")
    if cfg.query_split is None:
        query = "val" if "val" in dataset.splits() and cfg.split != "val" and dataset.ids("val") else cfg.split
        cfg = replace(cfg, query_split=query)
    return cfg


def _scope(text: str):
    return text if text in ("last_block", "layer4") else [part.strip() for part in text.split(",") if part.strip()]


def _key(cfg: ComputeInfluenceConfig, model_sha: str, ids: list[str], query_ids: list[str], count: int) -> str:
    relevant = {k: v for k, v in to_dict(cfg).items() if k not in cfg.NOT_IN_RESULTS}
    text = json.dumps(
        {"cfg": relevant, "model": model_sha, "ids": ids, "queries": query_ids, "shards": count}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _batches(ctx: _Context, ids: list[str], what: str):
    loader = image_loader(
        _Images(ctx.dataset, ids, ctx.cfg.size, ctx.model.input_scale), ctx.cfg.batch_size, ctx.cfg.workers, ctx.device
    )
    batches = same_size_batches(loader, ctx.cfg.batch_size, lambda item: tuple(item.image.shape))
    return ctx.log.track(batches, total=-(-len(ids) // ctx.cfg.batch_size), description=what, unit="batch")


def _stack(ctx: _Context, batch: list[_Item]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([item.image for item in batch]).to(ctx.device, memory_format=memory_format(ctx.device))
    return x, torch.stack([item.target for item in batch]).to(ctx.device)


def _generator(ctx: _Context, batch: list[_Item], phase: int) -> torch.Generator | None:
    """Labels drawn for fisher=sampled depend on the seed, the pass and the batch's ids only."""
    if ctx.cfg.fisher != "sampled":
        return None
    seed = zlib.crc32(("\n".join(item.id for item in batch)).encode()) ^ (ctx.seed * 1000003 + phase)
    return torch.Generator(device=ctx.device).manual_seed(seed & 0x7FFFFFFF)


def _logits_fn(ctx: _Context):
    return influence_logits(ctx.model, ctx.device, full_layer4=ctx.cfg.scope == "layer4")


def influence_logits(model: CamClassifier, device: torch.device, full_layer4: bool = False):
    """The trunk under autocast (bf16 on CUDA); the tracked part (layer4 or its last block) and the
    head in float32, so the per-sample gradients and curvature are not bf16."""
    tail_blocks = len(model.backbone.layer4) if full_layer4 else 1

    def logits(x: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            h = model.trunk(x, tail_blocks)
        return model.head(model.tail(h.float(), tail_blocks)).mean(dim=(2, 3))

    return logits
