"""Every setting of a registration, and the one way each front end builds them.

:class:`RegistrationConfig` nests the stages' own config dataclasses. The CLI (``--config
FILE`` and its flags), the napari widgets (their few knobs), the benchmarks (a method's JSON
overrides) and scripts all go through :func:`build_config`, which applies, in order, a JSON
file, a dict of overrides and the named knobs; :meth:`RegistrationConfig.with_overrides`
checks every name and value type, so a typo in a JSON file is an error that names it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from .io import HistRegInputError
from .stages.affine import AffineConfig, LearnedAffineConfig
from .stages.initial import InitialAlignmentConfig
from .stages.learned_nonrigid import LearnedNonrigidConfig
from .stages.mask import OtsuMaskConfig
from .stages.nonrigid import DenseConfig, PatchConfig
from .stages.preprocess import REPRESENTATIONS, PreprocessConfig
from .stages.segment import UNetMaskConfig

MODES = ("optimise", "learned", "hybrid")
MASK_METHODS = ("otsu", "unet")
NONRIGID_METHODS = ("dense", "patches", "none")


def _hybrid_affine_config():
    return AffineConfig(levels=(256, 384), iterations=(20, 15))


@dataclasses.dataclass
class RegistrationConfig:
    """Every parameter of the pipeline.

    ``mode``: ``"optimise"``, ``"learned"`` or ``"hybrid"`` (see :mod:`napari_histreg.pipeline`).
    ``nonrigid_method``: ``"none"`` skips the non-rigid stage in every mode; otherwise, for
    the optimisation (``optimise`` mode, and the refinement of ``hybrid``), ``"dense"``
    optimises a dense field and ``"patches"`` runs the patch-group engine with per-patch
    optimisation. ``use_mask`` sets the background outside the tissue mask to 0, the mask
    coming from ``mask_method`` (``"otsu"`` or the ``"unet"`` network); ``use_initial`` /
    ``use_affine`` switch those stages off when False. ``hybrid_affine`` / ``hybrid_dense``
    are the optimisations that follow the networks in ``hybrid`` mode."""

    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    mask: OtsuMaskConfig = dataclasses.field(default_factory=OtsuMaskConfig)
    initial: InitialAlignmentConfig = dataclasses.field(default_factory=InitialAlignmentConfig)
    affine: AffineConfig = dataclasses.field(default_factory=AffineConfig)
    dense: DenseConfig = dataclasses.field(default_factory=DenseConfig)
    patches: PatchConfig = dataclasses.field(default_factory=PatchConfig)
    segmentation: UNetMaskConfig = dataclasses.field(default_factory=UNetMaskConfig)
    learned_affine: LearnedAffineConfig = dataclasses.field(default_factory=LearnedAffineConfig)
    learned_nonrigid: LearnedNonrigidConfig = dataclasses.field(default_factory=LearnedNonrigidConfig)
    hybrid_affine: AffineConfig = dataclasses.field(default_factory=_hybrid_affine_config)
    # The full dense schedule, like ``dense``: chosen on the landmark-free validation set
    # (benchmarks/README.md, "hybrid_dense").
    hybrid_dense: DenseConfig = dataclasses.field(default_factory=DenseConfig)
    mode: str = "hybrid"
    use_mask: bool = False
    mask_method: str = "otsu"
    use_initial: bool = True
    use_affine: bool = True
    nonrigid_method: str = "dense"
    #: keep the affine stage's start where the affine stage lowered the local NCC
    #: (:func:`napari_histreg.pipeline.affine_or_start`)
    affine_check: bool = True
    #: register a colour pair flagged ``check`` once more on the haematoxylin channel (the
    #: counterstain H&E and most IHC stains share) and keep whichever result is more confident
    #: (:meth:`napari_histreg.pipeline.Pipeline.run`)
    counterstain_retry: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> "RegistrationConfig":
        """``self``, or an input error naming a choice (mode, non-rigid method, mask method) that
        is not one of the known ones."""
        for name, value, choices in (("mode", self.mode, MODES), ("nonrigid_method", self.nonrigid_method, NONRIGID_METHODS),
                                     ("mask_method", self.mask_method, MASK_METHODS)):
            if value not in choices:
                raise HistRegInputError(f"unknown {name.replace('_', ' ')} {value!r}: {name} must be one of "
                                        f"{', '.join(map(repr, choices))}")
        if self.preprocess.representation not in REPRESENTATIONS:
            raise HistRegInputError(f"unknown representation {self.preprocess.representation!r}: preprocess.representation "
                                    f"must be one of {', '.join(map(repr, REPRESENTATIONS))}")
        return self

    @classmethod
    def from_dict(cls, settings: dict, name: str = "config") -> "RegistrationConfig":
        """The defaults with ``settings`` (a nested dict, as :meth:`to_dict` writes) applied."""
        return cls().with_overrides(settings, name)

    def with_overrides(self, overrides: dict, name: str = "config") -> "RegistrationConfig":
        """A copy with ``overrides`` applied (see :func:`apply_overrides`); ``self`` is unchanged."""
        return apply_overrides(copy.deepcopy(self), overrides, name)


def apply_overrides(config, overrides: dict, name: str = "config"):
    """Set the fields of a (nested) config dataclass from a plain dict, in place, checking the
    names and value types; lists become tuples where the default is a tuple. ``name`` (a file,
    a method) prefixes every error."""
    if not isinstance(overrides, dict):
        raise HistRegInputError(f"{name}: expected a JSON object of settings, got {type(overrides).__name__}")
    fields = {f.name for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        if key not in fields:
            raise HistRegInputError(f"{name}: unknown setting {key!r} for {type(config).__name__}; known: {sorted(fields)}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            apply_overrides(current, value, f"{name}: {key}")
            continue
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if current is not None and (type(value) is not type(current)):
            raise HistRegInputError(f"{name}: setting {key!r} should be like {current!r}, not {value!r}")
        setattr(config, key, value)
    return config


def read_config_file(path) -> dict:
    """The settings of a JSON configuration file (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise HistRegInputError(f"{path}: configuration file not found")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HistRegInputError(f"{path}: not a JSON configuration ({err})") from None


def scaled_iterations(iterations, factor: float) -> tuple[int, ...]:
    """Iterations per level times ``factor`` (at least 1 each)."""
    return tuple(max(1, int(round(i * factor))) for i in iterations)


def build_config(
    base: RegistrationConfig | None = None,
    *,
    config_file=None,
    overrides: dict | None = None,
    mode: str | None = None,
    mask: str | None = None,
    nonrigid_method: str | None = None,
    working_size: int | None = None,
    use_initial: bool | None = None,
    use_affine: bool | None = None,
    iterations_factor: float = 1.0,
    regularisation: float | None = None,
    representation: str | None = None,
) -> RegistrationConfig:
    """A new :class:`RegistrationConfig`: ``base`` (default: the defaults), then the settings of
    ``config_file``, then ``overrides``, then each named knob that is not None. ``mask``:
    ``"none"`` or a :data:`MASK_METHODS` name; ``iterations_factor`` scales every optimisation's
    iterations; ``regularisation`` sets both dense optimisations' weight; ``representation``:
    ``"grey"`` (with the counterstain retry) or ``"haematoxylin"`` (always). The result is
    :meth:`~RegistrationConfig.check` ed."""
    config = copy.deepcopy(base) if base is not None else RegistrationConfig()
    if config_file is not None:
        apply_overrides(config, read_config_file(config_file), str(config_file))
    if overrides:
        apply_overrides(config, copy.deepcopy(overrides))
    if mode is not None:
        config.mode = mode
    if nonrigid_method is not None:
        config.nonrigid_method = nonrigid_method
    if mask is not None:
        config.use_mask = mask != "none"
        if mask != "none":
            config.mask_method = mask
    if working_size:
        config.preprocess = dataclasses.replace(config.preprocess, working_size=int(working_size))
    if representation is not None:
        config.preprocess = dataclasses.replace(config.preprocess, representation=representation)
    if use_initial is not None:
        config.use_initial = bool(use_initial)
    if use_affine is not None:
        config.use_affine = bool(use_affine)
    if iterations_factor != 1.0:
        for name in ("affine", "dense", "patches", "hybrid_affine", "hybrid_dense"):
            stage = getattr(config, name)
            setattr(config, name, dataclasses.replace(stage, iterations=scaled_iterations(stage.iterations, iterations_factor)))
    if regularisation is not None:
        config.dense = dataclasses.replace(config.dense, regularisation=float(regularisation))
        config.hybrid_dense = dataclasses.replace(config.hybrid_dense, regularisation=float(regularisation))
    return config.check()
