"""Shared fixtures: where the real data lives, and a fast configuration for tests."""

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
