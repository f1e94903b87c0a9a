"""``python -m assist.cli ...``: the same as the ``assist`` command."""

import sys

from assist.cli import main

sys.exit(main())
