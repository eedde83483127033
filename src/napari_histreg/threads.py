"""How many threads torch may use: derived from the cores this process may use and how busy they are.

Why this module exists: torch's CPU kernels run on OpenMP threads that spin while they wait for
each other. When another program keeps a core busy, a thread that is descheduled holds up its
partner at every parallel region, and two threads on a 2-core machine ran the demo 3.6x slower
than one (and 20-40x on a machine busier still; ``benchmarks/threads.py`` measures it). So the
choice is made from what is free *now*:

* :func:`usable_cores`: the CPUs this process may run on (its affinity mask, and a cgroup CPU
  quota where one is set, as in containers);
* :func:`choose_threads`: those cores minus the ones other processes kept busy since the last
  look (``/proc/stat`` minus this process's own CPU time; the load average elsewhere), at
  least 1. An explicit number (``--threads N``, ``threads=N``) or ``$HISTREG_THREADS`` wins.

A busy core that only appears during a run cannot be foreseen: for that case the package
lowers libgomp's spin count (``GOMP_SPINCOUNT``, see :func:`limit_spinning`), which halves the
cost of contention without slowing a quiet machine, and softens the cost of torch running on two
OS threads, each with its own OpenMP team (``OMP_WAIT_POLICY``). What runs on napari's GUI thread
uses one torch thread (:func:`on_one_thread`), so that a registration in the widgets' worker thread
is the process's only team.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import time

ENV = "HISTREG_THREADS"
#: libgomp's spin count before a waiting thread sleeps. Its default (300 000 when no wait
#: policy is set) burns a contended core; 10 000 measured the same quiet time as the default
#: and 1.8x less time beside a busy process (benchmarks/threads.py), 1 000 slowed quiet runs.
SPINCOUNT = "10000"
#: libgomp's wait policy. Set to ``active`` only for what it does beside ``GOMP_SPINCOUNT``: the
#: spin count of a process holding more OpenMP threads than cores (the "throttled" count) goes from
#: 100 to 1 000. A process where torch runs on two OS threads (napari's worker thread beside the
#: GUI thread, or ``register`` on a Python thread) has one OpenMP team per thread, so on 2 cores it
#: was always "throttled": the same registration took 2.3x longer on a worker thread than on the
#: main thread (the dense non-rigid stage's small kernels wait at every parallel region); with
#: ``active`` still 1.15-1.5x (README, "Threads on a busy machine"), which is why the GUI thread
#: keeps no team (:func:`on_one_thread`). With ``GOMP_SPINCOUNT`` set the main spin count stays
#: 10 000: an idle thread still sleeps after it.
WAIT_POLICY = "active"
_FRESH = 30.0  # seconds: a previous look older than this is not used
_MIN_INTERVAL = 0.1  # seconds of observation needed to judge the load


def limit_spinning() -> None:
    """Set ``GOMP_SPINCOUNT`` (:data:`SPINCOUNT`) and ``OMP_WAIT_POLICY`` (:data:`WAIT_POLICY`)
    unless the user set either; only effective before torch is imported, which is why the package
    calls it first."""
    if "torch" in sys.modules:
        return
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cfs_quota_us``) quota, if any."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = _read("/sys/fs/cgroup/cpu.max").split()[:2]
        return None if quota == "max" else float(quota) / float(period)
    with contextlib.suppress(OSError, ValueError):
        quota = float(_read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"))
        period = float(_read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
        return None if quota <= 0 else quota / period
    return None


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """Machine-wide busy CPU seconds, this process's CPU seconds and the wall clock, at one time."""

    busy: float | None  # None where /proc/stat is not available
    own: float
    wall: float


def _proc_stat_busy() -> float | None:
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time
    total = sum(ticks[:8])
    return (total - idle) / float(os.sysconf("SC_CLK_TCK"))


def sample() -> CpuSample:
    times = os.times()
    return CpuSample(_proc_stat_busy(), times.user + times.system, time.monotonic())


