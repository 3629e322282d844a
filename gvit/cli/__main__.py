"""``python -m gvit.cli``: the ``gvit`` command."""

import sys

from . import main

sys.exit(main())
