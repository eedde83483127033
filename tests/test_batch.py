"""Many pairs on dask.distributed (napari_histreg.batch): a real `dask scheduler` and
`dask worker` started as processes on loopback; results equal the serial evaluation; a failing
pair is recorded and the others finish; `histreg register-batch` and `evaluate --scheduler`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from skimage.io import imsave

pytest.importorskip("distributed")

from napari_histreg import RegistrationConfig  # noqa: E402
from napari_histreg.batch import evaluate_table_distributed, read_batch_table, register_batch  # noqa: E402
from console import histreg  # noqa: E402
from napari_histreg.evaluate import PAIR_COLUMNS, evaluate_table  # noqa: E402
from napari_histreg.io import HistRegInputError, read_landmarks, write_landmarks  # noqa: E402
from napari_histreg.result import RegistrationResult  # noqa: E402


FAST = {
    "preprocess": {"working_size": 256},
    "initial": {"angle_step": 10.0, "refine_step": 0.0},
    "affine": {"levels": [64, 128], "iterations": [20, 10]},
    "dense": {"levels": [64, 128], "iterations": [10, 5]},
}


def fast_config() -> RegistrationConfig:
    return RegistrationConfig.from_dict(FAST)


# --------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """Two sample pairs (seeds 0, 1) and a pair whose source image is missing."""
    from napari_histreg.sample import make_sample_pair

    folder = tmp_path_factory.mktemp("pairs")
    rows = []
    for seed in (0, 1):
        pair = make_sample_pair(seed)
        ids = [str(i) for i in range(len(pair.source_landmarks))]
        imsave(folder / f"source{seed}.png", pair.source, check_contrast=False)
        imsave(folder / f"target{seed}.png", pair.target, check_contrast=False)
        write_landmarks(folder / f"source{seed}.csv", ids, pair.source_landmarks)
        write_landmarks(folder / f"target{seed}.csv", ids, pair.target_landmarks)
        rows.append([f"source{seed}.png", f"source{seed}.csv", f"target{seed}.png", f"target{seed}.csv", "synthetic"])
    rows.append(["missing.png", "source0.csv", "target0.png", "target0.csv", "broken"])
    path = folder / "dataset.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Source image", "Source landmarks", "Target image", "Target landmarks", "status"])
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- a real cluster
def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory):
    """`dask scheduler` + one `dask worker` (1 process, 1 thread) on 127.0.0.1, as subprocesses;
    stopped (terminate, then kill) whatever happens."""
    folder = tmp_path_factory.mktemp("cluster")
    scheduler_file = folder / "scheduler.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DASK_DISTRIBUTED__WORKER__DAEMON="False")
    common = dict(cwd=folder, env=env, stdout=open(folder / "log.txt", "w"), stderr=subprocess.STDOUT)
    procs = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)], **common))
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert procs[0].poll() is None, (folder / "log.txt").read_text()
            assert time.monotonic() < deadline, "the dask scheduler did not start in 60 s"
            time.sleep(0.2)
        time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
             "--no-dashboard", "--memory-limit", "0", "--local-directory", str(folder / "worker")], **common))
        from distributed import Client

        with Client(address, timeout=30) as client:
            client.wait_for_workers(1, timeout=90)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        common["stdout"].close()


def _same_rows(rows, serial):
    assert len(rows) == len(serial)
    for got, want in zip(rows, serial):
        for column in PAIR_COLUMNS:
            if column == "seconds":
                continue
            if isinstance(want[column], float):
                assert got[column] == pytest.approx(want[column], rel=1e-6, abs=1e-9), column
            else:
                assert got[column] == want[column], column


def test_evaluate_on_scheduler_equals_serial_run(table, tmp_path, scheduler_address):
    serial_rows, serial_summary = evaluate_table(table, tmp_path / "serial", config=fast_config(), device="cpu")
    events = []
    rows, summary = evaluate_table_distributed(table, tmp_path / "dask", config=fast_config(), device="cpu",
                                               scheduler=scheduler_address, progress=events.append)
    _same_rows(rows, serial_rows)
    assert rows[2]["error"] and "missing.png" in rows[2]["error"]  # recorded, the others finished
    assert not rows[0]["error"] and not rows[1]["error"] and rows[0]["MrTRE"] < rows[0]["initial_MrTRE"]
    for key in ("AMrTRE", "MMrTRE", "AArTRE", "robustness", "count", "failed"):
        assert summary[key] == pytest.approx(serial_summary[key]), key
    assert summary["cluster"] == {"scheduler": scheduler_address, "workers": 1}
    assert [e.step for e in events if e.stage == "pair"] == [0, 1, 2, 3]
    with open(tmp_path / "dask" / "pairs.csv") as a, open(tmp_path / "serial" / "pairs.csv") as b:
        strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(rows)]  # noqa: E731
        assert strip(a) == strip(b)


def test_register_batch_on_scheduler_and_cli(table, tmp_path, scheduler_address, capsys):
    rows, summary = register_batch(table, tmp_path / "batch", fast_config(), device="cpu", scheduler=scheduler_address,
                                   warp=True, tile=256)
    assert [bool(r["error"]) for r in rows] == [False, False, True] and "missing.png" in rows[2]["error"]
    assert summary["registered"] == 2 and summary["failed"] == 1
    first = Path(rows[0]["output"])
    assert first.name == "001-source0__target0" and first.parent == tmp_path / "batch" / "pairs"
    assert {p.name for p in first.iterdir()} == {".histreg-output.json", "transform.json", "transform.mha",
                                                 "warped_source_landmarks.csv", "metrics.json", "warped.ome.zarr"}
    result = RegistrationResult.load(first / "transform.json")
    # 512 px images, working size 256: the (virtual, 2x2 mean) level 1 is the closest >= 256;
    # the transform is still in level-0 pixels
    assert result.info["slide"]["source_level"] == 1 and result.source_frame.original_shape == (512, 512)
    ids, mapped = read_landmarks(first / "warped_source_landmarks.csv")
    assert len(ids) > 10 and np.isfinite(mapped).all()
    assert json.loads((first / "metrics.json").read_text())["MrTRE"] == pytest.approx(rows[0]["MrTRE"])
    with open(tmp_path / "batch" / "batch.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3
    # the CLI on the same cluster; the output exists now, so pairs are refused without --overwrite
    config = tmp_path / "fast.json"
    config.write_text(json.dumps(FAST))
    args = ["register-batch", str(table), "-o", str(tmp_path / "batch"), "--scheduler", scheduler_address,
            "--config", str(config), "--device", "cpu", "-q"]
    assert histreg(args) == 2
    assert "overwrite" in capsys.readouterr().err
    assert histreg(args + ["--overwrite", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 pairs registered, 0 failed, on 1 dask workers" in out
    assert histreg(["evaluate", str(table), "-o", str(tmp_path / "ev"), "--scheduler", scheduler_address, "--config",
                 str(config), "--device", "cpu", "--status", "synthetic", "-q"]) == 0
    assert "ran on 1 dask workers" in capsys.readouterr().out
    assert (tmp_path / "ev" / "pairs.csv").exists() and (tmp_path / "ev" / "summary.json").exists()


def test_batch_table_and_connection_errors(tmp_path, table):
    bad = tmp_path / "bad.csv"
    bad.write_text("Source image,Other\na.png,b\n")
    with pytest.raises(HistRegInputError, match="Target image"):
        read_batch_table(bad)
    minimal = tmp_path / "minimal.csv"
    minimal.write_text("Source image,Target image\nsource0.png,target0.png\n")
    pairs = read_batch_table(minimal)
    assert pairs[0].source_landmarks == "" and pairs[0].folder == tmp_path
    with pytest.raises(HistRegInputError, match="cannot connect"):
        register_batch(table, tmp_path / "o", fast_config(), scheduler="tcp://127.0.0.1:9", device="cpu", timeout=2)
    assert not (tmp_path / "o").exists()


def test_register_batch_on_flat_tiffs(tmp_path, scheduler_address):
    """Flat (one-strip, uncompressed) TIFFs through the batch on a real cluster: read lazily by
    rows inside the worker, the working level computed there band by band on the local
    scheduler (benchmarks/whole_slide.py --flat measures a 30000 px one)."""
    import tifffile

    from napari_histreg.sample import make_sample_pair

    pair = make_sample_pair(0)
    for name, image in (("source.tif", pair.source), ("target.tif", pair.target)):
        big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)  # 1024 px: more rows than one chunk
        tifffile.imwrite(tmp_path / name, big)
    ids = [str(i) for i in range(len(pair.source_landmarks))]
    write_landmarks(tmp_path / "source.csv", ids, pair.source_landmarks * 2 + 0.5)
    write_landmarks(tmp_path / "target.csv", ids, pair.target_landmarks * 2 + 0.5)
    table = tmp_path / "flat.csv"
    table.write_text("Source image,Source landmarks,Target image,Target landmarks\nsource.tif,source.csv,target.tif,target.csv\n")
    rows, summary = register_batch(table, tmp_path / "out", fast_config(), device="cpu", scheduler=scheduler_address)
    assert rows[0]["error"] == "", rows[0]["error"]
    assert rows[0]["MrTRE"] < rows[0]["initial_MrTRE"]
    assert summary["threads_per_worker"] == 1
