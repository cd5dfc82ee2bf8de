"""Influence throughput: images per second of each compute-influence pass, against a plain
forward + backward of the same model on the same batches, measured in the same run.

    python benchmarks/influence.py                      # CPU: ResNet-18, 128 px, 5 classes (small)
    python benchmarks/influence.py --device cuda        # GPU: ResNet-50, 448 px, 20 classes (VOC-like)

Passes (core/influence.py; the stage runs them in this order): factors (K-FAC covariances, exact
GGN with one backward seed per class), eigendecomposition (once), lambda (EK-FAC eigenvalues),
queries (per-class query gradients), scores (self-influence + per-class influence + spatial maps of
the labelled classes). Goal on one GPU: 10,000 training images in under 3 minutes.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from igcam_cli.core import influence as inf
from igcam_cli.models.classifier import CamClassifier
from igcam_cli.runtime.devices import autocast, memory_format, resolve_device
from igcam_cli.stages.compute_influence import influence_logits


def timed(fn, device, repeats: int = 1) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None, help="timed batches per pass")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--scope", default="last_block")
    parser.add_argument("--hessian", default="ekfac", choices=("ekfac", "kfac", "none"))
    parser.add_argument("--target", type=int, default=10_000, help="images for the time estimate")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    backbone = args.backbone or ("resnet50" if gpu else "resnet18")
    size = args.size or (448 if gpu else 128)
    classes = args.classes or (20 if gpu else 5)
    batch = args.batch or (32 if gpu else 8)
    batches = args.batches or (8 if gpu else 2)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    model = CamClassifier(backbone, classes).to(device, memory_format=memory_format(device)).eval()
    layers = inf.tracked_layers(model, args.scope)
    logits_fn = influence_logits(model, device, full_layer4=args.scope == "layer4")
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batches):
        x = torch.randn(batch, 3, size, size, generator=gen).to(device, memory_format=memory_format(device))
        y = (torch.rand(batch, classes, generator=gen) < 2.0 / classes).float()
        y[torch.arange(batch), torch.randint(0, classes, (batch,), generator=gen)] = 1.0  # >= 1 label each
        data.append((x, y.to(device)))
    n = batch * batches
    print(
        f"{backbone} at {size} px, {classes} classes, batch {batch}, {n} images per pass, "
        f"{len(layers)} tracked layers ({args.scope}), hessian {args.hessian}, device {device}"
    )

    def baseline():
        for x, y in data:
            model.zero_grad(set_to_none=True)
            with autocast(device):
                logits = model(x)[0]
            F.multilabel_soft_margin_loss(logits.float(), y).backward()

    state = {}

    def factors():
        state["factors"] = sum(inf.covariance_stats(model, layers, x, y, logits_fn=logits_fn) for x, y in data)

    def eigen():
        state["eigen"] = state["factors"].finalize()

    def lam():
        state["lambda"] = sum(
            inf.eigenvalue_stats(model, layers, state["eigen"], x, y, logits_fn=logits_fn) for x, y in data
        ).finalize()

    def queries():
        state["queries"] = sum(inf.query_stats(model, layers, x, y, logits_fn=logits_fn) for x, y in data)

    def precondition():
        pre = inf.fit_preconditioner(args.hessian, state.get("eigen"), state.get("lambda"))
        state["pre"], state["vt"] = pre, pre.precondition(state["queries"].finalize())

    def scores():
        for x, y in data:
            inf.score_batch(model, layers, state["pre"], state["vt"], x, y, maps="labelled", logits_fn=logits_fn)

    baseline()  # warm-up (cuDNN autotuning, allocations)
    t_base = timed(baseline, device)
    phases = [
        ("factors", factors),
        ("eigendecomposition (once)", eigen),
        ("lambda", lam),
        ("queries", queries),
        ("preconditioner (once)", precondition),
        ("scores + maps", scores),
    ]
    if args.hessian == "none":
        phases = [p for p in phases if p[0] in ("queries", "preconditioner (once)", "scores + maps")]
    elif args.hessian == "kfac":
        phases = [p for p in phases if p[0] != "lambda"]
    times = {}
    for name, fn in phases:
        times[name] = timed(fn, device)
    times["scores + maps"] = timed(scores, device)  # again, warm

    print(f"{'pass':<28}{'images/s':>12}{'x baseline time':>18}")
    print(f"{'baseline fwd+bwd (all params)':<28}{n / t_base:>12.1f}{1.0:>18.2f}")
    per_image = 0.0
    for name, t in times.items():
        if name.endswith("(once)"):
            print(f"{name:<28}{'':>12}{'':>18}   {t:.2f} s")
            continue
        per_image += t / n
        print(f"{name:<28}{n / t:>12.1f}{t / t_base:>18.2f}")
    once = sum(t for name, t in times.items() if name.endswith("(once)"))
    total = per_image * args.target + once
    print(
        f"all passes: {1 / per_image:.1f} images/s ({per_image * n / t_base:.2f}x the baseline's time); "
        f"{args.target} training images (queries = train) ~ {total:.0f} s of compute "
        f"({'meets' if total < 180 else 'misses'} the 3-minute goal; data loading not included)"
    )
    if gpu:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
