"""Whole-slide stack benchmark: N synthetic serial sections registered into one frame and warped,
tile by tile, into one OME-Zarr with a z axis.

Builds ``--sections`` synthetic RGB slides of ``--size`` px a side on disk, tile by tile (the
tissue texture of ``benchmarks/whole_slide.py``): section ``k`` shows the tissue under its own
known deformation (a small rotation, shift and smooth elastic field, growing with the distance
from the first section, as drift through a block does), written as OME-Zarr pyramids. Then

1. ``register_stack`` registers each section to its neighbour towards the middle one, reading one
   small pyramid level of each (``register_slides``), and composes the transforms;
2. ``warp_stack`` warps every section at full resolution onto the reference grid, tile by tile,
   into one OME-Zarr ``(c, z, y, x)``;

and prints the wall time and peak resident memory (``ru_maxrss``) of each phase, and the
landmark error of every section mapped into the reference against the known deformations.
Exit code 1 if the peak memory exceeds ``--max-memory-mb``.

    python benchmarks/stack_slides.py --size 20000 --sections 5          # the issue's benchmark
    python benchmarks/stack_slides.py --size 4000 --sections 3 --keep -d /tmp/st   # a quick try
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from whole_slide import (  # noqa: E402
    Deformation, TissueTexture, clear_output, finish, peak_rss_mb, progress_printer, render_to_zarr,
)

from napari_histreg import RegistrationConfig  # noqa: E402
from napari_histreg.stack import register_stack  # noqa: E402
from napari_histreg.stack_slides import warp_stack  # noqa: E402


def section_deformation(size: int, k: int, n: int) -> Deformation | None:
    """Section ``k``'s known deformation: none for the first, then a rotation, shift and elastic
    part that grow with ``k`` (each section a little further from the first)."""
    if k == 0:
        return None
    return Deformation(size, seed=10 + k, angle=1.5 * k, shift=0.004 * k, amplitude=0.002 * k)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20000, help="section side in pixels (default 20000)")
    parser.add_argument("--sections", type=int, default=5, help="sections in the stack (default 5)")
    parser.add_argument("-d", "--folder", default=None, help="work folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the slides and the output")
    parser.add_argument("--tile", type=int, default=2048, help="warp tile size (default 2048)")
    parser.add_argument("--workers", type=int, default=2, help="tiles in parallel (default 2)")
    parser.add_argument("--working-size", type=int, default=768, help="registration working size (default 768)")
    parser.add_argument("--max-memory-mb", type=float, default=2048.0, help="fail above this peak RSS (default 2048)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="histreg-stack-"))
    folder.mkdir(parents=True, exist_ok=True)
    n, size = args.sections, args.size
    numbers: dict = {"size": size, "sections": n, "tile": args.tile, "workers": args.workers, "torch_threads": args.threads}
    texture = TissueTexture(size, seed=0)
    deformations = [section_deformation(size, k, n) for k in range(n)]
    paths = [folder / f"section_{k}.ome.zarr" for k in range(n)]
    out_path = folder / "stack.ome.zarr"
    print(f"whole-slide stack benchmark: {n} sections of {size} x {size} RGB, work folder {folder}", flush=True)
    try:
        t0 = time.perf_counter()
        for k, (path, deformation) in enumerate(zip(paths, deformations)):
            if not path.exists():
                tmp = path.with_name(path.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                render_to_zarr(tmp, size, texture, deformation, tile=args.tile, workers=args.workers, label=f"section {k}")
                tmp.rename(path)
        numbers["build_s"] = round(time.perf_counter() - t0, 1)
        print(f"built the sections in {numbers['build_s']} s", flush=True)

        config = RegistrationConfig()
        config.preprocess.working_size = args.working_size
        t0 = time.perf_counter()
        stack = register_stack([str(p) for p in paths], config=config, device="cpu", threads=args.threads)
        numbers["register_s"] = round(time.perf_counter() - t0, 1)
        numbers["register_peak_rss_mb"] = round(peak_rss_mb(), 1)
        # landmarks: section k pixel p shows tissue point T_k(p); the reference shows tissue point q at T_r^-1(q)
        rng = np.random.default_rng(2)
        tissue_points = rng.uniform(0.3 * size, 0.7 * size, size=(100, 2))
        ref = stack.reference
        diag = math.hypot(size, size)

        def in_section(k, points):
            """Pixels of section k showing the tissue points (fixed-point inversion of T_k)."""
            if deformations[k] is None:
                return points.copy()
            p = points.copy()
            for _ in range(30):
                p = p + (points - deformations[k].points(p))
            return p

        errors = {}
        truth_ref = in_section(ref, tissue_points)
        for k in range(n):
            if k == ref:
                continue
            pts = in_section(k, tissue_points)
            mapped = stack.to_reference(k).map_source_points(pts)
            errors[k] = {"before": float(np.median(np.linalg.norm(pts - truth_ref, axis=1)) / diag),
                         "after": float(np.median(np.linalg.norm(mapped - truth_ref, axis=1)) / diag),
                         "flag": stack.sections[k].flag}
        numbers["sections_rtre"] = errors
        print(f"registered the stack in {numbers['register_s']} s (peak RSS {numbers['register_peak_rss_mb']:.0f} MiB); "
              + "; ".join(f"section {k}: rTRE {e['before']:.4f} -> {e['after']:.5f} ({e['flag']})" for k, e in errors.items()),
              flush=True)

        clear_output(out_path)
        t0 = time.perf_counter()
        warp_stack(stack, [str(p) for p in paths], out_path, tile=args.tile, workers=args.workers,
                   threads=args.threads, progress=progress_printer(t0, 20.0))
        numbers["warp_s"] = round(time.perf_counter() - t0, 1)
        numbers["warp_mpx_per_s"] = round(n * size**2 / 1e6 / numbers["warp_s"], 1)
        import zarr

        group = zarr.open_group(str(out_path), mode="r")
        numbers["output_shape"] = list(group["0"].shape)
        numbers["output_levels"] = len(group.attrs["multiscales"][0]["datasets"])
        print(f"warped {n} sections at full resolution in {numbers['warp_s']} s ({numbers['warp_mpx_per_s']} Mpx/s) into "
              f"{out_path} {numbers['output_shape']} ({numbers['output_levels']} levels)", flush=True)
    finally:
        if not args.keep and args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return finish(numbers, args.json, args.max_memory_mb)

if __name__ == "__main__":
    sys.exit(main())
