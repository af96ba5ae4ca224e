"""Tools built on the public API: ``bench`` (side-by-side timing), ``visualize`` (token-selection
pictures), ``check`` (the test suite's checks of a conversion, on any model), ``plan`` and
``distill``, ``cli`` (the ``evoplug`` command)."""
