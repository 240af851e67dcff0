"""``python -m malloc``: the command line (the same as the ``malloc`` script)."""

import sys

from malloc.cli import console

sys.exit(console())
