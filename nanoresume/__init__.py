"""nanoresume: train small GPTs with plain PyTorch and never lose work."""

__version__ = "0.1.0"
