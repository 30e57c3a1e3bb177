"""``python -m nanoresume train|sample|evaluate|ckpt ...``: the installed ``nanoresume`` command."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
