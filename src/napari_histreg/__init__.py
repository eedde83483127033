"""napari-histreg: unsupervised registration of consecutive histology sections.

``from napari_histreg import register`` gives the whole pipeline on numpy arrays or paths.
Importing this package does not import napari or Qt.
"""

from . import threads as _threads

_threads.limit_spinning()  # before torch is imported (see napari_histreg.threads)


from .conventions import Frame
from .pipeline import Pipeline, RegistrationConfig, register
from .progress import ProgressEvent, RegistrationCancelled
from .result import RegistrationResult

__version__ = "0.1.0"
__all__ = ["Frame", "Pipeline", "ProgressEvent", "RegistrationCancelled", "RegistrationConfig", "RegistrationResult", "register"]
