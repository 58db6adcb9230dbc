"""``python -m lancet``: the command line."""

import sys

from lancet.app.cli import main

sys.exit(main())
