"""Hugging Face transformers' conventions, as hints (see registry.py).

transformers (v5) collects ``output_hidden_states`` / ``output_attentions`` with forward hooks
it installs on the layers and attention modules the first time a call asks for them, and
leaves installed: afterwards each hook returns at once unless a call is collecting its key
(a context variable of ``transformers.utils.output_capturing``). evoplug runs a block whose
attention module has hooks as the original block (its program never calls that module, so the
hook would not fire); such an idle hook is told apart here, so a model evolves again after one
call with ``output_attentions=True``, and that call itself runs the original blocks and
returns every attention map. The ``output_*`` flags themselves, passed down to every layer's
``**kwargs``, are dropped from the blocks' call plans. transformers is imported here only for
a module of a transformers model (its registry of attention functions)."""
from __future__ import annotations

import warnings

import sys
from typing import Callable, Optional, Tuple

from .registry import FamilyHints, InputSize

_CAPTURING = "transformers.utils.output_capturing"


def _closure(fn: Callable) -> dict:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def idle_hook(hook: Callable) -> Optional[bool]:
    """True when ``hook`` is transformers' output-capturing hook and no running call collects
    what it captures; None for other hooks (not this family's to say)."""
    code = getattr(hook, "__code__", None)
    if code is None or code.co_name != "output_capturing_hook":
        return None
    module = sys.modules.get(_CAPTURING)
    if module is None or getattr(hook, "__module__", None) != _CAPTURING:
        return None
    key = _closure(hook).get("key")
    collector = getattr(module, "_active_collector", None)
    if key is None or collector is None:
        return None
    collected = collector.get()
    return collected is None or key not in collected


def collects_attentions() -> bool:
    """Whether a running call collects attention maps (``output_attentions=True``): Swin's hook
    takes them from the stage's output, the last layer's map, so no hook inside the layer tells
    (its eager layer's last-stage map is over the tokens it runs, analyse/one_window.py)."""
    module = sys.modules.get(_CAPTURING)
    collector = getattr(module, "_active_collector", None) if module is not None else None
    collected = collector.get() if collector is not None else None
    return bool(collected) and any("attentions" in k for k in collected)


#: keywords transformers passes down to every layer's ``**kwargs`` and no layer reads (v5
#: collects hidden states and attention maps with hooks); a call that collects attention
#: maps runs the original blocks anyway (its hooks are not idle), where the flag is seen.
#: ``Trainer`` adds two: ``num_items_in_batch`` (for the loss, passed to the model's forward)
#: and ``use_cache`` (it sets ``config.use_cache``; a key/value cache is a text decoder's,
#: and evoplug refuses text towers); with them every layer ran its own forward, so a Trainer
#: run trained the dense model, until the eighteenth session. ``head_mask``: v5 still takes it
#: and no modeling file reads it any more (v4's layers took it as a parameter of their own,
#: which this list does not drop); with it every layer ran dense, with a warning
PASSED_THROUGH = ("output_hidden_states", "output_attentions", "num_items_in_batch", "use_cache",
                  "head_mask")

#: keywords some families hand down to their layers too, read by none of their layers (checked
#: in their modeling files: DINOv2's embeddings interpolate always, and the flag reaches the
#: layers through ``**kwargs`` only). Not for every family: BEiT's layers read
#: ``interpolate_pos_encoding`` (their relative position bias).
PASSED_THROUGH_BY_TYPE = {
    "dinov2": ("interpolate_pos_encoding",),
    "dinov2_with_registers": ("interpolate_pos_encoding",),
    "dinov3_vit": ("interpolate_pos_encoding",),
}


def ignored_keywords(model) -> Tuple[str, ...]:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    return PASSED_THROUGH + PASSED_THROUGH_BY_TYPE.get(kind, ())


def input_size(model) -> Optional[InputSize]:
    """The input a transformers vision model declares: ``config.image_size`` (an int or a
    (height, width) pair) and ``config.num_channels``, or the same in ``config.vision_config``
    (CLIP-like models)."""
    config = getattr(model, "config", None)
    for cfg, where in ((config, "config"), (getattr(config, "vision_config", None), "config.vision_config")):
        size = getattr(cfg, "image_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if (isinstance(size, (tuple, list)) and len(size) == 2
                and all(isinstance(v, int) and v > 0 for v in size)):
            chans = getattr(cfg, "num_channels", None)
            return (chans if isinstance(chans, int) else None, size[0], size[1],
                    f"`{where}.image_size`")
    return None


#: model types whose ``pixel_values`` are a video (B, ``config.num_frames``, C, H, W): their
#: embeddings unpack ``batch_size, num_frames, num_channels, height, width`` (an image
#: batch made from ``config.image_size`` alone did not run through them; audit B1 of the
#: forty-first session)
VIDEO_TYPES = ("videomae", "vivit", "timesformer")


def input_frames(model) -> Optional[int]:
    """The frames a transformers video model takes: ``config.num_frames`` (VIDEO_TYPES)."""
    config = getattr(model, "config", None)
    frames = getattr(config, "num_frames", None)
    if getattr(config, "model_type", None) in VIDEO_TYPES and isinstance(frames, int) and \
            not isinstance(frames, bool) and frames > 0:
        return frames
    return None


def traced_settings(module, converting: bool = False) -> Optional[dict]:
    """An attention module's implementation: read from the shared config at every call and
    looked up in transformers' registry of attention functions, so a trace bakes in the one it
    saw (``set_attn_implementation`` or a function registered anew after the conversion went
    unseen until the nineteenth session)."""
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if not isinstance(impl, str) or not type(module).__module__.startswith("transformers."):
        return None
    functions = _attention_functions()
    fn = functions.get(impl) if functions is not None else None
    if converting and fn is not None and not getattr(fn, "__module__", "").startswith("transformers."):
        warnings.warn(
            f"`{type(module).__name__}`: its transformers attention implementation {impl!r} "
            f"({getattr(fn, '__qualname__', fn)}) is not one of transformers' own: the converted "
            "blocks run the torch operations it ran while traced, and Python side effects in it "
            "(collecting attention maps) do not happen when they run; call the model with "
            "output_attentions=True for the maps (the original blocks run then)", stacklevel=2)
    # (sorted by name, the implementation's name is checked first: "eager" has no function)
    return {"config._attn_implementation": impl, "registered attention function": fn}


_REGISTRY: list = []


def _attention_functions():
    """transformers' registry of attention functions (None in a version without one); looked
    up once: traced_settings runs at every call of a converted block. (Kept in a plain list, not
    an ``lru_cache``: dynamo warned of "silent incorrectness" at every compile of a converted
    transformers model, audit U of the twenty-sixth session.)"""
    if not _REGISTRY:
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        except ImportError:
            ALL_ATTENTION_FUNCTIONS = None
        _REGISTRY.append(ALL_ATTENTION_FUNCTIONS)
    return _REGISTRY[0]


TRANSFORMERS = FamilyHints(
    name="transformers",
    matches=lambda model: type(model).__module__.startswith("transformers."),
    ignored_keywords=ignored_keywords,
    # create_bidirectional_mask never skips the mask while exporting (it cannot look at the
    # padding mask's values there), even when the call passed none
    export_masks=lambda model: ("attention_mask",),
    idle_hook=idle_hook,
    collects_maps=collects_attentions,
    input_size=input_size,
    input_frames=input_frames,
    traced_settings=traced_settings,
)
