"""The dock widgets (magicgui containers; the viewer is injected by napari)."""

from .guided import GuidedWidget
from .landmarks import LandmarksWidget
from .register import RegisterWidget
from .stages import AffineWidget, InitialAlignmentWidget, NonrigidWidget, PreprocessWidget
from .transforms import TransformsWidget

__all__ = [
    "AffineWidget",
    "GuidedWidget",
    "InitialAlignmentWidget",
    "LandmarksWidget",
    "NonrigidWidget",
    "PreprocessWidget",
    "RegisterWidget",
    "TransformsWidget",
]
