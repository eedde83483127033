"""Network checkpoints: one small torch file that rebuilds its own network, offline.

A checkpoint is a dict saved with :func:`torch.save`::

    {"format": "napari-histreg-network", "version": 1,
     "kind": "segmentation" | "affine" | "nonrigid",
     "config": {...constructor keyword arguments...},
     "state_dict": {...float tensors...},
     "meta": {...how it was trained: command, data, steps, seconds, final loss...}}

It holds only tensors and plain values, so it loads with ``weights_only=True`` (no pickled
code runs) on any device. The shipped weights are ``napari_histreg/weights/<kind>.pt``.
"""

from __future__ import annotations

import functools
import importlib
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..io import HistRegInputError, atomic_path

FORMAT = "napari-histreg-network"
VERSION = 1

#: kind -> "module:Class" (imported on demand, so loading one network imports only its module).
NETWORK_KINDS: dict[str, str] = {
    "segmentation": "napari_histreg.networks.segmentation:TissueUNet",
    "affine": "napari_histreg.networks.affine:AffineNet",
    "nonrigid": "napari_histreg.networks.nonrigid:PatchFieldUNet",
}


class NetworkLoadError(HistRegInputError):
    """A weights file is missing, unreadable, or not a napari-histreg network of the expected kind."""


def network_class(kind: str) -> type[nn.Module]:
    if kind not in NETWORK_KINDS:
        raise NetworkLoadError(f"unknown network kind {kind!r}; expected one of {', '.join(NETWORK_KINDS)}")
    module_name, class_name = NETWORK_KINDS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_network(kind: str, config: dict | None = None) -> nn.Module:
    """A fresh (untrained) network of ``kind`` from its constructor keyword arguments."""
    return network_class(kind)(**(config or {}))


def shipped_weights_path(kind: str) -> Path:
    """Where the weights of ``kind`` ship inside the installed package (may not exist)."""
    network_class(kind)  # validates the kind
    return Path(str(resources.files("napari_histreg") / "weights" / f"{kind}.pt"))


def save_network(model: nn.Module, path, meta: dict | None = None) -> Path:
    """Write ``model`` (which must have ``.kind`` and ``.config``) to ``path`` atomically."""
    checkpoint = {
        "format": FORMAT,
        "version": VERSION,
        "kind": model.kind,
        "config": dict(model.config),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return path


def read_checkpoint(path) -> dict:
    """The checkpoint dict of ``path``, validated; raises :class:`NetworkLoadError`."""
    path = Path(path)
    if not path.exists():
        raise NetworkLoadError(f"{path}: weights file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise NetworkLoadError(f"{path}: not a readable torch weights file ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise NetworkLoadError(f"{path}: not a napari-histreg network checkpoint")
    if checkpoint.get("version", 0) > VERSION:
        raise NetworkLoadError(f"{path}: checkpoint version {checkpoint['version']} is newer than this napari-histreg reads ({VERSION})")
    return checkpoint


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a network checkpoint written by this package (an output that
    ``histreg train --overwrite`` may replace)."""
    try:
        read_checkpoint(path)
    except NetworkLoadError:
        return False
    return True


def load_network(weights, kind: str | None = None, device=None) -> nn.Module:
    """Rebuild a network from a checkpoint, in eval mode, on ``device``.

    ``weights``: a path, or a kind name (``"affine"``...) for the shipped weights. ``kind``:
    the expected kind (a clear error when the file holds another one).
    """
    if kind is not None:
        network_class(kind)  # an unknown expected kind is the caller's error, named as such
    shipped = _shipped_kind(weights)
    path = _weights_file(weights)
    if shipped is not None:
        kind = kind or shipped
        if not path.exists():
            raise NetworkLoadError(
                f"no shipped {shipped} weights in this installation ({path}); train them with "
                f"`histreg train {shipped} --data DIR -o {path.name}` and pass the file"
            )
    checkpoint = read_checkpoint(path)
    if kind is not None and checkpoint["kind"] != kind:
        raise NetworkLoadError(f"{path}: holds the {checkpoint['kind']} network, expected the {kind} network")
    # The layers' random initialisation is overwritten by the weights at once: drawn from a forked
    # generator, so that loading a network leaves the caller's torch random state as it was.
    with torch.random.fork_rng(devices=[]):
        model = build_network(checkpoint["kind"], checkpoint["config"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise NetworkLoadError(f"{path}: weights do not fit the {checkpoint['kind']} network ({str(err).splitlines()[0]})") from None
    model.meta = checkpoint.get("meta", {})
    return model.to(device or "cpu").eval()


def _shipped_kind(weights) -> str | None:
    """The kind whose shipped weights ``weights`` names (a kind name that is no existing file)."""
    name = str(weights)
    return name if name in NETWORK_KINDS and not Path(name).exists() else None


def _weights_file(weights) -> Path:
    """The file ``weights`` (a path or a kind name, see :func:`load_network`) stands for."""
    shipped = _shipped_kind(weights)
    return shipped_weights_path(shipped) if shipped is not None else Path(weights)


@functools.lru_cache(maxsize=16)
def _cached(weights: str, kind: str, device: str, stamp: int) -> nn.Module:
    model = load_network(weights, kind=kind, device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def cached_network(weights, kind: str, device=None) -> nn.Module:
    """:func:`load_network` once per ``(weights, kind, device)`` and file modification time (a
    retrained file is read again): what the stages call for every pair. Eval mode, no
    gradients; shared, so do not train it (use :func:`load_network` for that)."""
    try:
        stamp = _weights_file(weights).stat().st_mtime_ns
    except OSError:
        stamp = -1  # missing: load_network raises its clear error
    return _cached(str(weights), kind, str(torch.device(device or "cpu")), stamp)


cached_network.cache_clear = _cached.cache_clear  # type: ignore[attr-defined]
cached_network.cache_info = _cached.cache_info  # type: ignore[attr-defined]
