"""Dense-CRF throughput: igcam's torch CRF (batched, on the device) against pydensecrf on one CPU core and on a
pool of every core, in the same run, on the same images and probabilities.

The images are 500 x 375 (VOC's size) scenes of noisy colour blocks with smooth, noisy probabilities over
`--labels` labels (21: every VOC class; igcam's crf stage uses only an image's present classes plus
background, typically 2-4). Prints images/s of each and the ratios to pydensecrf on one core, and the share
of pixels whose label the torch CRF gives as pydensecrf does.

    python benchmarks/crf.py [--device cuda] [--images 16] [--labels 21] [--preset psa] [--batch 8]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from timing import timed_call  # benchmarks/, on the path when run as a script

from igcam_cli.core.densecrf import PRESETS, dense_crf
from igcam_cli.core.torch_crf import dense_crf_batch
from igcam_cli.runtime.devices import resolve_device
from igcam_cli.runtime.pool import available_cpus, map_ordered, process_pool


def scene(seed: int, height: int, width: int, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.int32)
    for _ in range(6):
        y0, x0 = rng.integers(0, height - 16), rng.integers(0, width - 16)
        image[y0 : y0 + rng.integers(16, height), x0 : x0 + rng.integers(16, width)] = rng.integers(0, 256, 3)
    image = np.clip(image + rng.integers(-25, 26, image.shape), 0, 255).astype(np.uint8)
    coarse = torch.from_numpy(rng.normal(size=(1, n_labels, height // 16, width // 16)) * 2.5).float()
    probs = torch.softmax(F.interpolate(coarse, (height, width), mode="bilinear")[0], 0).numpy()
    return image, probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--labels", type=int, default=21)
    parser.add_argument("--preset", default="psa", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT")
    args = parser.parse_args()
    device = resolve_device(args.device)
    width, height = (int(v) for v in args.size.split("x"))
    params = PRESETS[args.preset]
    scenes = [scene(i, height, width, args.labels) for i in range(args.images)]
    cores = available_cpus()

    one_core, reference = timed_call(lambda: [dense_crf(image, probs, params) for image, probs in scenes], device)

    def pool_run():
        with process_pool(cores) as pool:
            jobs = ((i, (image, probs, params)) for i, (image, probs) in enumerate(scenes))
            return [m for _, m in map_ordered(pool, dense_crf, jobs, ahead=2 * cores)]

    all_cores, _ = timed_call(pool_run, device)

    def torch_run():
        out = []
        for i in range(0, len(scenes), args.batch):
            chunk = scenes[i : i + args.batch]
            images = [torch.from_numpy(image).to(device) for image, _ in chunk]
            probs = [torch.from_numpy(p).to(device) for _, p in chunk]
            out += [m.cpu().numpy() for m in dense_crf_batch(images, probs, params, device)]
        return out

    timed_call(lambda: torch_run() if device.type == "cuda" else None, device)  # warm-up (CUDA kernels)
    on_device, marginals = timed_call(torch_run, device)
    agree = np.mean([(m.argmax(0) == r.argmax(0)).mean() for m, r in zip(marginals, reference)])

    n = len(scenes)
    print(f"dense CRF, {width}x{height}, {args.labels} labels, preset {args.preset}, {n} images, device {device}")
    print(f"  pydensecrf, 1 core:           {n / one_core:8.2f} images/s")
    print(f"  pydensecrf, {cores} processes:     {n / all_cores:8.2f} images/s  ({one_core / all_cores:.2f}x)")
    print(f"  torch on {device}, batch {args.batch}:   {n / on_device:8.2f} images/s  ({one_core / on_device:.2f}x)")
    print(f"  labels equal to pydensecrf's: {agree * 100:.3f} % of pixels")


if __name__ == "__main__":
    main()
