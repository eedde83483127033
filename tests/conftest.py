"""Shared fixtures: where the real data lives, and the images of the stage tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # One torch thread for the whole suite: on a 2-core machine that is busy with anything
    # else, torch's intra-op threads spin against each other and two threads run several times
    # slower than one; with one, test times stay predictable on CI.
    # HISTREG_THREADS is what register(), the CLI and the widgets read when no thread count is
    # given, so the suite does not depend on how busy the machine is.
    os.environ.setdefault("HISTREG_THREADS", "1")
    # the package first, as a user's program would: it sets libgomp's spin count and wait
    # policy, which only take effect before torch is imported (napari_histreg.threads)
    import napari_histreg  # noqa: F401
    import torch

    torch.set_num_threads(1)


def find_shared_data() -> Path | None:
    """``$HISTREG_DATA`` or ``../shared/data`` beside the repository, if it holds dataset.csv."""
    candidates = [os.environ.get("HISTREG_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "dataset.csv").exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = find_shared_data()
    if path is None:
        pytest.skip("real histology data not found: set HISTREG_DATA or place it at ../shared/data")
    return path


@pytest.fixture(scope="session")
def validation():
    """``benchmarks/validation.py`` as a module: the landmark-free validation set's pairs and scoring."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import validation
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return validation


# ---------------------------------------------------------------- the stage tests' images
@pytest.fixture(scope="session")
def stains():
    """The same tissue section in two stains, exactly aligned, on white glass (uint8 RGB)."""
    from types import SimpleNamespace

    import numpy as np

    from napari_histreg import sample as sample_module

    rng = np.random.default_rng(0)
    haem, dab = sample_module._stains()
    soft = sample_module._tissue_outline(haem.shape, rng)
    return SimpleNamespace(
        h=sample_module._render(soft, h=1.5 * haem),
        dab=sample_module._render(soft, h=haem, d=dab),
        outline=soft > 0.5,
    )


@pytest.fixture(scope="session")
def stains_working(stains):
    """Working images (256) of the two stains: ``source`` = DAB, ``target`` = H."""
    from napari_histreg.stages.preprocess import preprocess_pair
    from stage_data import SMALL

    return preprocess_pair(stains.dab, stains.h, SMALL)


@pytest.fixture(scope="session")
def kidney(shared_data):
    """The rat kidney pair of ``../shared/data``: PanCytokeratin (source) onto H&E, landmarks paired."""
    from types import SimpleNamespace

    from napari_histreg.io import pair_landmarks, read_image, read_landmarks

    folder = shared_data / "rat-kidney"
    source = read_image(folder / "Rat-Kidney_PanCytokeratin.jpg")
    target = read_image(folder / "Rat-Kidney_HE.jpg")
    ids, source_lm, target_lm = pair_landmarks(
        *read_landmarks(folder / "Rat-Kidney_PanCytokeratin.csv"), *read_landmarks(folder / "Rat-Kidney_HE.csv")
    )
    return SimpleNamespace(source=source, target=target, source_lm=source_lm, target_lm=target_lm, ids=ids)


@pytest.fixture(scope="session")
def kidney_working(kidney):
    from napari_histreg.stages.preprocess import preprocess_pair
    from stage_data import SMALL

    return preprocess_pair(kidney.source, kidney.target, SMALL)


@pytest.fixture
def cover_table(shared_data, tmp_path):
    """An ANHIR cover table of three pairs: the rat kidney (training), a synthetic pair and a
    synthetic pair whose source is missing (to be recorded as failed)."""
    import csv

    path = tmp_path / "cover.csv"
    kidney = ("rat-kidney", "Rat-Kidney_PanCytokeratin", "Rat-Kidney_HE")
    d = shared_data
    rows = [
        ("Source image", "Source landmarks", "Target image", "Target landmarks", "status"),
        (d / kidney[0] / f"{kidney[1]}.jpg", d / kidney[0] / f"{kidney[1]}.csv", d / kidney[0] / f"{kidney[2]}.jpg",
         d / kidney[0] / f"{kidney[2]}.csv", "training"),
        (d / "synthetic" / "artificial_moving-affine.jpg", d / "synthetic" / "artificial_moving-affine.csv",
         d / "synthetic" / "artificial_reference.jpg", d / "synthetic" / "artificial_reference.csv", "synthetic"),
        ("missing/moving.jpg", "missing/moving.csv", d / "synthetic" / "artificial_reference.jpg",
         d / "synthetic" / "artificial_reference.csv", "synthetic"),
    ]
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path
