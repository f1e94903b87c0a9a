"""``python -m assist.cli ...``: the same as the ``assist`` command."""

import sys

from assist.cli import main

# Guarded: `assist train` starts a stage in a second process with multiprocessing's "spawn",
# which imports this module again in the child (as __mp_main__), where it must not run.
if __name__ == "__main__":
    sys.exit(main())
