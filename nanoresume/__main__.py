"""``python -m nanoresume train|sample|evaluate|ckpt ...``: the installed ``nanoresume`` command."""

from .tools.commands import run

if __name__ == "__main__":
    run()
