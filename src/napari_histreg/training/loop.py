"""A seeded, resumable training loop shared by the three networks.

* Deterministic: step ``k`` draws its batch from ``numpy.random.default_rng([seed, k])``, so a
  run resumed at step ``k`` sees exactly the samples an uninterrupted run would. The network
  arrives built: each trainer builds it under ``torch.manual_seed(seed)``.
* Resumable: every ``checkpoint_every`` steps the model, optimiser, step and loss history go
  atomically to ``<weights>.state``; ``resume=True`` continues from it. The final weights
  (model only, small) go atomically to ``<weights>`` with a ``meta`` record of how they were
  made, and the state file is removed.
* Adam with a cosine learning-rate decay to a tenth, recomputed from the step (no scheduler
  state to save).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..io import atomic_path
from ..networks.checkpoint import save_network


@dataclasses.dataclass
class TrainOptions:
    """``steps``: optimiser steps in total; ``learning_rate``: Adam's at step 0 (cosine decay
    to a tenth at the end); ``checkpoint_every``: steps between resumable state saves."""

    steps: int = 1000
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    resume: bool = False
    progress: bool = True


@dataclasses.dataclass
class TrainReport:
    weights: Path
    steps: int
    seconds: float
    losses: list[float]

    @property
    def final_loss(self) -> float:
        """Mean loss of the last tenth of the steps (nan without steps)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return float(np.mean(tail)) if tail else float("nan")


def state_path(weights) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.name + ".state")


def reproducing_command(kind: str, data, weights, options: "TrainOptions", include_skimage: bool = True,
                        renderings: str | None = None) -> str:
    """The ``histreg train`` command line that repeats a run (recorded in the weights' meta):
    the same network, data, steps, learning rate, seed and renderings."""
    parts = ["histreg train", kind]
    if isinstance(data, (str, Path)):
        parts += ["--data", str(data)]
    parts += ["-o", Path(weights).name, "--steps", str(options.steps), "--lr", f"{options.learning_rate:g}",
              "--seed", str(options.seed)]
    if not include_skimage:
        parts.append("--no-skimage")
    if renderings is not None:
        parts += ["--renderings", renderings]
    return " ".join(parts)


def train(
    model: nn.Module,
    batch_fn: Callable[[np.random.Generator, int], object],
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    weights,
    options: TrainOptions,
    device=None,
    meta: dict | None = None,
    description: str = "train",
) -> TrainReport:
    """Optimise ``model`` on ``loss_fn(model, batch_fn(rng, step))`` and save it to ``weights``.

    ``batch_fn`` builds a batch (on ``device``) from the step's generator; ``loss_fn`` returns
    a scalar loss. Returns the loss history and the time taken (this run's part, plus the
    earlier parts of a resumed run).
    """
    device = torch.device(device or "cpu")
    weights = Path(weights)
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    start_step, losses, seconds_before = 0, [], 0.0
    state_file = state_path(weights)
    if options.resume and state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        start_step, losses, seconds_before = int(state["step"]), list(state["losses"]), float(state["seconds"])
    elif options.resume:
        print(f"no training state at {state_file}: starting from step 0", file=sys.stderr)

    def learning_rate(step: int) -> float:
        progress = step / max(1, options.steps - 1)
        return options.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def save_state(step: int, seconds: float) -> None:
        with atomic_path(state_file) as tmp:
            torch.save(
                {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step, "losses": losses, "seconds": seconds},
                tmp,
            )

    bar = None
    if options.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=options.steps, initial=start_step, desc=description, unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    running = None
    try:
        for step in range(start_step, options.steps):
            rng = np.random.default_rng([options.seed, step])
            batch = batch_fn(rng, step)
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(step)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{description}: loss is {float(loss)} at step {step}; lower the learning rate")
            loss.backward()
            optimiser.step()
            value = float(loss.detach())
            losses.append(value)
            running = value if running is None else 0.95 * running + 0.05 * value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
            done = step + 1
            if done % options.checkpoint_every == 0 and done < options.steps:
                save_state(done, seconds_before + time.perf_counter() - started)
    finally:
        if bar is not None:
            bar.close()
    report = TrainReport(weights, options.steps, seconds_before + time.perf_counter() - started, losses)
    model.eval()
    record = {
        "steps": options.steps,
        "seed": options.seed,
        "learning_rate": options.learning_rate,
        "seconds": round(report.seconds, 1),
        "final_loss": report.final_loss if losses else None,
        "torch": str(torch.__version__),
        "device": str(device),
    }
    record.update(meta or {})
    save_network(model, weights, record)
    state_file.unlink(missing_ok=True)
    return report
