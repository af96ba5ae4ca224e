"""``python -m evoplug.mm.train CONFIG``: see :mod:`evoplug.integrations.mmpretrain.train`."""
from evoplug.integrations.mmpretrain.train import (  # noqa: F401
    build_runner, configure_amp, configure_launch, finish_distributed, main, parse_args, run)

if __name__ == "__main__":
    run()
