"""``python -m napari_histreg.cli``: the ``histreg`` command."""

import sys

from . import main

sys.exit(main())
