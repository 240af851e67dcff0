"""``python -m malloc``: the command line (the same as the ``malloc`` script)."""

import sys

from malloc.cli import main

sys.exit(main())
