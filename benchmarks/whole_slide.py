"""Whole-slide benchmark: lazy pyramids in, full-resolution tile-wise warping out.

Builds a synthetic RGB slide pair on disk, tile by tile (never as one array):

* the **target**: a tissue-like procedural texture (an irregular tissue outline on a white
  background, pink/purple stroma, dark nuclei), written as an OME-Zarr pyramid;
* the **source**: the same texture deformed by a known transform (rotation, translation and a
  smooth elastic field), written as a JPEG-compressed pyramidal OME-TIFF (a typical scanner
  format).

Then it registers the source onto the target at the working resolution (reading one small
pyramid level of each), warps level 0 of the source tile by tile into an OME-Zarr pyramid,
and prints the wall time and peak resident memory (``ru_maxrss``) of each phase, plus the
landmark error against the known transform. Exit code 1 if the peak memory exceeds the limit.

    python benchmarks/whole_slide.py --size 40000            # the full benchmark
    python benchmarks/whole_slide.py --size 8000 --keep -d /tmp/ws   # a quick try
    python benchmarks/whole_slide.py --size 30000 --flat     # the source as a flat, uncompressed TIFF

``--flat`` writes the source as one-level, one-strip, uncompressed TIFF (what ``tifffile.imwrite``
and many exporters produce; 2.7 GB at 30000 px) instead of a pyramid: the slide path then reads
it by rows and computes its working level band by band. The flat file is written by a child
process, so the peak memory printed is that of registering and warping alone.

The texture is evaluated at any continuous coordinate (periodic value-noise octaves sampled
with ``grid_sample``), so the deformed copy is rendered exactly, tile by tile, without warping
a big image.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_histreg import RegistrationConfig
from napari_histreg.slides import OmeZarrWriter, open_slide, register_slides, run_blocks, write_ome_tiff
from napari_histreg.tiled import warp_slide


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


# --------------------------------------------------------------------------- the texture
class TissueTexture:
    """A tissue-like RGB texture defined at every continuous level-0 coordinate.

    An irregular tissue outline (a small random image, smoothed, inside a soft elliptic window,
    stretched over the whole slide) and three periodic value-noise octaves (stroma, fibres,
    cells) sampled with ``grid_sample``; colours are a linear mix of four scalar fields."""

    def __init__(self, size: int, seed: int = 0):
        self.size = float(size)
        g = torch.Generator().manual_seed(seed)

        def smooth(t, blur):
            r = int(3 * blur) + 1
            x = torch.arange(-r, r + 1, dtype=torch.float32)
            k = torch.exp(-0.5 * (x / blur) ** 2)
            k = k / k.sum()
            t = F.pad(t, (r, r, r, r), mode="circular")
            t = F.conv2d(F.conv2d(t, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))
            return (t - t.min()) / (t.max() - t.min())

        # the outline: 96 x 96 smooth noise times an elliptic window, thresholded softly later
        n = 96
        blob = smooth(torch.rand(1, 1, n, n, generator=g), 6.0) * 0.7 + smooth(torch.rand(1, 1, n, n, generator=g), 2.5) * 0.3
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
        window = torch.clamp(1.3 - (yy**2 / 0.75 + xx**2 / 0.9), 0, 1)
        self.outline = (blob * window).contiguous()
        self.octaves = {}
        for name, period, scale, blur in (("stroma", 128, 420.0, 1.0), ("fibres", 256, 90.0, 1.0), ("cells", 512, 14.0, 0.8)):
            t = smooth(torch.rand(1, 1, period, period, generator=g), blur)
            # column P repeats column 0: bilinear sampling is periodic
            self.octaves[name] = (F.pad(t, (0, 1, 0, 1), mode="circular"), period, scale)
        pink, purple, nucleus = (torch.tensor(c) for c in ([228.0, 150.0, 190.0], [150.0, 80.0, 160.0], [70.0, 40.0, 120.0]))
        self.background = torch.tensor([243.0, 241.0, 246.0])
        # rgb = background + tissue (pink - bg) + tissue (1 - n) stroma (purple - pink) + tissue n (nucleus - pink)
        self.mix = torch.stack((pink - self.background, purple - pink, nucleus - pink))

    def _periodic(self, name, xy):
        tex, period, scale = self.octaves[name]
        grid = torch.remainder(xy * (2.0 / (scale * period)), 2.0).sub_(1.0)
        return F.grid_sample(tex, grid[None], mode="bilinear", padding_mode="border", align_corners=True)[0, 0]

    def render(self, rows: torch.Tensor, cols: torch.Tensor) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` at level-0 coordinates ``rows``, ``cols`` (``(h, w)`` float)."""
        out = np.empty(tuple(rows.shape) + (3,), dtype=np.uint8)
        step = max(1, (1 << 20) // max(1, rows.shape[1]))  # about a megapixel at a time
        for r0 in range(0, rows.shape[0], step):
            out[r0 : r0 + step] = self._render(rows[r0 : r0 + step], cols[r0 : r0 + step])
        return out

    def _render(self, rows, cols):
        xy = torch.stack((cols, rows), dim=-1)  # (h, w, 2) = grid_sample's (x, y)
        outline_grid = (xy * (2.0 / (self.size - 1))).sub_(1.0)
        outline = F.grid_sample(self.outline, outline_grid[None], mode="bilinear", padding_mode="zeros",
                                align_corners=True)[0, 0]
        del outline_grid
        tissue = torch.sigmoid(outline.sub_(0.33).mul_(40.0))
        stroma = self._periodic("stroma", xy).mul_(0.6).add_(self._periodic("fibres", xy).mul_(0.4))
        nuclei = torch.sigmoid(self._periodic("cells", xy).sub_(0.72).mul_(30.0))
        del xy
        fields = torch.stack((tissue, tissue * (1 - nuclei) * stroma, tissue * nuclei), dim=-1)  # (h, w, 3)
        rgb = torch.matmul(fields, self.mix).add_(self.background)
        return rgb.clamp_(0, 255).round_().to(torch.uint8).numpy()


class Deformation:
    """``T(p) = R (p - c) + c + t + e(p)``: where source pixel ``p`` shows tissue point ``T(p)``
    (the target shows tissue point ``q`` at ``q``). ``e`` is a smooth elastic field from a
    coarse random control grid (bicubic)."""

    def __init__(self, size: int, seed: int = 1, angle: float = 4.0, shift: float = 0.012, amplitude: float = 0.006):
        rng = np.random.default_rng(seed)
        self.size = float(size)
        theta = math.radians(angle)
        self.rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
        self.centre = torch.tensor([size / 2.0, size / 2.0], dtype=torch.float64)
        self.shift = torch.tensor([shift * size, -0.7 * shift * size], dtype=torch.float64)
        control = rng.normal(0.0, amplitude * size, size=(1, 2, 6, 6)).astype(np.float32)
        self.control = torch.from_numpy(control)

    def elastic(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        grid = torch.stack((2 * cols / (self.size - 1) - 1, 2 * rows / (self.size - 1) - 1), dim=-1)[None]
        return F.grid_sample(self.control, grid.float(), mode="bicubic", padding_mode="border", align_corners=True)[0]

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (a, b), (c, d) = self.rot.tolist()
        cr, cc = self.centre.tolist()
        tr, tc = self.shift.tolist()
        e = self.elastic(rows, cols)
        dr, dc = rows - cr, cols - cc
        qr = e[0].add_(dr * a).add_(dc * b).add_(cr + tr)
        qc = e[1].add_(dr * c).add_(dc * d).add_(cc + tc)
        return qr, qc

    def points(self, points_rc: np.ndarray) -> np.ndarray:
        r = torch.as_tensor(points_rc[:, 0], dtype=torch.float32)[:, None]
        c = torch.as_tensor(points_rc[:, 1], dtype=torch.float32)[:, None]
        qr, qc = self(r, c)
        return np.stack((qr[:, 0].numpy(), qc[:, 0].numpy()), axis=1).astype(np.float64)


# --------------------------------------------------------------------------- building the slides
def render_to_zarr(path: Path, size: int, texture: TissueTexture, deformation: Deformation | None, *, tile: int,
                   workers: int, label: str) -> None:
    writer = OmeZarrWriter(path, (size, size), 3, np.uint8, chunk=min(1024, tile), name=label)
    blocks = writer.blocks(0, tile)
    done = [0]
    start = time.perf_counter()

    def one(block):
        rows, cols = block
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start, 3), dtype=np.uint8)
        c = torch.arange(cols.start, cols.stop, dtype=torch.float32)
        step = 256  # rows at a time: bounded memory
        for r0 in range(rows.start, rows.stop, step):
            r = torch.arange(r0, min(r0 + step, rows.stop), dtype=torch.float32)
            rr, cc = torch.meshgrid(r, c, indexing="ij")
            if deformation is not None:
                rr, cc = deformation(rr, cc)
            out[r0 - rows.start : r0 - rows.start + len(r)] = texture.render(rr, cc)
        writer.write(0, rows, cols, out)

    def finished(block, _):
        done[0] += 1
        if done[0] % max(1, len(blocks) // 10) == 0 or done[0] == len(blocks):
            print(f"  {label}: {done[0]}/{len(blocks)} tiles, {time.perf_counter() - start:.0f} s", flush=True)

    with torch.no_grad():
        run_blocks(blocks, one, workers, finished)
    writer.build_pyramid(workers)
    writer.finalise({"synthetic": label})


def write_flat_tiff(zarr_path: Path, tiff_path: Path, band: int = 1024) -> None:
    """Level 0 of an OME-Zarr as a flat, uncompressed, single-strip RGB TIFF, band by band
    through a memory-mapped file (run in a child process: the mapped pages are not counted in
    the benchmark's own peak memory)."""
    import tifffile

    slide = open_slide(zarr_path)
    h, w = slide.shape
    image = tifffile.memmap(str(tiff_path), shape=(h, w, 3), dtype=np.uint8, photometric="rgb")
    for r0 in range(0, h, band):
        rows = slice(r0, min(h, r0 + band))
        image[rows] = slide.read_region(0, rows, slice(0, w))
        image.flush()
    del image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=40000, help="slide side in pixels (default 40000)")
    parser.add_argument("-d", "--folder", default=None, help="work folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the slides and the output")
    parser.add_argument("--tile", type=int, default=2048, help="warp tile size (default 2048)")
    parser.add_argument("--workers", type=int, default=2, help="tiles in parallel (default 2)")
    parser.add_argument("--working-size", type=int, default=768, help="registration working size (default 768)")
    parser.add_argument("--max-memory-mb", type=float, default=2048.0, help="fail above this peak RSS (default 2048)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--flat", action="store_true", help="write the source as a flat uncompressed TIFF, not a pyramid")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="histreg-whole-slide-"))
    folder.mkdir(parents=True, exist_ok=True)
    numbers: dict = {"size": args.size, "tile": args.tile, "workers": args.workers, "torch_threads": torch.get_num_threads(),
                     "source_format": "flat uncompressed TIFF" if args.flat else "pyramidal OME-TIFF, JPEG tiles"}
    texture = TissueTexture(args.size, seed=0)
    deformation = Deformation(args.size, seed=1)
    target_path = folder / "target.ome.zarr"
    source_path = folder / ("source.flat.tif" if args.flat else "source.ome.tif")
    out_path = folder / "warped.ome.zarr"
    print(f"whole-slide benchmark: {args.size} x {args.size} RGB, work folder {folder}", flush=True)
    try:
        # ---------------------------------------------------------------- 1. build the pair
        t0 = time.perf_counter()
        if not target_path.exists():
            render_to_zarr(folder / "target.tmp.zarr", args.size, texture, None, tile=args.tile, workers=args.workers, label="target")
            (folder / "target.tmp.zarr").rename(target_path)
        if not source_path.exists():
            tmp = folder / "source.tmp.zarr"
            shutil.rmtree(tmp, ignore_errors=True)
            render_to_zarr(tmp, args.size, texture, deformation, tile=args.tile, workers=args.workers, label="source")
            if args.flat:
                import multiprocessing

                print("  source: writing a flat, uncompressed, one-strip TIFF (child process)", flush=True)
                child = multiprocessing.get_context("spawn").Process(target=write_flat_tiff, args=(tmp, source_path))
                child.start()
                child.join()
                if child.exitcode != 0:
                    raise RuntimeError("writing the flat TIFF failed")
            else:
                print("  source: writing the pyramidal OME-TIFF (JPEG tiles)", flush=True)
                write_ome_tiff(tmp, source_path, tile=512, compression="jpeg")
            shutil.rmtree(tmp)
        numbers["build_s"] = round(time.perf_counter() - t0, 1)
        numbers["build_peak_rss_mb"] = round(peak_rss_mb(), 1)
        print(f"built the pair in {numbers['build_s']} s (peak RSS so far {numbers['build_peak_rss_mb']:.0f} MiB)", flush=True)

        # ---------------------------------------------------------------- 2. register
        source, target = open_slide(source_path), open_slide(target_path)
        print(f"  {source}\n  {target}", flush=True)
        config = RegistrationConfig()
        config.preprocess.working_size = args.working_size
        t0 = time.perf_counter()
        result = register_slides(source, target, config, device="cpu")
        numbers["register_s"] = round(time.perf_counter() - t0, 1)
        numbers["register_levels"] = [result.info["slide"]["source_level"], result.info["slide"]["target_level"]]
        numbers["register_peak_rss_mb"] = round(peak_rss_mb(), 1)
        # landmarks: source pixels p show tissue point T(p), which the target shows at T(p)
        rng = np.random.default_rng(2)
        pts = rng.uniform(0.2 * args.size, 0.8 * args.size, size=(200, 2))
        truth = deformation.points(pts)
        mapped = result.map_source_points(pts)
        err = np.linalg.norm(mapped - truth, axis=1)
        before = np.linalg.norm(pts - truth, axis=1)
        diag = math.hypot(args.size, args.size)
        numbers["landmark_error_px_median"] = round(float(np.median(err)), 2)
        numbers["landmark_rtre_median"] = float(np.median(err) / diag)
        numbers["landmark_rtre_median_before"] = float(np.median(before) / diag)
        print(f"registered at levels {numbers['register_levels']} in {numbers['register_s']} s; median landmark error "
              f"{numbers['landmark_error_px_median']} px level 0 (rTRE {numbers['landmark_rtre_median']:.5f}, "
              f"before {numbers['landmark_rtre_median_before']:.5f}); peak RSS {numbers['register_peak_rss_mb']:.0f} MiB",
              flush=True)
        result.save(folder / "transform")

        # ---------------------------------------------------------------- 3. warp level 0
        clear_output(out_path)
        t0 = time.perf_counter()
        warp_slide(result, source, out_path, tile=args.tile, workers=args.workers, progress=progress_printer(t0, 15.0))
        numbers["warp_s"] = round(time.perf_counter() - t0, 1)
        numbers["warp_mpx_per_s"] = round(args.size**2 / 1e6 / numbers["warp_s"], 1)
        numbers["peak_rss_mb"] = round(peak_rss_mb(), 1)

        # ---------------------------------------------------------------- 4. check the result
        warped = open_slide(out_path)
        k = warped.level_for(1024)
        a = warped.read(k).astype(np.float32).mean(-1)
        b = target.read(target.level_for_downsample(warped.downsamples[k][0])).astype(np.float32).mean(-1)
        s0 = source.read(source.level_for_downsample(warped.downsamples[k][0])).astype(np.float32).mean(-1)
        h, w = min(a.shape[0], b.shape[0], s0.shape[0]), min(a.shape[1], b.shape[1], s0.shape[1])
        inner = (slice(h // 6, 5 * h // 6), slice(w // 6, 5 * w // 6))  # inside the frame: no fill value
        numbers["mean_abs_grey_diff_before"] = round(float(np.abs(s0[inner] - b[inner]).mean()), 2)
        numbers["mean_abs_grey_diff_after"] = round(float(np.abs(a[inner] - b[inner]).mean()), 2)
        source.close()
        target.close()
        print(f"warped level 0 ({args.size} x {args.size}) in {numbers['warp_s']} s ({numbers['warp_mpx_per_s']} Mpx/s); "
              f"mean grey difference to the target (level {k}, central 2/3): before {numbers['mean_abs_grey_diff_before']}, "
              f"after {numbers['mean_abs_grey_diff_after']}", flush=True)
    finally:
        if not args.keep and args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return finish(numbers, args.json, args.max_memory_mb)


def clear_output(path: Path) -> None:
    """Remove an earlier run's output and its unfinished ``.partial``."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)


def progress_printer(start: float, every: float):
    """A progress callback that prints a line at most every ``every`` seconds (and at the end of
    each stage), with the time since ``start`` and the peak memory so far."""
    last = [0.0]

    def progress(event):
        now = time.perf_counter()
        if now - last[0] > every or event.step == event.total:
            last[0] = now
            print(f"  {event.stage}: {event.step}/{event.total} ({now - start:.0f} s, peak RSS {peak_rss_mb():.0f} MiB)",
                  flush=True)

    return progress


def finish(numbers: dict, json_path, max_memory_mb: float) -> int:
    """Print the numbers (and write them to ``json_path``) with the peak memory against its
    limit; the exit code: 1 above the limit."""
    numbers["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(numbers, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(numbers, indent=2) + "\n")
    ok = numbers["peak_rss_mb"] <= max_memory_mb
    print(f"peak resident memory {numbers['peak_rss_mb']:.0f} MiB: {'OK' if ok else 'ABOVE'} the limit of {max_memory_mb:.0f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
