"""The tools' models: timm models by name (random weights, no hub), the input size a tool
runs them at, and self-describing checkpoints (timm name + kwargs + weights) that
``evoplug explain/check/plan/visualize FILE`` rebuild (``evoplug bench`` takes timm names)."""
from __future__ import annotations

from typing import Optional

import torch


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` (with close matches) if ``name`` is not a timm model name."""
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is an extra
        raise ValueError("model names are timm names: `pip install timm`") from e
    if timm.is_model(name):
        return
    import difflib
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('*vit*')` lists them"
    raise ValueError(f"unknown model {name!r}: not a timm model name{hint}")


def create_model(name: str, img_size: Optional[int] = None, **kwargs) -> torch.nn.Module:
    """A timm model with random weights (``pretrained=False``: no hub), in eval mode. A model
    that takes no ``img_size`` (no fixed input size: PVTv2, Swin's timm builds of some sizes) is
    built without it; the tools feed it ``img_size`` images all the same (:func:`input_size`)."""
    import timm
    check_model_name(name)
    if kwargs.pop("pretrained", False):
        # (timm's "got multiple values for keyword argument 'pretrained'" until the
        # forty-third session)
        raise ValueError(f"{name}: pretrained=True: the tools build timm models with random "
                         "weights (no download); give the weights with --checkpoint FILE (a "
                         "state_dict), or an evoplug checkpoint file instead of the name (in "
                         "Python: load the model yourself and measure it with "
                         "evoplug.tools.bench.bench_model)")
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        if "img_size" not in kwargs or "img_size" not in str(e):
            raise ValueError(f"{name}: timm cannot build it with {kwargs}: {e}") from e
        # (--img-size was refused for such models until the thirty-sixth session: audit U2)
        return create_model(name, None, **{k: v for k, v in kwargs.items() if k != "img_size"})
    except Exception as e:        # noqa: BLE001 (arguments the model's own code refuses)
        # (num_heads=0, embed_dim=7: a ZeroDivisionError traceback, or an assertion reported as
        # the model refusing its input, until the thirty-seventh session; audit V4)
        raise ValueError(f"{name}: timm cannot build it with {kwargs}: {type(e).__name__}: {e}") from e
    return model.eval()


def input_size(model: torch.nn.Module, img_size: Optional[int] = None):
    """(H, W) of the model's input: ``img_size`` if given, else what the model declares
    (:func:`evoplug.input_size`), else 224."""
    import evoplug
    if img_size is not None:
        return (int(img_size), int(img_size))
    declared = evoplug.input_size(model)
    return tuple(declared[1:]) if declared is not None else (224, 224)


# --------------------------------------------------------------------------------------------
# Self-describing checkpoints (timm name + kwargs + weights), for `evoplug visualize FILE`
# --------------------------------------------------------------------------------------------

def save_checkpoint(path: str, model, timm_name: str, model_kwargs: dict, **meta) -> None:
    """Save a timm model with what is needed to rebuild it: ``{'timm_model', 'model_kwargs',
    'state_dict', **meta}`` (meta: e.g. ``mean``, ``std``, ``classes``; plain Python values)."""
    torch.save(dict(timm_model=timm_name, model_kwargs=dict(model_kwargs),
                    state_dict=model.state_dict(), **meta), path)


def read_torch_file(path: str):
    """``torch.load(path)`` with tensors and plain values only, a file it cannot read said in one
    line with its name (torch's own errors: its advice ``weights_only=False``, which no command
    takes, or a bare ``EOFError:`` for an empty file; audits Q2 and V4)."""
    import pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            # (no pickle of objects: bytes torch's unpickler cannot read, "Unsupported operand";
            # they were said to hold more than tensors, audit J2 of the forty-fifth session)
            raise ValueError(f"{path}: not a file torch.save wrote, or cut short (its bytes are "
                             "no pickle torch.load reads)") from None
        raise ValueError(f"{path}: holds more than tensors and plain values (a whole pickled "
                         "model is not read: save its state_dict, or use "
                         "evoplug.tools.models.save_checkpoint)") from None
    except (EOFError, RuntimeError, OSError) as e:
        # (a zip checkpoint cut short: a bare OSError "[Errno 22] Invalid argument" without
        # the file's name, audit J2 of the forty-fifth session)
        raise ValueError(f"{path}: not a file torch.save wrote, or cut short "
                         f"({type(e).__name__}: {str(e) or 'empty'})") from None


def load_state_dict(model: torch.nn.Module, state_dict: dict, path: str) -> None:
    """``model.load_state_dict(state_dict)`` (strict), a state_dict of another model said in one
    line: how many keys are missing, unexpected and of another shape, and the first of each
    (torch's message listed every key: 57 lines for a ViT of 4 blocks, until the forty-third
    session). What torch accepts is loaded (its load hooks: BatchNorm's old checkpoints)."""
    try:
        model.load_state_dict(state_dict)
        return
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shaped = [f"{k} {tuple(state_dict[k].shape)}, the model's {tuple(own[k].shape)}" for k in own
              if k in state_dict and getattr(state_dict[k], "shape", own[k].shape) != own[k].shape]
    wrong = [f"{len(keys)} {what} (first: {keys[0]})" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped)) if keys]
    raise ValueError(f"{path}: not a state_dict of this {type(model).__name__}: of its {len(own)} "
                     f"keys, {'; '.join(wrong)}" if wrong else f"{path}: {first}") from None


def load_checkpoint(path: str):
    """(model in eval mode, meta dict) from a file written by :func:`save_checkpoint`.
    Loaded with ``weights_only=True`` (tensors and plain values only)."""
    ck = read_torch_file(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("timm_model"), str) or \
            not isinstance(ck.get("state_dict"), dict) or not isinstance(ck.get("model_kwargs", {}), dict):
        raise ValueError(f"{path}: not an evoplug checkpoint (a dict with 'timm_model', a name, "
                         "'model_kwargs', a dict, and 'state_dict'); for a plain state_dict give "
                         "a timm model name and --checkpoint FILE")
    model = create_model(ck["timm_model"], **ck.get("model_kwargs", {}))
    load_state_dict(model, ck["state_dict"], path)
    meta = {k: v for k, v in ck.items() if k != "state_dict"}
    return model.eval(), meta
