"""``histreg register``, ``evaluate``, ``convert``, ``demo``: pairs of images in memory."""

from __future__ import annotations

from pathlib import Path

from .common import (
    EXIT_OK,
    PairProgress,
    StageProgress,
    _config,
    _device,
    _pairs_exit_code,
    _print_metrics,
    _say,
)


# --------------------------------------------------------------------------- commands
def cmd_register(args) -> int:
    from ..io import read_image
    from ..pair_outputs import register_pair
    from ..scoring import Landmarks

    source_image = read_image(args.source)
    target_image = read_image(args.target)
    source_lm = Landmarks.read(args.source_landmarks) if args.source_landmarks else None
    target_lm = Landmarks.read(args.target_landmarks) if args.target_landmarks else None
    guide = _guide(args, source_image.shape, target_image.shape)
    with StageProgress(disable=args.quiet) as progress:
        report = register_pair(
            source_image, target_image, out=args.output, source_landmarks=source_lm, target_landmarks=target_lm,
            inputs=[args.source, args.target, args.source_landmarks, args.target_landmarks, args.guide_source, args.guide_target],
            config=_config(args), device=_device(args), progress=progress, names=(args.source, args.target),
            overwrite=args.overwrite, threads=args.threads, guide=guide,
        )
    result = report["result"]
    _say(f"registered {args.source} onto {args.target} in {result.timings.get('total', 0):.1f} s on "
         f"{result.info.get('device')} ({result.info.get('threads')} thread(s))")
    if result.confidence:
        from ..confidence import describe
        from ..pipeline import describe_representation

        _say(describe(result.confidence))
        compared = describe_representation(result)
        if compared:
            _say(compared)
    if guide is not None:
        g = result.info["guide"]
        _say(f"guided by {g['points']} point pairs ({'restarted from their ' + g['model'] if g['restarted_from_points'] else 'local correction'}"
             f"): met within {g['final_max_miss_source_px']:.2f} source px")
    _print_metrics(report["metrics"])
    if report["metrics"] and report["metrics"].get("held_out"):
        _say(f"  without the guides' landmarks: MrTRE {report['metrics']['held_out']['MrTRE']:.5f}")
    _say(f"outputs in {args.output}: {', '.join(p.name for p in report['outputs'])}")
    return EXIT_OK


def _guide(args, source_shape, target_shape):
    """The guide points of ``--guide-source`` / ``--guide-target`` (ANHIR CSVs, paired by id),
    or None; one without the other is a bad input."""
    from ..io import HistRegInputError
    from ..scoring import LandmarkPair, Landmarks

    given = [bool(getattr(args, "guide_source", None)), bool(getattr(args, "guide_target", None))]
    if not any(given):
        return None
    if not all(given):
        raise HistRegInputError("--guide-source and --guide-target: give both (the points of each image, paired by id)")
    source, target = Landmarks.read(args.guide_source), Landmarks.read(args.guide_target)
    source.check_inside(source_shape)
    return LandmarkPair.from_landmarks(source, target, target_shape)


def cmd_evaluate(args) -> int:
    from ..evaluate import evaluate_table, format_table

    with PairProgress(disable=args.quiet) as progress:
        rows, summary = evaluate_table(
            args.table, args.output, statuses=args.status, config=_config(args), device=_device(args),
            progress=progress, limit=args.limit, overwrite=args.overwrite, threads=args.threads,
        )
    _say(format_table(rows, summary))
    _say(f"\nwritten {Path(args.output) / 'pairs.csv'} and {Path(args.output) / 'summary.json'}")
    return _pairs_exit_code(rows)


def cmd_convert(args) -> int:
    from ..io import HistRegInputError, read_image, write_mha
    from ..outputs import check_output_folder, staged_outputs

    out = Path(args.output)
    targets = {}
    for name in args.inputs:
        dest = out / (Path(name).stem + ".mha")
        if dest in targets.values():
            raise HistRegInputError(f"{name}: another input also converts to {dest.name}; convert them into separate folders")
        targets[name] = dest
    check_output_folder(out, inputs=args.inputs, overwrite=args.overwrite)
    images = {name: read_image(name) for name in args.inputs}  # every input is checked before anything is written
    with staged_outputs(out, inputs=args.inputs, overwrite=args.overwrite, command="convert") as stage:
        for name, image in images.items():
            write_mha(stage / targets[name].name, image, vector=image.ndim == 3)
    for name, dest in targets.items():
        image = images[name]
        kind = f"{image.shape[-1]}-component vector" if image.ndim == 3 else "scalar"
        _say(f"{name} -> {dest} ({image.shape[1]}x{image.shape[0]}, {image.dtype}, {kind})")
    return EXIT_OK


def cmd_demo(args) -> int:
    import numpy as np

    from ..io import HistRegInputError

    try:
        from ..sample import make_sample_pair
    except ImportError as err:
        raise HistRegInputError(f"napari_histreg.sample: the bundled sample pair is not available ({err})") from None
    from ..pair_outputs import register_pair
    from ..scoring import Landmarks

    pair = make_sample_pair()
    ids = getattr(pair, "ids", None)
    ids = np.asarray(list(ids if ids is not None else range(len(pair.source_landmarks))), dtype=object)
    with StageProgress(disable=args.quiet) as progress:
        report = register_pair(
            pair.source, pair.target, out=args.output,
            source_landmarks=Landmarks("sample source landmarks", ids, pair.source_landmarks),
            target_landmarks=Landmarks("sample target landmarks", ids, pair.target_landmarks),
            config=_config(args), device=_device(args), progress=progress,
            names=("sample source", "sample target"), overwrite=args.overwrite, threads=args.threads, command="demo",
        )
    m = report["metrics"]
    info = report["result"].info
    _say(f"sample pair {pair.source.shape[1]}x{pair.source.shape[0]} -> {pair.target.shape[1]}x{pair.target.shape[0]}, "
         f"registered in {report['result'].timings.get('total', 0):.1f} s on {info.get('device')} "
         f"({info.get('threads')} thread(s))")
    _say(f"median rTRE before: {m['initial_MrTRE']:.5f}")
    _say(f"median rTRE after:  {m['MrTRE']:.5f}")
    if args.output:
        _say(f"outputs in {args.output}: {', '.join(p.name for p in report['outputs'])}")
    return EXIT_OK


