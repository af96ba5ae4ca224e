"""What a converted block needs at run time, made by the conversion: :class:`BlockSpec` (how
the block is called, its prefix tokens and patch grid, its token layout, its programs), and what
it records of the modules its programs traced into, to tell when they changed (:func:`traced_state`,
:meth:`BlockSpec.changed`). Not a module: a spec adds no state_dict key.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import threading
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.module import (_global_backward_hooks, _global_backward_pre_hooks,
                                     _global_forward_hooks, _global_forward_pre_hooks)
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..errors import AnalysisError, EvoplugError
from ..options import EvoOptions
from .call import CallPlan
from .pairs import fresh, same_value
from .programs import compile_program, program_source
from .sharded import fsdp_name, is_sharded, only_fsdp_hooks
from .state import EvoRuntime, EvoState



def _compiler_disable(reason: str) -> Callable:
    """``torch.compiler.disable`` with a reason that ``fullgraph=True`` reports (torch >= 2.8
    takes one; before, the plain decorator)."""
    try:
        return torch.compiler.disable(reason=reason)
    except TypeError:
        return torch.compiler.disable

class FlatTokens:
    """The block takes (B, N, C) tokens."""

    @staticmethod
    def tokens(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def restore(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out


class MapTokens:
    """The block takes a channels-last (B, H, W, C) map (Swin): it evolves its H * W tokens and
    gives the map back."""

    @staticmethod
    def tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1, 2)

    @staticmethod
    def restore(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out.reshape(x.shape)


@dataclasses.dataclass(eq=False)
class BlockSpec:
    """What a converted block needs at run time (not a module: adds no state_dict key)."""
    index: int                 # position among the converted blocks (execution order)
    name: str
    call: CallPlan             # how the block is called (token argument, other tensors, constants)
    num_prefix: int            # leading prefix tokens (cls, registers): always slow
    grid: Optional[Tuple[int, int]]   # patch grid of the M = N - P patch tokens
    layout: type               # FlatTokens | MapTokens
    full_row: bool             # the global row covers the M patches of the full map (windows)
    runtime: EvoRuntime        # shared by all blocks of the model
    programs: Dict[bool, Callable]   # training flag -> slow-path program
    orig_class: type
    analysis: Any = None       # what the analysis found (explain(), tests); not read here
    batch_size: Optional[int] = None   # the programs are for this batch size only (see factory)
    program_factory: Optional[Callable] = None   # (training, args, kwargs) -> program of that batch
    inner: Tuple[nn.Module, ...] = ()   # submodules traced into (their hooks need its own forward)
    added_buffers: Tuple[str, ...] = ()  # non-persistent buffers the conversion added (revert)
    buffer_values: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #                            their values (CPU copies): init_non_persistent_buffers
    needs_pos: bool = True     # the programs read the subset tokens' original positions
    near_ties: bool = False    # scores within evolve.tie_window of the cut are ties (evolve.select)
    selects_pos: bool = False  # its selections take the positions: a block that may run on
    #                            them after it reads them (api._relate; needs_pos its own)
    chain_next: Optional["BlockSpec"] = None   # the converted block that takes this one's
    #                            output and nothing else does (calibration): segments may pass
    #                            it the slow-path tokens directly
    returns: Optional[type] = None   # tuple/list: the block returns (tokens, *other items);
    #                            the program returns the other items as it computed them
    extra_shapes: Dict[str, Tuple[int, ...]] = dataclasses.field(default_factory=dict)
    #                            the other tensor arguments' shapes at the analysis (their ranks
    #                            are checked at every call)
    settings_of: Optional[Callable] = None   # module -> ((name, value), ...) its traced forward
    #                            read beyond its attributes (a family hint: transformers' attention
    #                            implementation); recorded in ``traced``, checked by changed()
    idle_hook: Optional[Callable[[Callable], bool]] = None   # a family's forward hook that
    #                            does nothing now (transformers' output capturing, see
    #                            integrations/): not counted by hooked() / observed()
    maps_collected: Optional[Callable[[], bool]] = None   # for a block that returns its
    #                            attention map over the tokens it runs: whether the call now
    #                            collects such maps (a family hint): it runs its own forward then
    tokens_run: int = -1       # tokens the last call ran through attention/MLP (diagnostic)
    num_suffix: int = 0        # trailing special tokens (YOLOS' detection tokens): always slow
    suffix_from: Tuple[Tuple[str, bool], ...] = ()   # (argument, value): as many of them as
    #                            ``value`` entries per row of the model's boolean argument
    #                            (VideoMAE's mask tokens): each call's count keys its twin
    whole_args: Tuple[str, ...] = ()   # per-token arguments the program gathers itself
    batch_args: Tuple[str, ...] = ()   # other tensor arguments whose first dim is the batch
    batch_programs: Dict = dataclasses.field(default_factory=dict)   # (training, B) -> program
    batch_failures: Dict = dataclasses.field(default_factory=dict)   # (training, B) -> why none
    traced: Tuple = ()         # (parent, name, path, module, its plain attributes) of each module
    #                            the programs traced into, as the trace saw them (changed())
    per_image: Optional[int] = None   # token sequences per image the model's input had at
    #                            calibration (block batch / images), when it divided evenly
    starts_stream: bool = False   # its input comes from no converted block before it (another
    #                            tower): the scores restart here (provenance.stream_starts)
    windowed_tokens: Optional[int] = None   # a flat block's windows partition this many
    #                            tokens (Hiera's mask units): its programs take no other count
    writes_at: Optional[Tuple[int, ...]] = None   # the shape (less the batch) of the tokens
    #                            its forward recorded sizes from (``self.H, self.W = H, W``
    #                            from ``x.shape``), where ``writes`` holds such a size: its
    #                            programs set those sizes, so they take tokens of that shape only
    set_outside: Tuple[Tuple[str, Any], ...] = ()   # (name, value): the block's own plain
    #                            attributes code outside it sets before its calls (a parent's
    #                            ``blk.H, blk.W = H, W``), as its programs were traced with them:
    #                            they take calls only while the block holds those values
    attributes: Tuple = (-1, ())   # a twin's block: (size of the model's block's __dict__,
    #                            its plain tensor attributes, its plain Python values) when
    #                            last followed (twins.py following)
    family_hook: Optional[Callable[[Callable], bool]] = None   # whether a hook is a family's
    #                            own, not the user's (not warned about: tell_hooked)
    leaves: Tuple[Tuple[Tuple[str, ...], Tuple[str, ...]], ...] = ()   # the submodules the
    #                            programs call by path, as (parent's path parts, their names):
    #                            their hooks fire on the tokens the block runs (tell_leaf_hooks);
    #                            found by name at use, never held (leaf_groups)
    writes: Tuple[Tuple[str, str, Any], ...] = ()   # (path, name, value): the plain
    #                            attributes the block's forward set, at the calibration, on itself
    #                            and the modules it traced into (transformers' Swin sets its shift
    #                            to 0 for good when the map fits its window): its programs set
    #                            them too, as its forward would (replay_writes)
    leaf_values: Tuple[Tuple[str, str, Any], ...] = ()   # (path, name, value): the plain
    #                            attributes of the modules its programs call whole that no
    #                            code set at the calibration, as the trace saw them (code of the
    #                            block that reads one holds that value): a twin's forward that
    #                            sets one (``writes``) notes it as ``drift`` (note_drift)
    leaf_reads: Tuple[Tuple[Tuple[str, ...], str, Any], ...] = ()   # (path parts, name,
    #                            value): of ``leaf_values``, those the block's traced code read
    #                            (analyse/reads.py): constants in its programs, checked by
    #                            changed() as the traced modules' values are
    python_tensors: Tuple[Tuple[str, str, nn.Module, torch.Tensor, int], ...] = ()   # (path,
    #                            name, module, tensor, its _version): plain tensor attributes
    #                            its traced code read in Python (analyse/plain_tensors.py), as
    #                            the programs hold them: changed() refuses another object or a
    #                            change in place (version -1: changed before a copy or pickle)
    state_from_tokens: Tuple[str, ...] = ()   # tensors its forward sets on itself or a module
    #                            it traced into from its tokens (``self.attn_map = attn``): its
    #                            programs set them for the tokens they ran (set_written), and
    #                            at keep 1.0 it runs its own forward, which sets every token's
    sets_own: Tuple[str, ...] = ()   # tensors its forward sets as attributes of the block
    #                            itself: a size twin's block that ran a call sets them on this
    #                            block too (_twin_ran)
    modes_differ: Optional[bool] = None   # its train and eval programs are other code
    #                            (mode_apart; set at construction: a compiled forward that set it
    #                            would be compiled again)
    _program_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        sources = [getattr(self.programs.get(mode), "__evoplug_source__", None) for mode in (True, False)]
        self.modes_differ = None in sources or sources[0] != sources[1]

    def __repr__(self) -> str:
        # (not the dataclass' own: programs, modules, buffers and the runtime would be in it)
        return (f"BlockSpec({self.index}, {self.name!r}, role={self.role!r}, "
                f"tokens_run={self.tokens_run})")

    @property
    def options(self) -> EvoOptions:
        return self.runtime.plan.options

    @property
    def role(self) -> str:
        """'dense' | 'score' | 'evolve' under the options in force."""
        return self.runtime.plan.roles[self.index]

    @property
    def context(self) -> Optional[EvoState]:
        """The state the last converted block run on this thread left (what a forward hook on
        a converted block reads: the selection it ran with, the updated scores)."""
        return self.runtime.current()

    # pickling: programs are generated code, kept as their source and compiled again
    def __getstate__(self):
        state = dict(self.__dict__)
        state["programs"] = {k: program_source(p, self.name) for k, p in self.programs.items()}
        state["batch_programs"] = {k: program_source(p, self.name)
                                   for k, p in self.batch_programs.items()}
        del state["_program_lock"]
        state["python_tensors"] = tuple((p, k, m, t, v if t._version == v else -1)
                                        for p, k, m, t, v in self.python_tensors)
        return state

    def __setstate__(self, state):
        leaves = state.get("leaves", ())
        if leaves and isinstance(leaves[0][1], nn.Module):    # (a pickle of (path, module) pairs)
            state["leaves"] = leaf_groups(p for p, _ in leaves)
        state["programs"] = {k: compile_program(s) for k, s in state["programs"].items()}
        state["batch_programs"] = {k: compile_program(s) for k, s in state["batch_programs"].items()}
        state["_program_lock"] = threading.Lock()
        state["python_tensors"] = _rebased(state.get("python_tensors", ()))
        self.__dict__.update(state)

    def __deepcopy__(self, memo):
        # programs are shared (they read everything from the block they are called with)
        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k in ("programs", "batch_programs"):
                new.__dict__[k] = dict(v)
            elif k == "_program_lock":
                new.__dict__[k] = threading.Lock()
            elif k == "python_tensors":     # (a copy's tensors count their versions anew)
                new.__dict__[k] = _rebased(copy.deepcopy(v, memo), v)
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def changed(self) -> Optional[str]:
        """What changed since the block was traced in a module it traced into (its attention
        modules, not the ones the programs call by path): a submodule replaced, or a plain
        attribute set anew (a dropout rate, ``scale``, ``fused_attn``): the programs hold the
        values and code the trace saw (a class or forward swapped or patched, too). None when
        nothing did."""
        for parent, name, path, m, scalars, nones, settings, (cls, fwd, own) in self.traced:
            if parent is not None and parent._modules.get(name) is not m:
                now = parent._modules.get(name)
                if now is not None and is_sharded(now):
                    return f"its submodule `{path}` was wrapped by {fsdp_name(now)}"
                return f"its submodule `{path}` was replaced"
            d = m.__dict__
            now = type(m) if parent is not None else self.orig_class
            if now is not cls and now.__bases__ == (cls,) and parametrize.is_parametrized(m):
                now = cls      # (torch's parametrize puts a subclass in; its properties run live)
            # (a forward set on the block's own instance runs instead of the converted one; this
            # runs only where it calls it, a wrapper with or without functools.wraps: the class's
            # computation was asked for. A lambda calling the converted forward was refused as
            # "a forward was set on it" until the fifty-fifth session; the conversion refuses a
            # block holding one: analyse/block.py ``refuse_forward_on_instance``)
            if now is not cls or now.forward is not fwd or (parent is not None
                                                            and d.get("forward") is not own):
                what = f"`{path}` ({now.__name__})" if path else f"the block ({now.__name__})"
                how = ("its class was swapped" if now is not cls else "its class's forward was "
                       "replaced" if now.forward is not fwd else "a forward was set on it")
                hint = ("; one that wraps its own, a checkpoint of a module inside a block "
                        "(MMEngine's activation_checkpointing?), cannot run inside the block's "
                        "programs: checkpoint the block itself, which then runs as converted"
                        if now is cls and now.forward is fwd and wraps_own_forward(m) else "")
                return f"{what}: {how} (the code its forward runs{hint})"

            drift = self.runtime.drift
            for k, v in scalars:
                now = d.get(k, _GONE)
                if now is not v and not same_value(now, v):   # (`is` first: per call)
                    where = f"{path}.{k}" if path else k
                    if drift and _same(drift.get((self.index, where), _GONE), now):
                        continue
                    return (f"`{where}` ({type(m).__name__}) changed from {v!r} to "
                            f"{'(deleted)' if now is _GONE else repr(now)}")
            for k in nones:
                if m._buffers.get(k, _GONE) is not None:
                    return f"`{path + '.' if path else ''}{k}` ({type(m).__name__}), None when traced, was set"
            if settings and self.settings_of is not None:
                for (k, v), (_, now) in zip(settings, self.settings_of(m)):
                    if now is not v and now != v:
                        return (f"`{path}` ({type(m).__name__}): its {k} changed from {v!r} to "
                                f"{now!r}")
        if self.python_tensors:
            stale = self._python_tensor_changed()
            if stale is not None:
                return stale
        return self._leaf_read_changed() if self.leaf_reads else None

    def _python_tensor_changed(self) -> Optional[str]:
        """:meth:`changed` of the plain tensor attributes the block's code read in Python
        (``if self.thr > 0:``): the trace kept what they held (``python_tensors``)."""
        for path, k, m, t, v in self.python_tensors:
            now = m.__dict__.get(k, _GONE)
            if now is not t or t._version != v:
                how = ("was deleted" if now is _GONE else "was replaced" if now is not t
                       else "was changed in place")
                where, cls = (f"{path}.{k}", type(m)) if path else (k, self.orig_class)
                return (f"`{where}` ({cls.__name__}), a plain tensor attribute its forward "
                        f"reads in Python (a branch or a Python number the trace kept), {how}")
        return None

    def _leaf_read_changed(self) -> Optional[str]:
        """:meth:`changed` of the values the block's code read from the modules its programs
        call whole or call a method of (``leaf_reads``), found by path on the block (a module
        replaced there is read as it is now: a wrapper that passes the attribute on holds the
        same value)."""
        drift = self.runtime.drift
        for parts, k, v in self.leaf_reads:
            m = self.traced[0][3]
            for part in parts:
                m = m._modules.get(part) if isinstance(m, nn.Module) else None
            now = _GONE if m is None else getattr(m, k, _GONE)
            if now is not v and not same_value(now, v):
                where = ".".join(parts + (k,))
                if drift and _same(drift.get((self.index, where), _GONE), now):
                    continue
                return (f"`{where}` ({type(m).__name__}; the block's code reads it) "
                        f"changed from {v!r} to {'(deleted)' if now is _GONE else repr(now)}")
        return None

    def drifted(self) -> Optional[Tuple[str, Any, Any]]:
        """(name, value now, value traced) of a plain attribute of the block that a twin's
        forward set, at another input size, to another value than its programs were traced
        with (:meth:`note_set`); None where none is."""
        drift = self.runtime.drift
        name = next((k for i, k in drift if i == self.index), None) if drift else None
        return None if name is None else (name, drift[self.index, name], self.traced_value(name))

    def traced_value(self, name: str, default=None):
        """The value of the plain attribute ``name`` of the block (``attn.temp``: of a module
        it traced into) its programs were traced with (``default``: none, or one its forward
        sets, which they set too: ``writes``)."""
        path, _, key = name.rpartition(".")
        entry = next((e for e in self.traced if e[2] == path), None)
        if entry is None:       # (a module its programs call whole)
            return next((v for p, k, v in self.leaf_values if p == path and k == key), default)
        return next((v for k, v in entry[4] if k == key), default)

    def note_set(self, name: str, value):
        """A twin's forward set ``value`` on this block's attribute ``name`` (twins.py
        ``set_back``; ``attn.temp``: on a module it traced into, which the twin's block shares):
        where the programs were traced with another value (transformers' Swin sets its shift to
        0 for good once a map fits its window, at a smaller input than the conversion's), it is
        kept in the runtime's ``drift`` (so :meth:`changed` does not take it for the user's
        change, and the model's forwards run twins converted with it)."""
        traced = self.traced_value(name, _GONE)
        if traced is _GONE:
            return
        if _same(value, traced):
            self.runtime.drift.pop((self.index, name), None)
        else:
            self.runtime.drift[self.index, name] = value

    def note_drift(self, block: Optional[nn.Module] = None, written=()):
        """After a twin's block ran a call: each traced plain value of the block and of the
        modules it traced into (which the twin's block shares) noted (:meth:`note_set`), a
        container changed in place too (``self.cfg["g"] = 0.5``). Until the forty-ninth session
        only the block's own values replaced by another object were: a forward that set
        ``self.attn.temp`` at another size was refused at the next call as the user's change,
        and one that changed a dict in place ran the programs traced with the old value. So is
        each value the twin's forward set (``written``: its ``writes``, (path, name, value)) on
        a module ``block``'s programs call whole (``self.mlp[0].gain = 0.5``), which the block's
        code may read as a constant (``leaf_values``): such a value stayed unnoted until audit
        D5 of the fiftieth session, and the programs traced with the old one ran, 2.38 off."""
        for path, k, _ in written:
            if path and block is not None and self.traced_value(f"{path}.{k}", _GONE) is not _GONE:
                try:
                    now = vars(block.get_submodule(path)).get(k, _GONE)
                except AttributeError:      # (a submodule removed since)
                    continue
                if now is not _GONE:
                    self.note_set(f"{path}.{k}", now)
        for _, _, path, m, scalars, *_ in self.traced:
            d = m.__dict__
            for k, v in scalars:
                now, where = d.get(k, _GONE), f"{path}.{k}" if path else k
                if now is not _GONE and (now is not v or (self.index, where) in self.runtime.drift):
                    self.note_set(where, now)

    def replay_writes(self, block: nn.Module):
        """Set what the block's own forward sets on itself and the modules it traced into (the
        programs, traced code, set nothing): a converted model's state then follows the calls it
        ran as the original's does, keep 1.0 or not (audit X3 of the thirty-ninth session: a
        transformers Swin whose blocks evolved kept its shift, one that ran keep 1.0 lost it,
        and the two gave different outputs at the next input size). A new list or dict each
        call, at every depth, as the forward makes (runtime/pairs.py ``fresh``)."""
        for path, name, value in self.writes:
            setattr(block.get_submodule(path), name, fresh(value))

    def hooked(self) -> bool:
        """Whether a submodule the programs traced into has hooks that are not idle (see
        ``idle_hook``) nor ones that set a weight and read no tokens (torch's pruning,
        ``spectral_norm``'s and ``weight_norm``'s hook forms: ``run_weight_hooks``): they fire
        only in the block's own forward."""
        for m in self.inner:
            if self._active(m._forward_hooks) or m._backward_hooks or m._backward_pre_hooks or (
                    m._forward_pre_hooks and not weights_only(m._forward_pre_hooks)):
                return True
        return self.mode_apart() is not None

    def mode_apart(self) -> Optional[str]:
        """The path of a module the programs traced into whose train/eval mode is not the
        block's (``model.train()`` then ``blk.attn.eval()``: attention dropout off in training;
        ``blk.attn.train()`` in eval: Monte-Carlo dropout): the programs traced the block in one
        mode, whole, so it runs its own forward, which reads each module's own mode. The
        program of the block's mode ran, silently, until audit H3 of the forty-fourth session.
        None where the block's two programs are the same code: nothing it traced reads its mode
        (a fresh attention module put in after ``model.eval()``, in train mode by default)."""
        if self.modes_differ is False:
            return None
        training = self.analysis.module.training
        return next((path for parent, _, path, m, *_ in self.traced
                     if parent is not None and m.training is not training), None)

    def run_weight_hooks(self):
        """Run the pre-hooks that set a weight (:func:`weights_only`: torch's pruning,
        ``spectral_norm``'s and ``weight_norm``'s hook forms) of the submodules the programs
        traced into, as their own call would: each sets its parameter (``q_bias`` from
        ``q_bias_orig * q_bias_mask``; ``weight`` from ``weight_orig``, a step of the power
        iteration in training), which the program then reads. They read no tokens, so the block
        evolves (pruning's made it run its own forward, for good and without a word, until audit
        W2 of the thirty-eighth session; spectral_norm's and weight_norm's until the
        forty-eighth). Called where ``hooked()`` is False: the pre-hooks left are those."""
        for m in self.inner:
            if m._forward_pre_hooks:
                for hook in tuple(m._forward_pre_hooks.values()):
                    hook(m, ())

    def tell_hooked(self):
        """Once per model: the block runs its own forward, every token, while a hook is on a
        submodule its programs traced into (docs/guarantees.md, Hooks); said by a warning
        naming the module and the hook (it was silent until audit W2 of the thirty-eighth
        session)."""
        apart = self.mode_apart()
        if apart is not None and not self.runtime.mode_told:
            self.runtime.mode_told = True
            mode = "eval" if self.analysis.module.training else "train"
            warnings.warn(
                f"evoplug: `{self.name}` runs its own forward, on every token (tokens_run -1, no "
                f"speed-up), while `{self.name}.{apart}`, a module its program traces into, is in "
                f"{mode} mode and the block is not: its programs run one mode, whole. Set the mode "
                "on whole blocks (model.train() / model.eval(), block.train()) to keep it "
                "evolving (said once per model)", stacklevel=5)
        family = self.family_hook or (lambda h: False)
        for m in self.inner:
            hooks = [("forward hook", h) for h in m._forward_hooks.values()] + \
                [("forward pre-hook", h) for h in m._forward_pre_hooks.values()
                 if not weights_only({0: h})] + \
                [("backward hook", h) for h in (*m._backward_hooks.values(), *m._backward_pre_hooks.values())]
            if hooks and all(family(h) for _, h in hooks):
                self._tell_maps_collected()
            hooks = [(kind, h) for kind, h in hooks if not family(h)]
            if hooks and is_sharded(m):
                self._tell_sharded(m)
                return
            if hooks:
                kind, hook = hooks[0]
                paths = {id(m): p for p, m in self.analysis.module.named_modules()}
                self.runtime.hooked_told = True
                warnings.warn(
                    f"evoplug: `{self.name}` runs its own forward, on every token (tokens_run "
                    f"-1, no speed-up), while a {kind} ({getattr(hook, '__qualname__', type(hook).__name__)}) "
                    f"is on `{self.name}.{paths.get(id(m), '?')}` ({type(m).__name__}), a module "
                    "its program traces into and so cannot fire inside it; the block evolves again "
                    "once the hook is removed. Hook the block itself, or a module it calls "
                    "(a Linear, a norm: it then sees the kept tokens), to keep it evolving (said "
                    "once per model)", stacklevel=5)
                return

    def _tell_sharded(self, m: nn.Module):
        """Once per model: FSDP's ``fully_shard`` on a module the block's programs trace into
        (``blocks.0.attn``): its hooks gather the module's parameters around its forward, which
        runs inside the programs, so the block runs its own forward (it was told as any hook,
        with advice to remove it, until the fifty-sixth session)."""
        self.runtime.hooked_told = True
        paths = {id(mod): p for p, mod in self.analysis.module.named_modules()}
        warnings.warn(
            f"evoplug: `{self.name}` runs its own forward, on every token (tokens_run -1, no "
            f"speed-up): `{self.name}.{paths.get(id(m), '?')}` ({type(m).__name__}) is sharded "
            f"on its own by {fsdp_name(m)}, and the hooks that gather its parameters cannot "
            "fire inside the block's programs, which trace into it. Shard whole blocks "
            "(fully_shard on each block, then on the model) to keep them evolving (said once "
            "per model)", stacklevel=5)

    def _tell_maps_collected(self):
        """Once per model: a call collects what a family's own hooks capture inside the block
        (transformers' attention maps, ``output_attentions``), so the block runs its own
        forward. Said because the flag may be the model's config's, which made every call run
        the dense model without a word until audit A2 of the fortieth session."""
        if self.runtime.maps_told:
            return
        self.runtime.maps_told = True
        warnings.warn(
            f"evoplug: `{self.name}` runs its own forward, on every token (tokens_run -1, no "
            "speed-up), in calls that collect its attention maps (output_attentions=True, given "
            "to the call or set in the model's config): the maps need every token's attention. "
            "Calls that collect none evolve; where the config sets it (transformers' "
            "`model.config.output_attentions`), set it to False and pass output_attentions=True "
            "to the calls that need maps (said once per model)", stacklevel=5)

    def tell_leaf_hooks(self, block: nn.Module):
        """Once per model: a forward hook (or pre-hook) on a submodule the programs call by path
        (``attn.attn_drop``, where attention rollout reads the attention maps; ``norm1``, a
        Grad-CAM target) fires, in an evolving block, on what that submodule runs: the kept
        tokens, in the selection's order (docs/guarantees.md, Hooks). Said by a warning with
        the way to see every token: a rollout failed on a shape, or at keep 1.0 on the
        evolving path read permuted maps, without a word (audit E3 of the twenty-seventh
        session). The submodules are found by name in ``block`` (the spec held the ones of
        the conversion: replaced by quantisation or LoRA, they were kept alive, broke pickling
        and were the ones asked; audit W2 of the thirty-eighth session). Hooks that read no
        tokens (:func:`weights_only`: ``spectral_norm``'s, said to fire on the kept tokens until
        audit K6 of the forty-sixth session) are not told, nor are FSDP's (``fully_shard`` on an
        MLP: told until the fifty-sixth session)."""
        for parent_path, names in self.leaves:
            parent = block
            for part in parent_path:
                parent = parent._modules.get(part) if parent is not None else None
            if parent is None:
                continue
            modules = parent._modules
            for name in names:
                m = modules.get(name)
                if m is not None and ((m._forward_pre_hooks and not weights_only(m._forward_pre_hooks))
                                      or (m._forward_hooks and self._active(m._forward_hooks))) \
                        and not only_fsdp_hooks(m):
                    self._tell_leaf_hook(".".join(parent_path + (name,)))
                    return

    def _tell_leaf_hook(self, path: str):
        self.runtime.leaf_hooks_told = True
        warnings.warn(
            f"evoplug: a forward hook on `{self.name}.{path}` fires on the tokens that evolving "
            "block runs (its prefix, kept and representative tokens, in the selection's order), "
            "not on every token in order; to read every token (attention rollout, Grad-CAM), "
            "hook the attention module or the block itself (the block then runs its own "
            "forward), or set keep_ratio=1.0", stacklevel=5)

    def observed(self) -> bool:
        """Whether anything but the next block could see this block's input or output: hooks on
        it or inside it that are not idle (backward hooks on it too: they wrap its output, so
        the next block would get another tensor), or global module hooks."""
        m = self.analysis.module
        return bool(self._active(m._forward_hooks) or m._forward_pre_hooks or _global_forward_hooks
                    or _global_forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                    or _global_backward_hooks or _global_backward_pre_hooks or self.hooked()
                    or "forward" in m.__dict__)

    def _active(self, hooks) -> bool:
        if not hooks:
            return False
        idle = self.idle_hook
        return idle is None or not all(idle(h) for h in hooks.values())

    def program(self, training: bool, batch: int, args, kwargs) -> Callable:
        """The slow-path program for this mode and batch size; None where none can be built for
        that batch size (said once, in a warning)."""
        if self.batch_size is None or batch == self.batch_size:
            return self.programs[training]
        key = (training, batch)
        program = self.batch_programs.get(key)
        if program is None:
            self._build_batch_programs(training, batch, args, kwargs)
            program = self.batch_programs.get(key)
        return program

    # (the tracer cannot run inside torch.compile: a compiled call at a batch size no eager
    # call has built programs for runs this outside the graph, and fullgraph=True refuses it
    # with this reason; it refused it with dynamo's words about os.getpid)
    @_compiler_disable("evoplug builds a converted block's programs for a new batch size by "
                       "tracing the block, outside the graph: call the model once at this "
                       "batch size outside torch.compile first, then "
                       "compile with fullgraph=True")
    def _build_batch_programs(self, training: bool, batch: int, args, kwargs):
        if self.__dict__.get("_lock_pid", os.getpid()) != os.getpid():
            # (a child forked while another thread built a program: that thread's hold on
            # the lock is never released there)
            self._program_lock = threading.Lock()
        self._lock_pid = os.getpid()
        with self._program_lock:   # the factory runs the compiler once per new batch size
            # both modes at once: a compiled call in the other mode found no program, and
            # dynamo cannot run the factory (one eager warm-up per mode was needed besides
            # the one per batch size the docs name; audit V5, thirty-seventh session)
            for mode in (training, not training):
                if self.batch_programs.get((mode, batch)) is None and \
                        (mode, batch) not in self.batch_failures:
                    try:
                        self.batch_programs[mode, batch] = self.program_factory(mode, args, kwargs)
                    except AnalysisError as e:
                        # (a block whose trace at this batch size is no block evoplug
                        # converts: a per-image Python loop runs one attention per image; it
                        # raised the analysis' error from the forward; audit of the
                        # twenty-ninth session)
                        self.batch_failures[mode, batch] = e.reason
                        warnings.warn(f"evoplug: `{self.name}` at a batch of {batch}: {e.reason}; "
                                      "it runs its original forward (every token) at that batch "
                                      "size", stacklevel=7)



def weights_only(hooks) -> bool:
    """Whether every hook of a module's forward pre-hooks sets a weight from the module's own
    parameters and buffers and reads no tokens: torch's pruning, ``spectral_norm``'s and
    ``weight_norm``'s hook forms (``weight`` from ``weight_orig``, ``weight_u`` and
    ``weight_v``; from ``weight_g`` and ``weight_v``)."""
    return all(isinstance(h, (BasePruningMethod, SpectralNorm, WeightNorm)) for h in hooks.values())


def check_unchanged(spec: BlockSpec):
    """Raise where something the block's trace baked in changed since (BlockSpec.changed)."""
    stale = spec.changed() if spec.traced else None
    if stale is not None and " by FSDP's " in stale:
        raise EvoplugError(
            f"`{spec.name}`: {stale}, a module its programs trace into, where the hooks that "
            "gather its parameters cannot run. Shard whole blocks: FSDP1's auto_wrap_policy "
            f"ModuleWrapPolicy({{{spec.orig_class.__name__}}}) (converted blocks are instances of "
            "their class), or fully_shard on each block, then on the model")
    if stale is not None and "`with_cp`" in stale:     # (MMPretrain: checkpointing inside)
        raise EvoplugError(
            f"`{spec.name}`: {stale} after conversion: a converted block cannot checkpoint "
            "itself (its forward branches on x.requires_grad, which a trace cannot keep). Keep "
            "with_cp=False and checkpoint the converted blocks from outside "
            "(torch.utils.checkpoint)")
    if stale is not None:
        raise EvoplugError(
            f"`{spec.name}`: {stale} after conversion; its slow-path program holds what the "
            "trace saw, so it would run the old computation. Convert the model again "
            "(evoplug.convert(evoplug.revert(model), ...)), or make such changes before "
            "converting")




_GONE = object()


def _rebased(entries, old=None) -> Tuple:
    """:attr:`BlockSpec.python_tensors` of a copy or an unpickled spec: each tensor's version
    now, or -1 where the original had changed (``old``: the original's entries; else the
    version recorded, -1 for a changed one, by __getstate__)."""
    return tuple((p, k, m, t, -1 if (o[3]._version != o[4] if old is not None else v == -1)
                  else t._version)
                 for (p, k, m, t, v), o in zip(entries, old if old is not None else entries))


def _same(a, b) -> bool:
    """Whether two plain values are the same (``_GONE`` is no value)."""
    return a is b or (a is not _GONE and b is not _GONE and same_value(a, b))


def under(path: str, prefixes) -> bool:
    """Whether the module at ``path`` is one of the modules at ``prefixes`` or inside one."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def leaf_groups(paths) -> Tuple[Tuple[Tuple[str, ...], Tuple[str, ...]], ...]:
    """:attr:`BlockSpec.leaves` of submodule paths: (parent's path parts, child names), so a
    forward finds them with one dict look-up each (``attn.qkv``, ``norm1``)."""
    groups: Dict[Tuple[str, ...], list] = {}
    for path in paths:
        *parent, name = path.split(".")
        groups.setdefault(tuple(parent), []).append(name)
    return tuple((parent, tuple(names)) for parent, names in groups.items())


def traced_state(block: nn.Module, paths, attributes: Callable, volatile=None, leaves=(),
                 settings: Optional[Callable] = None, own_state=None) -> Tuple:
    """For :attr:`BlockSpec.traced`: every module under the block's attention paths
    (traced into), each with its parent, name and plain attributes (``attributes(m)``, a
    dict) but those a forward sets (``volatile``: {id(module): names}) or fills with tensors
    (``own_state``, the same form: a cache of its own), and what a family says
    its forward read besides (``settings(m)``); not the modules the programs call by path
    (``leaves``) and what is inside them: those run live."""
    volatile = volatile or {}
    live = tuple(leaves)

    def entry(parent, path, m):
        skip = set(volatile.get(id(m), ())) | set((own_state or {}).get(id(m), ())) | (
            _READ_OUTSIDE if m is block else set())
        # (a buffer the trace saw as None, Swin's attn_mask without a shift, is a constant too)
        return (parent, path.rpartition(".")[2], path, m,
                tuple((k, v) for k, v in attributes(m).items() if k not in skip),
                tuple(k for k, v in m._buffers.items() if v is None),
                settings(m) if settings is not None else (),
                _code(m))

    # the block's own attributes too (Swin's shift_size, read in its traced forward), but the
    # flags read outside it (transformers' gradient_checkpointing, in __call__), and its code
    own = entry(None, "", block)
    out, seen = [own], {id(block)}
    for path in paths:
        if not path:
            continue
        for sub, m in block.get_submodule(path).named_modules(prefix=path):
            if id(m) in seen or under(sub, live):
                continue
            seen.add(id(m))
            pp = sub.rpartition(".")[0]
            out.append(entry(block.get_submodule(pp), sub, m))
    return tuple(out)


def traced_writes(traced: Tuple, volatile) -> Tuple[Tuple[str, str, Any], ...]:
    """For :attr:`BlockSpec.writes`: the plain attributes the calibration's forward set on the
    modules of :func:`traced_state` (``volatile``: {id(module): {name: value}})."""
    return tuple((path, k, v) for _, _, path, m, *_ in traced
                 for k, v in (volatile or {}).get(id(m), {}).items())


def wraps_own_forward(block: nn.Module, depth: int = 8) -> bool:
    """Whether the forward set on a module's instance wraps the module's own (its ``__wrapped__``
    chain, as ``functools.wraps`` leaves it, reaches the module's forward bound to it):
    MMEngine's ``activation_checkpointing`` (``module.forward = wrap_forward(module.forward)``,
    a ``torch.utils.checkpoint`` around it, set by the Runner after the model is built). On a
    converted block any forward set on its instance after the conversion runs, and the
    converted one inside it where it calls it (:meth:`BlockSpec.changed`; this allowed only
    such wrappers from the fifty-second session to the fifty-fifth); on a module inside a block
    it is refused, with a hint to checkpoint the block itself where it is such a wrapper."""
    fn = block.__dict__.get("forward")
    for _ in range(depth):
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
        if getattr(fn, "__self__", None) is block and getattr(fn, "__func__", None) is type(block).forward:
            return True
    return False


def _code(m: nn.Module) -> Tuple:
    """What decides the code a module's forward runs: its class, the forward that class
    has, a forward set on the instance (``m.forward = ...``)."""
    cls = type(m)
    return cls, cls.forward, m.__dict__.get("forward")


#: a block's own attributes read outside its traced forward: not checked by changed()
_READ_OUTSIDE = {"gradient_checkpointing"}
