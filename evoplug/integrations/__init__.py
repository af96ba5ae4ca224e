"""What is specific to a model family or a framework, as hints the analysis consults
(``registry``: the extension points), and the framework adapters: ``timm`` (notrace registry,
data config), ``transformers`` (its output-capturing hooks), ``mmpretrain`` (public path ``evoplug.mm``), ``generic`` (attribute conventions
shared by many hand-written models), ``einops`` (its functions and layers kept whole by the tracer). Importing this package registers evoplug's own families."""
from .einops import EINOPS
from .generic import GENERIC
from .mmpretrain.hints import MMPRETRAIN
from .registry import register_family
from .timm import TIMM
from .transformers import TRANSFORMERS

for _family in (TIMM, MMPRETRAIN, TRANSFORMERS, GENERIC, EINOPS):
    register_family(_family, built_in=True)
