"""Data-stage benchmark (issue 3, point 5).

1. pairs/s per core for 512 -> 128 pairs: `pipeline.degrade` vs BasicSR 1.4.2's degradation
   functions run on the same drawn parameters, in one process with one thread each:
     * "BasicSR (Real-ESRGAN calls)": kernels from `bivariate_Gaussian` /
       `bivariate_generalized_Gaussian` / `bivariate_plateau` / `circular_lowpass_kernel`, blur
       with BasicSR's `filter2D`, resizes with `F.interpolate` (as Real-ESRGAN's model does),
       `add_gaussian_noise` / `add_poisson_noise`, `add_jpg_compression`;
     * "BasicSR + OpenCV blur/resize": the same with `cv2.filter2D` / `cv2.resize` swapped in
       for the two torch operators, to show what the rest gains.
2. The Ray Data job (`jobs.prepare_data.prepare`) vs a bare single-process loop over the same
   files calling the same stage functions, with the overhead in percent.

    python benchmarks/bench_degrade.py [--pairs 40] [--files 48] [--crops 4] [--skip-ray]

BasicSR is a bench-only extra (`pip install basicsr==1.4.2`); without it that part reports
"unavailable" with the reason.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import degrade as D  # noqa: E402

HR_SIZE, SCALE = 512, 4
SOURCE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "motorcycle_left")


def hr_patches(count: int) -> List[np.ndarray]:
    """`count` uint8 512x512x3 RGB patches from skimage's sample images."""
    from skimage import data

    patches = []
    for i in range(count):
        name = SOURCE_IMAGES[i % len(SOURCE_IMAGES)]
        image = getattr(data, name)() if name != "motorcycle_left" else data.stereo_motorcycle()[0]
        patches.append(cv2.resize(np.ascontiguousarray(image[..., :3]), (HR_SIZE, HR_SIZE),
                                  interpolation=cv2.INTER_AREA))
    return patches


# ---------------------------------------------------------------------------------------------
# BasicSR on the same parameters
# ---------------------------------------------------------------------------------------------

def import_basicsr():
    """(degradations module, filter2D) of BasicSR 1.4.2, or raise ImportError with the reason."""
    import torchvision.transforms.functional as F

    sys.modules.setdefault("torchvision.transforms.functional_tensor", F)
    from basicsr.data import degradations
    from basicsr.utils.img_process_util import filter2D

    return degradations, filter2D


