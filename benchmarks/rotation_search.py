"""Micro-benchmark of the rotation search: every angle of the circle at 1 degree on one grid.

    python benchmarks/rotation_search.py --size 512 --threads 2

Scores 360 angles (``--step``) of the bundled sample pair (two stains of scikit-image's IHC
image, whose own rotation is a few degrees; the source turned by a further 57 degrees) on a ``--size`` px grid, with the polar search the pipeline
uses (:func:`napari_histreg.stages.initial.polar_angle_scores`) and with the grid search it
replaced (one ``grid_sample`` warp per angle, batches of 120), and prints the seconds of each
(best of ``--repeats``, after one warm-up call), their ratio, the angle each found and the
largest difference between their scores. Both run in this one process, one after the other:
compare the ratio, not seconds from another run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def best_of(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: kernel selection, allocations
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="grid side in pixels (default 512)")
    parser.add_argument("--step", type=float, default=1.0, help="angle step in degrees (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-grid", action="store_true", help="time the polar search only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from napari_histreg import conventions as cv
    from napari_histreg.sample import make_sample_pair
    from napari_histreg.stages.initial import _grid_angle_scores, polar_angle_scores
    from napari_histreg.stages.preprocess import PreprocessConfig, preprocess_pair, resample

    device = torch.device(args.device)
    sample = make_sample_pair()
    pair = preprocess_pair(sample.source, sample.target, PreprocessConfig(working_size=max(768, args.size)))
    shape = (args.size, args.size)
    truth = 57.0
    source = resample(pair.source, shape, device=device)
    turn = cv.rotation_about((np.asarray(shape) - 1) / 2, -truth)
    source = cv.warp(source[None, None], cv.affine_to_field(turn, shape, device=device))
    target = resample(pair.target, shape, device=device)[None, None]
    centre = (np.asarray(shape) - 1) / 2
    angles = np.arange(0.0, 360.0, args.step)
    polar_s, polar = best_of(lambda: polar_angle_scores(source, target, angles, centre, centre), args.repeats)
    print(f"rotation search, {len(angles)} angles at {args.step:g} degrees, {args.size} px grid, {args.threads} threads, "
          f"{device.type}; the source is turned by a further {truth:g} degrees")
    print(f"polar (FFT over every angle at once): {polar_s:.4f} s   found {angles[int(np.argmax(polar))]:.2f} degrees")
    if not args.skip_grid:
        grid_s, (grid, _) = best_of(lambda: _grid_angle_scores(source, target, angles, centre, centre, 120, device,
                                                               None, 1, 0), max(1, args.repeats - 2))
        print(f"grid (one warp per angle, 120 per call): {grid_s:.4f} s   found {angles[int(np.argmax(grid))]:.2f} degrees")
        print(f"ratio grid / polar: {grid_s / polar_s:.1f}x; largest score difference {np.abs(polar - grid).max():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
