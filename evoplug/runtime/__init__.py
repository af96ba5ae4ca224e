"""What runs in every forward of a converted model: the token math (``evolve``), the converted
block and its per-forward state (``block``), the slow-path programs as plain functions
(``programs``). Imports no torch.fx and nothing from ``evoplug.analyse`` or ``evoplug.rewrite``."""
