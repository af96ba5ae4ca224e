"""``python -m evoplug``: the evoplug command (see evoplug/cli.py)."""
from .cli import entry

if __name__ == "__main__":
    entry()
