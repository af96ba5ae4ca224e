"""``python -m evoplug.mm.train CONFIG``: see :mod:`evoplug.integrations.mmpretrain.train`."""
from evoplug.integrations.mmpretrain.train import build_runner, main, parse_args  # noqa: F401

if __name__ == "__main__":
    main()
