"""``python -m fltfuse``: the same as the ``fltfuse`` command."""

import sys

from .cli import main

sys.exit(main())
