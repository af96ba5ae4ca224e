"""Kept for old imports: the timing and FLOP helpers live in the package, ``evoplug.tools.bench``
(one implementation for ``evoplug bench``, benchmarks/throughput.py and the examples)."""
from evoplug.tools.bench import Progress, Timing, flops, interleaved, machine  # noqa: F401
