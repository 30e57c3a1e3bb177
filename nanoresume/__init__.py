"""nanoresume: train small GPTs with plain PyTorch and never lose work."""

import time

__version__ = "0.1.0"

# When this process first imported nanoresume (before torch): the CLI's --time-limit counts from
# here, so the seconds spent importing torch, reading data and building the model count too.
PROCESS_STARTED = time.monotonic()
