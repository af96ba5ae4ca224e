"""Tools built on the public API: ``bench`` (side-by-side timing), ``visualize`` (token-selection
pictures), ``cli`` (the ``evoplug`` command)."""
