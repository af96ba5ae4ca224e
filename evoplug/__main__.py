"""``python -m evoplug``: the evoplug command (see evoplug/tools/cli.py)."""
from .tools.cli import entry

if __name__ == "__main__":
    entry()
