"""``histreg train``: the networks from images (no landmarks)."""

from __future__ import annotations

from pathlib import Path

from .common import (
    EXIT_OK,
    _add_overwrite_option,
    _add_threads_option,
    _device,
    _positive_int,
    _say,
)

# --------------------------------------------------------------------------- training
TRAIN_KINDS = ("segmentation", "affine", "nonrigid")


def _add_train_command(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a network from images (no landmarks)",
        description="Train one network of the learned pipeline and write its weights file (a small torch file that "
        "rebuilds the network; pass it with --config or copy it over the shipped one). Training reads only images: "
        "every image under DIR (or named by a cover table's 'Source image'/'Target image' columns; landmark columns "
        "are never read), grouped by folder (images in one folder are sections of one tissue block and are paired "
        "across stains), plus scikit-image's immunohistochemistry image split into two stains, and synthetic pairs "
        "(random affine + smooth elastic warps, stain and intensity jitter). Seeded; every few steps a resumable "
        "state WEIGHTS.state is saved, which --resume continues.",
        epilog="example: histreg train nonrigid --data ../shared/data -o nonrigid.pt",
    )
    p.add_argument("kind", choices=TRAIN_KINDS, help="which network")
    p.add_argument("--data", default=None, metavar="DIR_OR_CSV",
                   help="folder of images or ANHIR cover table (default: scikit-image's images only)")
    p.add_argument("-o", "--output", required=True, metavar="WEIGHTS", help="weights file to write (.pt)")
    p.add_argument("--steps", type=_positive_int, default=None, metavar="N", help="optimiser steps (default: per network)")
    p.add_argument("--lr", type=float, default=None, metavar="X", help="Adam learning rate at the start (default: per network)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from WEIGHTS.state if it exists")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="where to train: auto picks cuda, then mps, then cpu (default: auto)")
    p.add_argument("--no-skimage", action="store_true", help="do not add scikit-image's images to the data")
    p.add_argument("--renderings", choices=("basic", "wide"), default=None,
                   help="affine and nonrigid: self-pair renderings; wide adds CLAHE, pale and dark stainings "
                        "(and for affine stretched residuals and inner-crop views) (default: the network's)")
    _add_overwrite_option(p, "weights file")
    _add_threads_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import dataclasses
    import importlib
    import time

    from ..io import HistRegInputError
    from ..networks.checkpoint import is_checkpoint
    from ..outputs import check_output_file
    from ..threads import choose_threads

    out = Path(args.output)
    if args.data is not None and not Path(args.data).exists():
        raise HistRegInputError(f"{args.data}: training data not found")
    if args.lr is not None and not args.lr > 0:
        raise HistRegInputError(f"--lr must be positive, not {args.lr}")
    check_output_file(out, inputs=[args.data], overwrite=args.overwrite, is_ours=is_checkpoint, what="weights file")
    import torch

    torch.set_num_threads(choose_threads(args.threads))
    module = importlib.import_module(f"napari_histreg.training.{args.kind}")
    trainer = getattr(module, f"train_{args.kind}")
    options = dataclasses.replace(module.DEFAULT_OPTIONS, seed=args.seed, resume=args.resume, progress=not args.quiet)
    if args.steps is not None:
        options.steps = args.steps
    if args.lr is not None:
        options.learning_rate = args.lr
    if args.data is None and args.no_skimage:
        raise HistRegInputError("no training data: give --data or drop --no-skimage")
    started = time.perf_counter()
    extra = {}
    if args.renderings is not None:
        if args.kind == "segmentation":
            raise HistRegInputError("--renderings applies to the affine and nonrigid networks, not segmentation")
        extra["renderings"] = args.renderings
    report = trainer(args.data, out, options, _device(args), include_skimage=not args.no_skimage, **extra)
    _say(f"trained {args.kind} network: {report.steps} steps in {time.perf_counter() - started:.0f} s, "
         f"final loss {report.final_loss:.4f}; weights in {out}")
    return EXIT_OK