def busy_elsewhere(since: CpuSample, now: CpuSample | None = None) -> float:
    """Cores kept busy by *other* processes between ``since`` and ``now``."""
    now = now or sample()
    interval = now.wall - since.wall
    if now.busy is None or since.busy is None or interval <= 0:
        with contextlib.suppress(AttributeError, OSError):
            return max(0.0, os.getloadavg()[0] - 1.0)  # our own process counts in the load
        return 0.0
    others = max(0.0, (now.busy - since.busy) - (now.own - since.own)) / interval
    # /proc/stat counts every CPU of the machine; where this process may use fewer (a container
    # quota, an affinity mask), count the others' load in proportion
    machine, usable = _machine_cpus(), usable_cores()
    if machine > usable:
        others *= usable / machine
    return others


def _machine_cpus() -> int:
    try:
        with open("/proc/stat") as handle:
            return max(1, sum(1 for line in handle if line.startswith("cpu") and line[3:4].isdigit()))
    except OSError:
        return os.cpu_count() or 1


_last: CpuSample | None = sample()  # taken when the package is imported (before torch)


def threads_from_load(cores: int, busy: float) -> int:
    """Threads for ``cores`` usable cores of which ``busy`` are kept busy by others: the free
    ones, a core at least half free counting as free, at least one."""
    return max(1, min(cores, int(math.floor(cores - busy + 0.5))))


def requested_threads(requested=None) -> int | None:
    """The explicit choice, if any: ``requested`` (a positive int; ``None``, 0 or ``"auto"``
    for none), else ``$HISTREG_THREADS``. A bad value raises ``ValueError`` naming it."""
    for value, source in ((requested, "threads"), (os.environ.get(ENV), f"${ENV}")):
        if value is None or value == "" or value == "auto" or value == 0:
            continue
        try:
            number = int(str(value).strip())  # "2.5" and 2.5 are refused, not truncated
        except (TypeError, ValueError):
            raise ValueError(f"{source} must be a positive number of threads or 'auto', not {value!r}") from None
        if number <= 0:
            raise ValueError(f"{source} must be a positive number of threads or 'auto', not {value!r}")
        return number
    return None


def choose_threads(requested=None) -> int:
    """Threads for the next computation: ``requested`` or ``$HISTREG_THREADS`` when given
    (see :func:`requested_threads`), otherwise the usable cores not kept busy by other
    processes since the last look (taken at import, or by the previous call; a look older than
    30 s is replaced by a fresh 0.1 s one)."""
    explicit = requested_threads(requested)
    return explicit if explicit is not None else free_cores()


def free_cores() -> int:
    """The usable cores not kept busy by other processes since the last look (see
    :func:`choose_threads`), at least 1."""
    global _last
    now = sample()
    since = _last
    if since is None or now.wall - since.wall > _FRESH:
        since = now
    if now.wall - since.wall < _MIN_INTERVAL:
        time.sleep(_MIN_INTERVAL - (now.wall - since.wall))
        now = sample()
    _last = now
    return threads_from_load(usable_cores(), busy_elsewhere(since, now))


@contextlib.contextmanager
def torch_threads(requested=None):
    """Run the block with :func:`choose_threads` torch threads; the previous setting is
    restored afterwards. Yields the number used."""
    import torch

    number = choose_threads(requested)
    previous = torch.get_num_threads()
    if number != previous:
        torch.set_num_threads(number)
    try:
        yield number
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def on_one_thread(function):
    """Decorate ``function`` to run its torch work on one thread (the previous count restored).

    For what runs on napari's GUI thread (the sample, a widget's preparation and hand-over of a
    result). libgomp keeps a team of helper threads for every thread that has run a parallel
    region, and once a process holds more of them than cores it "throttles" them all: a waiting
    thread sleeps after 1 000 spins instead of 10 000 (:data:`WAIT_POLICY`), and the dense stage's
    small kernels then wake it at every step. A GUI thread that had built the sample on two
    threads left such a team behind, and every registration in the widget's worker thread ran
    15-50% slower than with no other team (README, "Threads on a busy machine"). On one thread
    torch opens no parallel region, so no team is left; the work here is small."""

    @functools.wraps(function)
    def one_thread(*args, **kwargs):
        with torch_threads(1):
            return function(*args, **kwargs)

    return one_thread


def default_workers(limit: int = 4) -> int:
    """Worker processes for a local dask cluster: one per free usable core, at most ``limit``."""
    return max(1, min(limit, free_cores()))
