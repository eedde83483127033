"""The thread choice (napari_histreg.threads): derived from the usable cores and from what other
processes keep busy; explicit choices win. Timings are measured by benchmarks/threads.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from napari_histreg import threads as T
from console import histreg


def test_threads_from_load():
    assert T.threads_from_load(2, 0.02) == 2  # quiet
    assert T.threads_from_load(2, 1.0) == 1  # one core busy elsewhere
    assert T.threads_from_load(2, 2.0) == 1  # never below one
    assert T.threads_from_load(8, 2.6) == 5
    assert T.threads_from_load(8, 2.4) == 6  # a core at least half free counts
    assert T.threads_from_load(4, 0.0) == 4


def test_explicit_choices_win(monkeypatch):
    monkeypatch.setenv(T.ENV, "3")
    assert T.choose_threads() == 3
    assert T.choose_threads(5) == 5
    assert T.choose_threads("auto") == 3
    monkeypatch.setenv(T.ENV, "auto")
    assert 1 <= T.choose_threads() <= T.usable_cores()
    for bad in (-1, "many", 2.5):
        with pytest.raises(ValueError, match="positive number of threads"):
            T.requested_threads(bad)
    monkeypatch.setenv(T.ENV, "zero")
    with pytest.raises(ValueError, match="HISTREG_THREADS"):
        T.choose_threads()


def test_usable_cores_follow_the_affinity_mask():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity masks on this platform")
    cores = os.sched_getaffinity(0)
    code = (
        "import os, napari_histreg.threads as T; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "print(T.usable_cores())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
    assert 1 <= T.usable_cores() <= len(cores)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the load of other processes is read from /proc/stat")
def test_a_busy_process_beside_is_seen_and_our_own_work_is_not():
    cores = T.usable_cores()
    start = T.sample()
    time.sleep(0.4)
    baseline = T.busy_elsewhere(start)  # whatever else this machine is doing
    # our own work between two looks does not count as load...
    start = T.sample()
    deadline = time.monotonic() + 0.5
    x = 0
    while time.monotonic() < deadline:
        x += 1
    assert T.busy_elsewhere(start) < baseline + 0.5
    # ...a CPU-bound process beside us does
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        start = T.sample()
        time.sleep(0.6)
        busy = T.busy_elsewhere(start)
    finally:
        hog.kill()
        hog.wait()
    assert busy >= min(cores, baseline + 0.6) - 0.15, (busy, baseline)
    if baseline < 0.3 and cores == 2:  # a quiet 2-core machine: one thread beside the hog
        assert T.threads_from_load(cores, busy) == 1


def test_torch_threads_are_restored(monkeypatch):
    monkeypatch.setenv(T.ENV, "1")
    previous = torch.get_num_threads()
    with T.torch_threads(2) as n:
        assert n == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == previous


def test_the_cli_records_its_thread_choice(tmp_path, capsys):
    out = tmp_path / "demo"
    config = tmp_path / "fast.json"
    config.write_text('{"affine": {"levels": [64], "iterations": [5]}, "dense": {"levels": [64], "iterations": [3]}}')
    assert histreg(["demo", "-o", str(out), "--threads", "1", "--config", str(config), "--working-size", "96", "-q"]) == 0
    assert "(1 thread(s))" in capsys.readouterr().out
    import json

    assert json.loads((out / "metrics.json").read_text())["threads"] == 1
    with pytest.raises(SystemExit) as info:
        histreg(["demo", "--threads", "0"])
    assert info.value.code == 2


_TEAM_PROBE = """
import os, sys
import napari_histreg, torch
from napari_histreg.sample import make_sample_pair
from napari_histreg.threads import on_one_thread

def threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(2)
before = threads()
make_sample_pair()  # what napari's GUI thread runs for File > Open Sample
after_sample = threads()

@on_one_thread
def work():
    return float((torch.ones(4000, 1000) * 2).sum())

work()
after_decorated = threads()
assert torch.get_num_threads() == 2, torch.get_num_threads()
(torch.ones(4000, 1000) * 2).sum()  # the same work on two threads: libgomp starts a helper
print(before, after_sample, after_decorated, threads())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or T.usable_cores() < 2,
                    reason="counts OS threads in /proc/self/task; needs two usable cores for an OpenMP team")
def test_the_gui_threads_work_leaves_no_openmp_team():
    """What runs on napari's GUI thread (the sample, a widget's preparation and hand-over) runs
    torch on one thread, so that thread keeps no OpenMP team: a second team (the worker's) would
    throttle both, and the widget's registrations ran 15-50% slower (threads.on_one_thread)."""
    env = {**os.environ, T.ENV: "2"}
    out = subprocess.run([sys.executable, "-c", _TEAM_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after_sample, after_decorated, after_parallel = map(int, out.stdout.split())
    assert after_sample == before, "building the sample left OpenMP helper threads on the calling thread"
    assert after_decorated == before, "on_one_thread work left OpenMP helper threads"
    assert after_parallel > before  # the probe sees a team when one is made
