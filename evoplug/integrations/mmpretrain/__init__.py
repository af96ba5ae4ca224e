"""MMPretrain (OpenMMLab) integration. Its public path is :mod:`evoplug.mm`, which registers the
model types and the checkpoint allow-list; this package holds the code: ``models`` (registered
Evo types, training extras), ``checkpoint`` (MMEngine checkpoints on torch >= 2.6), ``train``
(the training entry point) and ``hints`` (MMPretrain's conventions for the analysis, importable
without MMPretrain)."""