class BasicSRDegradation:
    """Real-ESRGAN's second-order pipeline from BasicSR's functions, driven by our params dict."""

    def __init__(self, degradations, filter2d, opencv_ops: bool):
        import torch
        import torch.nn.functional as TF

        self.bd, self.filter2d, self.opencv_ops = degradations, filter2d, opencv_ops
        self.torch, self.interpolate = torch, TF.interpolate

    def kernel(self, k: Dict[str, Any]) -> np.ndarray:
        bd, family, size = self.bd, k["family"], k["size"]
        if family == D.SINC:
            return bd.circular_lowpass_kernel(k["omega_c"], size)
        iso = family.endswith("iso") and not family.endswith("aniso")
        args = (size, k["sigma_x"], k["sigma_y"], k["rotation"])
        if family in ("iso", "aniso"):
            return bd.bivariate_Gaussian(*args, isotropic=iso)
        if family.startswith("generalized"):
            return bd.bivariate_generalized_Gaussian(*args, k["beta"], isotropic=iso)
        return bd.bivariate_plateau(*args, k["beta"], isotropic=iso)

    def blur(self, img: np.ndarray, k: Dict[str, Any]) -> np.ndarray:
        kernel = self.kernel(k)
        if self.opencv_ops:
            return cv2.filter2D(img, -1, kernel)
        x = self.torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
        out = self.filter2d(x, self.torch.from_numpy(kernel).float()[None])
        return out[0].numpy().transpose(1, 2, 0)

    def resize(self, img: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
        if self.opencv_ops:
            return D.resize(img, height, width, mode)
        x = self.torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
        out = self.interpolate(x, size=(max(height, 1), max(width, 1)), mode=mode)
        return out[0].numpy().transpose(1, 2, 0)

    def noise(self, img: np.ndarray, noise: Dict[str, Any]) -> np.ndarray:
        np.random.seed(noise["noise_seed"] % 2**32)  # BasicSR draws from the global RNG
        if noise["kind"] == "gaussian":
            out = self.bd.add_gaussian_noise(img, sigma=noise["sigma"], gray_noise=noise["gray"])
        else:
            out = self.bd.add_poisson_noise(img, scale=noise["scale"], gray_noise=noise["gray"])
        return out.astype(np.float32)

    def jpeg(self, img: np.ndarray, quality: float) -> np.ndarray:
        return self.bd.add_jpg_compression(img, int(round(quality)))

    def __call__(self, hr: np.ndarray, p: Dict[str, Any]) -> np.ndarray:
        h, w = hr.shape[:2]
        img = hr[..., ::-1].astype(np.float32) / 255.0
        s1, s2, final = p["stage1"], p["stage2"], p["final"]
        img = self.blur(img, s1["blur"])
        f = s1["resize"]["factor"]
        img = self.resize(img, int(h * f), int(w * f), s1["resize"]["mode"])
        img = self.jpeg(self.noise(img, s1["noise"]), s1["jpeg_quality"])
        if s2["blur"] is not None:
            img = self.blur(img, s2["blur"])
        f = s2["resize"]["factor"]
        img = self.resize(img, int(h / SCALE * f), int(w / SCALE * f), s2["resize"]["mode"])
        img = self.noise(img, s2["noise"])

        def resize_sinc(x):
            x = self.resize(x, h // SCALE, w // SCALE, final["resize_mode"])
            return self.blur(x, final["sinc"]) if final["sinc"] is not None else x

        if final["order"] == D.FINAL_ORDERS[0]:
            img = self.jpeg(resize_sinc(img), final["jpeg_quality"])
        else:
            img = resize_sinc(self.jpeg(img, final["jpeg_quality"]))
        return np.clip((img * 255.0).round(), 0, 255).astype(np.uint8)[..., ::-1]


def check_kernels_match(degradations, params: List[Dict[str, Any]]) -> None:
    ref = BasicSRDegradation(degradations, None, opencv_ops=True)
    for p in params:
        for k in (p["stage1"]["blur"], p["stage2"]["blur"], p["final"]["sinc"]):
            if k is not None and not np.allclose(D.make_kernel(k), ref.kernel(k), atol=1e-10):
                raise AssertionError(f"kernel differs from BasicSR: {k}")


def cpu_seconds_per_pair(impls: Dict[str, Callable], patches, items, repeats: int = 2) -> Dict[str, float]:
    """CPU seconds per pair of each implementation (best of `repeats`), run interleaved pair by
    pair so that other load on the machine hits all of them alike."""
    for fn in impls.values():  # warm-up
        fn(patches[0], items[0])
    best = {name: float("inf") for name in impls}
    for _ in range(repeats):
        total = dict.fromkeys(impls, 0.0)
        for i, item in enumerate(items):
            for name, fn in impls.items():
                start = time.process_time()
                fn(patches[i % len(patches)], item)
                total[name] += time.process_time() - start
        best = {name: min(best[name], total[name] / len(items)) for name in impls}
    return best


def bench_degradation(n_pairs: int) -> None:
    cv2.setNumThreads(1)
    import torch

    torch.set_num_threads(1)
    patches = hr_patches(len(SOURCE_IMAGES))
    ids = [f"bench-{i}" for i in range(n_pairs)]
    items = [{"id": i, "params": {**D.draw_params(D.sample_rng(0, i)), "scale": SCALE}} for i in ids]
    impls = {
        # the full entry point: generator from (seed, id), drawing, applying
        "ours: pipeline.degrade.degrade()": lambda hr, it: D.degrade(hr, seed=0, sample_id=it["id"]),
        "ours: apply_degradation() only": lambda hr, it: D.apply_degradation(hr, it["params"]),
    }
    try:
        degradations, filter2d = import_basicsr()
        check_kernels_match(degradations, [it["params"] for it in items])
        for label, opencv_ops in (("BasicSR 1.4.2 (Real-ESRGAN calls)", False),
                                  ("BasicSR 1.4.2 + OpenCV blur/resize", True)):
            ref = BasicSRDegradation(degradations, filter2d, opencv_ops)
            impls[label] = lambda hr, it, ref=ref: ref(hr, it["params"])
        basicsr_note = ""
    except Exception as exc:  # any failure to import is reported, not raised
        basicsr_note = f"  BasicSR 1.4.2: unavailable ({type(exc).__name__}: {exc})"
    seconds = cpu_seconds_per_pair(impls, patches, items)
    ours = seconds["ours: pipeline.degrade.degrade()"]
    print(f"[degrade] {n_pairs} pairs 512->128, one thread, CPU time, same parameters for all")
    for name, sec in seconds.items():
        ratio = f"  ours is {sec / ours:.2f}x faster" if name.startswith("BasicSR") else ""
        print(f"  {name:<38} {1 / sec:6.1f} pairs/s/core ({sec * 1e3:6.1f} ms/pair){ratio}")
    if basicsr_note:
        print(basicsr_note)


# ---------------------------------------------------------------------------------------------
# Ray Data job vs a bare loop
# ---------------------------------------------------------------------------------------------

def write_sources(folder: Path, count: int, start: int = 0) -> None:
    """`count` distinct PNG files of 1024x768 (2x2 sample patches, cropped); files written with
    another `start` (a range not overlapping this one) are distinct from these too."""
    from PIL import Image

    patches = hr_patches(len(SOURCE_IMAGES))
    folder.mkdir(parents=True)
    for i in range(start, start + count):
        tiles = [patches[(i + k) % len(patches)] for k in range(4)]
        image = np.concatenate([np.concatenate(tiles[:2], axis=1),
                                np.concatenate(tiles[2:], axis=1)], axis=0)
        image = np.ascontiguousarray(image[:768])
        image[0, :3] = (i & 255, (i >> 8) & 255, 7)  # every file its own content (ids are content digests)
        Image.fromarray(image).save(folder / f"src_{i:05d}.png", compress_level=1)


def cpu_seconds_by_role() -> Dict[str, float]:
    """CPU seconds used so far by this process ("driver") and its children: Ray task workers
    ("workers") and Ray's own daemons (raylet, GCS, agents, monitors: "daemons")."""
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    used = {"driver": times.user + times.system, "workers": 0.0, "daemons": 0.0}
    for proc in me.children(recursive=True):
        try:
            name, times = proc.name(), proc.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        role = "workers" if name.startswith("ray::") and not name.endswith("Agent") else "daemons"
        used[role] += times.user + times.system
    return used


def bare_loop(cfg) -> int:
    """The job's stage functions in one process, no Ray; returns the number of pairs."""
    from jobs import prepare_data as P
    from pipeline.pairs import pairs_table, process_uri
    from pipeline.pairs_dataset import write_errors, write_shard

    rows, errors, n_pairs = [], [], 0
    for uri in P.list_sources(cfg.input):
        pairs, error = process_uri(uri, cfg, P.READER)
        rows.extend(pairs)
        n_pairs += len(pairs)
        errors += [error] if error else []
        while len(rows) >= cfg.shard_rows:
            write_shard(pairs_table(rows[:cfg.shard_rows]), cfg.output)
            rows = rows[cfg.shard_rows:]
    if rows:
        write_shard(pairs_table(rows), cfg.output)
    write_errors(errors, cfg.output)
    return n_pairs


def measure(run: Callable[[], int]) -> Dict[str, float]:
    """Run; pairs, wall seconds and CPU seconds of this process tree (in total and by role)."""
    before, wall = cpu_seconds_by_role(), time.perf_counter()
    pairs = run()
    wall, after = time.perf_counter() - wall, cpu_seconds_by_role()
    used = {role: after[role] - before[role] for role in after}
    return {"pairs": pairs, "wall": wall, "cpu": sum(used.values()), **used}


def bench_ray(n_files: int, crops: int, cpus: List[int]) -> None:
    import ray

    from jobs import prepare_data as P
    from jobs.common import init_ray

    cv2.setNumThreads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        write_sources(work / "in", n_files)
        write_sources(work / "warmup", 2)

        def config(source: str, name: str, workers: int):
            return P.PrepareConfig(input=str(work / source), output=str(work / name),
                                   patch_size=HR_SIZE, crops_per_image=crops, shard_rows=32,
                                   num_workers=workers)

        bare = measure(lambda: bare_loop(config("in", "bare", 1)))
        print(f"[ray] {n_files} files x {crops} crops = {bare['pairs']} pairs of 512->128; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"  bare single-process loop  {bare['pairs'] / bare['wall']:6.2f} pairs/s wall, "
              f"{bare['cpu'] / bare['pairs'] * 1e3:6.1f} CPU-ms/pair")
        for n_cpus in cpus:
            start = time.perf_counter()
            init_ray(None, num_cpus=n_cpus, object_store_memory=1 << 30)
            warm = measure(lambda: P.prepare(config("warmup", f"warm{n_cpus}", n_cpus))["pairs_written"])
            startup = time.perf_counter() - start
            run = measure(lambda: P.prepare(config("in", f"ray{n_cpus}", n_cpus))["pairs_written"])
            ray.shutdown()
            bare_ms = bare["cpu"] / bare["pairs"] * 1e3
            wall_overhead = 1 - run["pairs"] / run["wall"] / (n_cpus * bare["pairs"] / bare["wall"])
            per_pair = {k: run[k] / run["pairs"] * 1e3 for k in ("cpu", "workers", "driver", "daemons")}
            print(f"  Ray Data job, {n_cpus} CPU(s)  {run['pairs'] / run['wall']:6.2f} pairs/s wall, "
                  f"{per_pair['cpu']:6.1f} CPU-ms/pair = workers {per_pair['workers']:.1f} + driver "
                  f"{per_pair['driver']:.1f} + Ray daemons {per_pair['daemons']:.1f}")
            print(f"    overhead vs bare: {(per_pair['cpu'] / bare_ms - 1) * 100:+.1f}% CPU/pair in total, "
                  f"{(per_pair['workers'] / bare_ms - 1) * 100:+.1f}% in the task workers, "
                  f"{wall_overhead * 100:+.1f}% wall vs {n_cpus}x bare (startup: ray.init + a "
                  f"{warm['pairs']}-pair warm-up run {startup:.1f} s, not counted)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=40, help="pairs for the per-core comparison")
    parser.add_argument("--files", type=int, default=48, help="source files for the Ray comparison")
    parser.add_argument("--crops", type=int, default=4, help="crops per source file")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray CPUs to try")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    bench_degradation(args.pairs)
    if not args.skip_ray:
        bench_ray(args.files, args.crops, args.cpus)


if __name__ == "__main__":
    main()
