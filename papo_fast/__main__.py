"""``python -m papo_fast ...``: the papo-fast command (papo_fast/cli.py), for launchers that run a
module, such as ``torchrun -m papo_fast train CONFIG``."""

import sys

from papo_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
