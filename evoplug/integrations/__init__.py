"""What is specific to a model family or a framework: ``mmpretrain`` (public path
``evoplug.mm``)."""
