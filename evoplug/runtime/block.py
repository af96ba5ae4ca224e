"""Converted blocks: the block's class is swapped for a subclass whose ``forward`` runs the
slow-fast token evolution around the block's own computation.

Swapping the class (not wrapping the module) keeps every parameter, buffer, hook, attribute,
``isinstance`` check and state_dict key of the block. What the block needs at run time is a
:class:`BlockSpec`, made by the conversion: how the block is called, its prefix tokens and
patch grid, how its tokens are laid out, how to read its attention row, and its programs.
The per-forward state travels as an :class:`~evoplug.runtime.state.EvoState` (see state.py):
nothing a forward computes is stored on the modules.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.module import (_global_backward_hooks, _global_backward_pre_hooks,
                                      _global_forward_hooks, _global_forward_pre_hooks)
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod

from ..errors import AnalysisError, EvoplugError
from ..options import EvoOptions, read_trade_off
from . import evolve as ev
from .call import CallPlan
from .programs import compile_program, program_source
from .state import (_RUNTIMES, EvoRuntime, EvoState, Segment, _in_backward, _saving_hooks,
                    input_key)



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
    attributes: Tuple = (-1, ())   # a twin's block: (size of the model's block's __dict__,
    #                            its plain tensor attributes) when last followed (_following)
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
    state_from_tokens: Tuple[str, ...] = ()   # tensors its forward sets on itself or a module
    #                            it traced into from its tokens (``self.attn_map = attn``): its
    #                            programs set them for the tokens they ran (_set_written), and
    #                            at keep 1.0 it runs its own forward, which sets every token's
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
        return state

    def __setstate__(self, state):
        leaves = state.get("leaves", ())
        if leaves and isinstance(leaves[0][1], nn.Module):    # (a pickle of (path, module) pairs)
            state["leaves"] = leaf_groups(p for p, _ in leaves)
        state["programs"] = {k: compile_program(s) for k, s in state["programs"].items()}
        state["batch_programs"] = {k: compile_program(s) for k, s in state["batch_programs"].items()}
        state["_program_lock"] = threading.Lock()
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
                return f"its submodule `{path}` was replaced"
            d = m.__dict__
            now = type(m) if parent is not None else self.orig_class
            if now is not cls and now.__bases__ == (cls,) and parametrize.is_parametrized(m):
                now = cls      # (torch's parametrize puts a subclass in; its properties run live)
            if now is not cls or now.forward is not fwd or d.get("forward") is not own:
                what = f"`{path}` ({now.__name__})" if path else f"the block ({now.__name__})"
                how = ("its class was swapped" if now is not cls else "its class's forward was "
                       "replaced" if now.forward is not fwd else "a forward was set on it")
                return f"{what}: {how} (the code its forward runs)"

            for k, v in scalars:
                now = d.get(k, _GONE)
                if now is not v and now != v:
                    where = f"{path}.{k}" if path else k
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
        return None

    def replay_writes(self, block: nn.Module):
        """Set what the block's own forward sets on itself and the modules it traced into (the
        programs, traced code, set nothing): a converted model's state then follows the calls it
        ran as the original's does, keep 1.0 or not (audit X3 of the thirty-ninth session: a
        transformers Swin whose blocks evolved kept its shift, one that ran keep 1.0 lost it,
        and the two gave different outputs at the next input size)."""
        for path, name, value in self.writes:
            setattr(block.get_submodule(path) if path else block, name, value)

    def hooked(self) -> bool:
        """Whether a submodule the programs traced into has hooks that are not idle (see
        ``idle_hook``) nor torch's pruning (``run_pruning``): they fire only in the block's own
        forward."""
        for m in self.inner:
            if self._active(m._forward_hooks) or m._backward_hooks or m._backward_pre_hooks or (
                    m._forward_pre_hooks and not _pruning_only(m._forward_pre_hooks)):
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

    def run_pruning(self):
        """Run the pruning pre-hooks (``torch.nn.utils.prune``) of the submodules the programs
        traced into, as their own call would: each sets its pruned parameter (``q_bias`` from
        ``q_bias_orig * q_bias_mask``), which the program then reads. They read no tokens, so
        the block evolves (they made it run its own forward, for good and without a word, until
        audit W2 of the thirty-eighth session). Called where ``hooked()`` is False: the
        pre-hooks left are pruning ones."""
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
                 if not isinstance(h, BasePruningMethod)] + \
                [("backward hook", h) for h in (*m._backward_hooks.values(), *m._backward_pre_hooks.values())]
            if hooks and all(family(h) for _, h in hooks):
                self._tell_maps_collected()
            hooks = [(kind, h) for kind, h in hooks if not family(h)]
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
        and were the ones asked; audit W2 of the thirty-eighth session)."""
        for parent_path, names in self.leaves:
            parent = block
            for part in parent_path:
                parent = parent._modules.get(part) if parent is not None else None
            if parent is None:
                continue
            modules = parent._modules
            for name in names:
                m = modules.get(name)
                if m is not None and ((m._forward_pre_hooks and not _pruning_only(m._forward_pre_hooks))
                                      or (m._forward_hooks and self._active(m._forward_hooks))):
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
                    or _global_backward_hooks or _global_backward_pre_hooks or self.hooked())

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


_NO_TORCHSCRIPT = ("`{}` is a converted block, which TorchScript cannot take ({}: its selection "
                   "and per-forward state are Python, and a trace would keep the first call's "
                   "cached constants); use torch.export or torch.compile, and for ONNX "
                   "torch.onnx.export(..., dynamo=True) (docs/export.md)")


_NO_FX = ("`{}` is a converted block, which torch.fx cannot record (torch.fx.symbolic_trace, "
          "torchvision's create_feature_extractor): its token selection and per-forward state "
          "are Python, and the trace would keep the block's own dense forward. Trace with the "
          "converted blocks as leaf modules (create_feature_extractor(model, return_nodes, "
          "tracer_kwargs={{'leaf_modules': [{}]}})); timm's create_feature_extractor takes "
          "no tracer_kwargs: call timm.layers.register_notrace_module on that class first. Or "
          "use torch.export or torch.compile (docs/export.md). torchvision's get_graph_node_names and create_feature_extractor "
          "put the model in train mode before they trace and leave it there after this error: "
          "call model.eval() before evaluating it")


def _apart(block: nn.Module, spec: BlockSpec) -> bool:
    """Whether ``block``, whose runtime no model's entry hook drives (a converted block
    deep-copied apart from its model: ``model.blocks[2] = copy.deepcopy(model.blocks[1])``,
    depth up-scaling), runs inside the forward of a converted model on this thread, which does
    not drive it either: it then runs its own forward, told once per copy with its place. It
    ran through its own runtime without a word, and explain() called its place "removed after
    conversion", until audit F1 of the forty-second session. (Run alone, such copies go on as
    blocks of a method called directly; compiled, they run their own forward:
    :func:`_apart_compiled`.)"""
    rt = spec.runtime
    if torch.compiler.is_compiling():
        return _apart_compiled(rt, spec.name)
    models = _models_running(rt)
    if not models or spec.name in rt.apart_told:
        return bool(models)
    where = _place(block, models) or "this block"
    _tell_copy(rt, spec.name, f"{where} is a copy", "", stacklevel=5)
    return True


def _models_running(rt: EvoRuntime) -> list:
    """The converted models other than ``rt``'s whose forward runs on this thread."""
    return [call[1] for other in list(_RUNTIMES) if other is not rt
            for call in getattr(other._local, "call", None) or ()]


def _place(block: nn.Module, models: list) -> Optional[str]:
    return next((f"`{n}` of {type(model).__name__}" for model in models
                 for n, m in model.named_modules() if m is block), None)


def _foreign(block: nn.Module, spec: BlockSpec) -> bool:
    """Whether ``block``, run outside a forward of the model it was converted in, is a module
    of another converted model whose forward runs (``model_a.blocks[2] = model_b.blocks[2]``
    after both were converted): it then runs its own forward, told once per block. Its
    runtime, that of the other model, has no scores of this forward: it ran as its own forward
    did, without a word, until the forty-fourth session (a copy of a block of the same model
    was told: :func:`_apart`). Blocks of another model called from a hook are no module of the
    running model: they run as blocks of a method called directly."""
    rt = spec.runtime
    where = _place(block, _models_running(rt)) if _RUNTIMES else None
    if where is None:
        return False
    if spec.name not in rt.foreign_told:
        rt.foreign_told = rt.foreign_told | {spec.name}
        _tell_own_forward(f"{where} is the converted block `{spec.name}` of another model (put "
                          "there after both were converted)", "revert the model it came from "
                          "(evoplug.revert(other_model), or put a copy of its original block "
                          "there), then convert this one again: evoplug.convert(evoplug.revert("
                          "model), ...) (said once per block)", stacklevel=4)
    return True


@torch.compiler.assume_constant_result
def _apart_compiled(rt: EvoRuntime, name: str) -> bool:
    """:func:`_apart` while torch.compile (or torch.export) traces the call: no entry hook
    marks a compiled forward of the model, so a copy cannot tell whether one calls it; it runs
    its own forward, as in the model's eager forward, told once per copy when it is traced (run
    while dynamo traces, a constant in the graph: nothing per call). It ran through its own
    runtime without a word until the forty-third session: copies sharing one (``blocks.extend(
    copy.deepcopy(blocks[2:]))``) evolved from each other's scores, 0.03 off the eager forward."""
    if name not in rt.apart_told:
        _tell_copy(rt, name, "a copy", ", is compiled (or exported)", stacklevel=2)
    return True


def _tell_copy(rt: EvoRuntime, name: str, who: str, how: str, stacklevel: int):
    """The warning, once per copy, that a copy of the converted block ``name`` runs its own
    forward (``who``: where it is; ``how``: how it is run). Copies deep-copied together share
    a runtime (``blocks.extend(copy.deepcopy(blocks[2:]))``): each is told (the first alone was,
    until audit H1 of the forty-fourth session)."""
    rt.apart_told = rt.apart_told | {name}
    _tell_own_forward(f"{who} of the converted block `{name}`, made apart from the model it was "
                      f"converted in (copy.deepcopy of the block after the conversion){how}",
                      "convert the model that holds it again: evoplug.convert(evoplug.revert("
                      "model), ...) (said once per copy)", stacklevel=stacklevel + 2)


def _tell_own_forward(what: str, fix: str, stacklevel: int):
    """The warning that a converted block in a place its runtime does not drive (``what``)
    runs its own forward, and how to have it evolve (``fix``)."""
    warnings.warn(f"evoplug: {what}: it runs its own forward, on every token (no speed-up; "
                  f"evoplug.set_options does not reach it). To have it evolve, {fix}",
                  stacklevel=stacklevel + 1)


def _fx_tracing(args, kwargs) -> bool:
    """Whether torch.fx records this call (an argument is a Proxy of its trace)."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing() and any(
        isinstance(v, torch.fx.Proxy) for v in (*args, *kwargs.values()))


class EvoBlockMixin:
    """Mixed in front of the block's own class by :func:`evoplug.convert`."""

    _evoplug_spec: BlockSpec

    def __reduce_ex__(self, protocol):
        # the converted class is made at run time: pickle names the original class
        return (_rebuild_block, (self._evoplug_spec.orig_class,), self.__getstate__())

    def init_non_persistent_buffers(self):
        """timm's convention for buffers no checkpoint holds (``to_empty`` then
        ``reinit_non_persistent_buffers``): the buffers the conversion added (the window index,
        traced constants) get the values it computed, on their current device and dtype; the
        block's own class makes its own, where it can."""
        for name, value in self._evoplug_spec.buffer_values.items():
            cur = self._buffers.get(name)
            if cur is not None:
                self._buffers[name] = value.to(device=cur.device, dtype=cur.dtype)
        own = getattr(super(), "init_non_persistent_buffers", None)
        if own is not None:
            own()

    def _apply(self, fn, recurse=True):
        """A dtype or device change (``.half()``, ``.to(...)``) casts the floating-point buffers
        the conversion added from the values it computed, not from their last cast: after
        ``.bfloat16().float()`` PVTv2's upsampling taps kept their bfloat16 rounding for good,
        and the selection moved (6e-2 off the same weights converted afresh; audit X2 of the
        thirty-ninth session). In place, so a buffer shared by ``share_memory`` stays shared."""
        out = super()._apply(fn, recurse)
        spec = self.__dict__.get("_evoplug_spec")
        if spec is not None:
            with torch.no_grad():
                for name, value in spec.buffer_values.items():
                    cur = self._buffers.get(name)
                    if cur is not None and cur.is_floating_point() and not cur.is_meta:
                        cur.copy_(value)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The block's own keys as always; then the buffers the conversion added (no checkpoint
        holds them) that are on the meta device, after ``model.to('meta')`` and
        ``load_state_dict(..., assign=True)``, get the values it computed, on the loaded
        tensors' device (they stayed on meta: a bare device error in the first forward; audit Y
        of the twenty-fifth session). ``init_non_persistent_buffers`` does it after ``to_empty``."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        spec = self.__dict__.get("_evoplug_spec")
        if spec is None or not any(getattr(self._buffers.get(n), "is_meta", False)
                                   for n in spec.buffer_values):
            return
        loaded = next((v for k, v in state_dict.items() if k.startswith(prefix) and
                       isinstance(v, torch.Tensor) and not v.is_meta), None)
        if loaded is None:
            return
        for name, value in spec.buffer_values.items():
            cur = self._buffers.get(name)
            if cur is not None and cur.is_meta:
                self._buffers[name] = value.to(device=loaded.device, dtype=cur.dtype)

    def __prepare_scriptable__(self):
        raise EvoplugError(_NO_TORCHSCRIPT.format(self._evoplug_spec.name, "torch.jit.script"))

    def forward(self, *args, **kwargs):
        spec = self._evoplug_spec
        if not spec.runtime.served and _apart(self, spec):    # (a copy put in a converted model)
            spec.tokens_run = -1
            return spec.orig_class.forward(self, *args, **kwargs)
        if torch.compiler.is_compiling():      # no hand-on in compiled graphs: nothing to guard
            return self._forward(*args, **kwargs)
        if torch._C._get_tracing_state() is not None:
            raise EvoplugError(_NO_TORCHSCRIPT.format(self._evoplug_spec.name, "torch.jit.trace"))
        if _fx_tracing(args, kwargs):
            raise EvoplugError(_NO_FX.format(self._evoplug_spec.name, "type(block)"))
        rt = self._evoplug_spec.runtime
        local = rt._local
        # outside a forward of the model (``forward_features`` called directly) the block runs
        # admitted like a forward: not while another thread builds a twin, which runs the modules
        # they share with the user's hooks set aside and its analysis' hooks on them
        entry = getattr(local, "entry", None)
        if entry and getattr(local, "last", -1) >= self._evoplug_spec.index:
            # a run of the blocks starts (once per forward): one of the model's forwards this
            # thread left by a KeyboardInterrupt ends here (the blocks of a method called
            # directly went unadmitted, a twin build beside them: audit Q4, twenty-eighth session)
            rt._drop_abandoned(admitted=0)
        outside = not entry
        if outside and _foreign(self, self._evoplug_spec):
            self._evoplug_spec.tokens_run = -1
            return self._evoplug_spec.orig_class.forward(self, *args, **kwargs)
        if outside:
            rt.admit()
        guard = getattr(local, "guard", None)
        if guard is not None and guard.on_stack:   # this block's own ops pass untouched
            guard.off()
        if guard is not None and guard.watched:
            # handed-on tokens reach only the block they were handed to; any other converted
            # block (blocks run in another order, one run twice) gets them in the original order
            cur = getattr(local, "state", None)
            seg = cur.segment if cur is not None else None
            to = seg.out if seg is not None and seg.to == self._evoplug_spec.index else None
            args, kwargs = _stray_restored(guard, args, kwargs, to)
        try:
            return self._forward(*args, **kwargs)
        finally:
            guard = getattr(local, "guard", None)
            if guard is not None and guard.watched:
                guard.on()
            if outside:
                rt.release()

    def _forward(self, *args, **kwargs):
        spec = self._evoplug_spec
        rt = spec.runtime
        twin = _size_twin(spec, args, kwargs) if rt.variants else None
        if twin is not None:
            out = _following(self, twin)(*args, **kwargs)
            spec.tokens_run = twin._evoplug_spec.tokens_run
            return out
        if torch.compiler.is_compiling():
            return self._entered(rt.enter(spec.index), False, args, kwargs)
        if _in_backward():
            return self._entered(None, True, args, kwargs)
        out = self._entered(rt.enter(spec.index, spec.call.tokens(args, kwargs)), False, args, kwargs)
        rt.left(out)
        return out

    def _entered(self, state: Optional[EvoState], recompute: bool, args, kwargs):
        """The block's call from ``state`` (None: recomputed in backward, from the state its
        forward recorded)."""
        spec = self._evoplug_spec
        rt = spec.runtime
        if state is not None and spec.starts_stream and state.index >= 0:
            state = EvoState(-1, state.plan)     # another tower: its own scores, from here
        if state is not None and not torch.is_grad_enabled():
            _mark_untied(rt, args)
        plan = state.plan if state is not None else rt.plan
        role = plan.roles[spec.index]
        opt = plan.options
        segment = state is not None and state.segment is not None
        if not segment and _runs_own_forward(spec, role, opt):
            # the block's own forward (hooks of its submodules fire as always); an evolving
            # block passes the state on unchanged
            spec.tokens_run = -1
            return spec.orig_class.forward(self, *args, **kwargs)
        if spec.suffix_from and not recompute:
            _check_suffix_count(spec)
        bound = _bind(spec, args, kwargs, strict=segment, twins=not recompute, state=state)
        if bound is None:       # a call the conversion did not see: the block's own forward
            spec.tokens_run = -1
            return spec.orig_class.forward(self, *args, **kwargs)
        if isinstance(bound, nn.Module):      # a twin converted for this size: it runs the call
            out = _following(self, bound)(*args, **kwargs)
            spec.tokens_run = bound._evoplug_spec.tokens_run
            return out
        x, extras = bound
        if spec.per_image and not recompute and rt.entered():
            _check_images(spec, x, rt.images())
        if segment:
            state, segment, x = _segment_taken(spec, state, x, recompute, rt._local)
        program = spec.program(self.training, x.shape[0], args, kwargs)
        if program is None:      # (no program at this batch size: told once, in its build)
            spec.tokens_run = -1
            return spec.orig_class.forward(self, *args, **kwargs)
        if role == "evolve" and not rt.leaf_hooks_told and spec.leaves:
            spec.tell_leaf_hooks(self)
        spec.run_pruning()
        if spec.writes and not torch.compiler.is_compiling():
            spec.replay_writes(self)
        record = not torch.compiler.is_compiling() and (
            self.training or torch.is_grad_enabled() or getattr(rt._local, "untied", False))
        if recompute:
            state = _recomputed_state(spec, rt, x, role)
            opt = state.plan.options
            segment = state.segment is not None     # its forward took a segment: so does this
            if segment and tuple(x.shape) != state.segment.shape:
                raise EvoplugError(
                    f"`{spec.name}` runs again in backward (gradient checkpointing) on tokens "
                    "that are not the ones its forward took from the block before it, in the "
                    "selection's order. Checkpoint whole blocks, or set reselect_every=1")
        elif record and not segment:    # a handed-on input was recorded as the output before
            rt.record(x, state)
        if (record or recompute) and not segment and not torch.is_grad_enabled():
            rt.record_checkpointed(state, spec.index)   # (how a reentrant checkpoint runs it)
        if segment:
            out, new, rest = self._run(x, extras, program, state, state.selection, state.g,
                                 state.since_select, state.segment.x0, state.segment.rep0)
        else:
            out, new, rest = self._evolve(spec.layout.tokens(x), extras, program, state, role, opt)
        if new.segment is None:
            out = spec.call.to_call(spec.layout.restore(out, x))
        if record or recompute:
            rt.record(out, new)
        if not recompute:
            rt.leave(new)
        return out if spec.returns is None else spec.returns((out, *rest))

    def _evolve(self, x: torch.Tensor, extras, program, state: EvoState, role: str, opt: EvoOptions):
        """One block on tokens ``x`` (B, N, C) in the original order, from ``state``: (output
        tokens, new state, the other items of a tuple-returning block)."""
        spec = self._evoplug_spec
        B, N, C = x.shape
        P, S = spec.num_prefix, spec.num_suffix
        M = N - P - S
        k = ev.num_keep(M, opt.keep_ratio)
        g, sel = state.g, state.selection
        if g is not None and g.shape[0] == B and g.shape[-1] != N and role == "evolve":
            # a new stage of a pyramid: pool the scores onto this stage's grid
            pooled = None if S or state.num_suffix else ev.carry_scores(
                ev.patch_scores(ev.current_scores(g, sel), state.num_prefix), state.grid, spec.grid)
            g = None if pooled is None else ev.first_scores(pooled[:, None], spec.runtime.ranks(P, x.device), True)
            sel = None
        if role == "score" or g is None or g.shape != (B, 1, N):
            return self._dense(x, extras, program, state, None)       # (re)starts the scores
        if k >= M and opt.identity_fast_path:
            return self._dense(x, extras, program, state, ev.current_scores(g, sel))
        since = state.since_select
        if sel is None or sel.top.shape[-1] != P + S + k or since % opt.reselect_every == 0:
            g = ev.current_scores(g, sel)
            with_rep = opt.representative and k < M
            # (the window is read where ties are taken: near ties at the cut, or the place of the
            # representative; DeiT's selections take neither)
            with_pos = spec.needs_pos or spec.selects_pos
            window = ev.tie_window(x) if spec.near_ties or (with_rep and with_pos) \
                else ev.TIES_FLOAT32
            sel = ev.select(g, k, P + S, C, with_rep, with_pos, spec.near_ties, window)
            since = 0
        rep = ev.representative(x, sel)
        return self._run(ev.gather_subset(x, sel, rep), extras, program, state, sel, g, since, x, rep)

    def _dense(self, x, extras, program, state: EvoState, g):
        """Every token through the block, its row (re)starting (``g`` None) or refreshing the
        scores."""
        spec = self._evoplug_spec
        out, row, *more = program(self, *spec.call.feed(x, extras), None, None)
        spec.tokens_run = x.shape[1]
        if len(more) > 2:
            _set_written(self, more[2])
        if row is not None:
            S = spec.num_suffix
            row = ev.first_scores(ev.untangled(row), spec.runtime.ranks(spec.num_prefix + S, x.device),
                                  spec.full_row, S)
            g = row if g is None else ev.update_scores(g, row, state.plan.options.trade_off)
        new = EvoState(spec.index, state.plan, g, grid=spec.grid, num_prefix=spec.num_prefix,
                       num_suffix=spec.num_suffix)
        return out, new, (more[1] if len(more) > 1 else ())

    def _run(self, sub, extras, program, state: EvoState, sel, g, since: int, x0, rep0):
        """The slow path on ``sub`` [prefix, kept, representative], then either the original
        order restored (fast update) or, inside a segment, ``sub``'s output handed on."""
        spec = self._evoplug_spec
        P, S = spec.num_prefix, spec.num_suffix
        opt = state.plan.options
        N = x0.shape[1]
        if spec.needs_pos and sel.pos is None:
            raise EvoplugError(
                f"`{spec.name}` reads its tokens' original positions (a 2-D map op, a position "
                "term), but runs on a selection made without them by a block before it; set "
                "reselect_every=1")
        sub_extras = gather_extras(spec.name, extras, sel.pos, N, P, S, spec.whole_args,
                                   spec.batch_args, spec.extra_shapes)
        out_sub, row, *fast = program(self, *spec.call.feed(sub, sub_extras), sel.pos, x0)
        rest = fast[1] if len(fast) > 1 else ()
        if len(fast) > 2:
            _set_written(self, fast[2])
        if row is not None:
            if callable(opt.trade_off) and self.training and not torch.is_grad_enabled():
                _check_alpha_learns(spec, opt.trade_off)
            kept = ev.row_at_kept(row, sel, P) if spec.full_row else ev.row_of_kept(row, sel, P)
            sel = ev.refresh(sel, kept, spec.runtime.score_weight(opt.trade_off, P + S,
                                                                   sel.vals.shape[-1], row.device))
        since += 1
        spec.tokens_run = sub.shape[1]
        new = EvoState(spec.index, state.plan, g, sel, since, spec.grid, P, num_suffix=S)
        if since % opt.reselect_every and self._hands_on(state.plan):
            spec.runtime.guard().watch(out_sub, functools.partial(ev.restore, x0, sel=sel, rep=rep0),
                                      spec.name)
            segment = Segment(out_sub, x0, rep0, tuple(out_sub.shape), spec.chain_next.index)
            return out_sub, new._replace(segment=segment), rest
        if fast and fast[0] is not None:   # map block: exact attention update for every token
            base, base_rep = fast[0]
            return ev.restore(base, out_sub, sel, base_rep if rep0 is not None else None), new, rest
        return ev.restore(x0, out_sub, sel, rep0), new, rest

    def _hands_on(self, plan) -> bool:
        """Whether this block may hand its slow-path tokens straight to the next block: the
        next block evolves with the same selection and only it receives this output (chained at
        conversion, inside the model's own forward, no hooks), no compiler is involved (graphs
        see the plain order), and either no autograd (inference) or autograd outside gradient
        checkpointing: not a training-mode forward without autograd (how reentrant
        checkpointing runs its forward), no saved-tensor hooks (non-reentrant checkpointing,
        offloading), not a recomputation in backward. Inside a checkpointed region every block
        restores the order, in its forward and its recomputation alike."""
        nxt = self._evoplug_spec.chain_next
        if (nxt is None or torch.compiler.is_compiling() or plan.roles[nxt.index] != "evolve"
                or not self._evoplug_spec.runtime.entered() or self._evoplug_spec.observed()
                or nxt.observed()):
            return False
        if not torch.is_grad_enabled():
            return not self.training and not getattr(self._evoplug_spec.runtime._local, "untied", False)
        return not _saving_hooks() and not _in_backward()


def _set_written(block: nn.Module, writes):
    """Set what the block's forward sets on itself or a module it traced into, as its program
    computed it ((module path, name, value), rewrite/program.py ``_set_by_forward``): an
    attention map kept for visualisation is then the one of this call, over the tokens the block
    ran (it kept a batch from before the conversion until audit H4 of the forty-fourth session)."""
    for path, name, value in writes:
        setattr(block.get_submodule(path) if path else block, name, value)


def _runs_own_forward(spec: BlockSpec, role: str, opt: EvoOptions) -> bool:
    """Whether the block runs its own forward (every token): a dense block, keep 1.0 on the
    identity fast path (and off it where the forward sets a tensor from its tokens, which the
    evolving path makes in score order: ``state_from_tokens``), a batch of no images, a hook
    on a module its programs traced into (said once per model: BlockSpec.tell_hooked), or a
    call that collects the attention map it returns (BlockSpec.maps_collected)."""
    if role == "dense" or (opt.keep_ratio >= 1.0 and (opt.identity_fast_path or
                                                       spec.state_from_tokens)):
        return True
    if spec.maps_collected is not None and spec.maps_collected():
        spec._tell_maps_collected()
        return True
    if spec.hooked():
        if not spec.runtime.hooked_told:
            spec.tell_hooked()
        return True
    return spec.runtime.images() == 0


def _pruning_only(hooks) -> bool:
    """Whether every hook of a module's forward pre-hooks is torch's pruning (which sets a
    parameter from ``name_orig * name_mask`` and reads no tokens)."""
    return all(isinstance(h, BasePruningMethod) for h in hooks.values())


def _check_unchanged(spec: BlockSpec):
    """Raise where something the block's trace baked in changed since (BlockSpec.changed)."""
    stale = spec.changed() if spec.traced else None
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


def _check_alpha_learns(spec: BlockSpec, alpha):
    """A learnable trade-off read in a training forward without autograd whose tokens need
    gradients (a reentrant checkpoint's forward): the refreshed scores, which carry alpha's
    gradient to the next selection's representative token, leave the checkpoint as state,
    not as an output, so alpha would silently get no gradient."""
    if not getattr(spec.runtime._local, "untied", False):
        return
    with torch.enable_grad():
        a = read_trade_off(alpha)
    if isinstance(a, torch.Tensor) and a.requires_grad:
        raise EvoplugError(
            f"`{spec.name}` runs inside a reentrant gradient checkpoint (use_reentrant=True) "
            "with a learnable trade_off: its score update runs without autograd there, so the "
            "trade-off would get no gradient. Use non-reentrant checkpointing "
            "(use_reentrant=False; timm: set_reentrant_ckpt(False)), or a fixed trade_off")


def _mark_untied(rt: EvoRuntime, args):
    """A forward without autograd whose tokens need gradients runs inside a reentrant
    checkpoint (an eval-mode one too: input gradients, saliency): from here on this forward
    records its states for the recomputation and hands no tokens on, as a train-mode forward
    without autograd does."""
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        rt._local.untied = True


def _segment_taken(spec: BlockSpec, state: EvoState, x: torch.Tensor, recompute: bool, local):
    """(state, whether this block takes the segment in progress, its tokens): not when the
    tokens were handed to another block (blocks run in another order than at conversion), nor
    when the handed-on tokens were read (the guard restored them: a dropout between the blocks)
    or replaced before this block; then it starts from its input, in the original order, with
    the selection in force. Handed-on tokens written into in place (``x[:, 0] = 0`` between the
    blocks) are taken as the guard restored them, where the write landed (until the twenty-sixth
    session the block took the handed-on tensor, and the write was lost). (An input of the
    handed-on shape that is neither the handed-on tensor nor made after its tokens were
    restored is refused: its order cannot be told.)"""
    seg = state.segment
    guard = getattr(local, "guard", None)
    restored, written = guard.seen(seg.out) if guard is not None and not recompute else (None, False)
    if x is seg.out and written:
        return state._replace(segment=None), False, restored
    if seg.to != spec.index or (x is not seg.out and not recompute and (
            tuple(x.shape) != seg.shape or restored is not None)):
        return state._replace(segment=None), False, x
    _check_segment_arrived(spec.name, x, seg)
    return state, True, x


def _stray_restored(guard, args, kwargs, expected):
    """The call's arguments, a handed-on tensor other than ``expected`` in the original order."""
    def fix(v):
        return guard.restored(v) if isinstance(v, torch.Tensor) and v is not expected else v
    return tuple(fix(v) for v in args), {k: fix(v) for k, v in kwargs.items()}


def _rebuild_block(orig_class: type):
    """Unpickling: an empty instance of the converted class of ``orig_class``."""
    return object.__new__(evo_class(orig_class))


def _bind(spec: BlockSpec, args, kwargs, strict: bool, twins: bool = False,
          state: Optional[EvoState] = None):
    """The token input and other tensor arguments of a call that runs the program, after
    checking that nothing it traced changed (:meth:`BlockSpec.changed`); None for a call the
    conversion did not see (DINO's get_last_selfattention passes return_attention=True), which
    runs the block's own forward, on every token, exactly (``strict``: raise instead).
    ``twins``: a call of another size outside the model's own forward (``forward_features``
    called directly, or under torch.compile, whose graphs skip the model's entry hook) runs the
    block of a twin an earlier eager call of the model converted for that size, when one takes
    it (returned instead of the binding; compiled, the failed binding is a graph break).
    ``state``: the forward's; where no block of it has scored tokens yet, a call whose tensor
    arguments differ from the analysed ones only in being None or not (a padding mask) runs the
    form twin for it (:func:`_form_twin`)."""
    _check_unchanged(spec)
    try:
        bound = _bound(spec, args, kwargs)
    except AnalysisError as e:
        if strict:
            raise
        if getattr(spec.call.tokens(args, kwargs), "is_nested", False):
            # (a call the conversion did not see: nested tokens without the padding mask)
            _tell_nested(spec)
            return None
        if torch.compiler.is_exporting():     # an exported program is no place for a quiet fallback
            raise EvoplugError(
                f"`{spec.name}` cannot run its evolving program in this export: "
                f"{e.reason.split('; re-run')[0]}. The exported program would run it on every "
                "token (the dense model). Export at the input size and with the arguments the "
                "model was converted with (docs/export.md)") from None
        if twins and spec.runtime.variants and not spec.runtime.entered():
            twin = _twin_taking(spec, args, kwargs)
            if twin is not None:
                return twin
        if state is not None and state.g is None and state.segment is None and \
                not torch.compiler.is_compiling():
            twin = _form_twin(spec, args, kwargs)
            if twin is _SAID:
                return None
            if twin is not None:
                return twin
        # (the size hint where the call differs in its sizes, not in a flag such as
        # transformers' output_attentions=True, which needs every token's attention)
        hint = "" if spec.runtime.entered() or not e.sized else (
            "; a call of the model itself (eager or compiled) with a new input size converts a "
            "twin for it, which methods such as forward_features called directly then use at "
            "that size too")
        warnings.warn(f"evoplug: {e.reason.split('; re-run')[0]}: `{spec.name}` runs its original "
                      f"forward (every token) for such calls{hint}", stacklevel=6)
        return None
    if bound[0].is_nested:      # (the one attribute read on the common path)
        _tell_nested(spec)
        return None
    return bound


def _tell_nested(spec: BlockSpec):
    """Once per model: a block given its tokens as a nested tensor runs its own forward, which
    takes one (nn.TransformerEncoder's fast path makes one of a padded batch in inference when
    built with ``enable_nested_tensor=True``, its default); the program, on padded tokens,
    raised torch's "NestedTensorImpl doesn't support sizes" until audit A4 of the fortieth
    session."""
    if spec.runtime.nested_told:
        return
    spec.runtime.nested_told = True
    warnings.warn(f"evoplug: `{spec.name}` is given its tokens as a nested tensor (nn."
                  "TransformerEncoder's fast path for a padded batch in inference, with "
                  "enable_nested_tensor=True): it runs its original forward (every token), as "
                  "every converted block given one does. Build the encoder with "
                  "enable_nested_tensor=False to evolve padded batches", stacklevel=7)


def _bound(spec: BlockSpec, args, kwargs):
    """``spec.call.bind``, and for a map block its map checked against the conversion's (the
    programs' window indices and map views are that map's): AnalysisError if either differs."""
    bound = spec.call.bind(spec.name, args, kwargs)
    for n, t in bound[1].items():
        want = spec.extra_shapes.get(n)
        if want is not None and t.dim() != len(want):
            # (EVA's rotary table gathered per image by timm's patch dropout in training: (B, 1,
            # N', d) where the program took (N, d))
            raise AnalysisError(spec.name, f"its argument {n!r} has shape {tuple(t.shape)}, of "
                                f"another rank than when it was analysed {want}", sized=True)
    if spec.windowed_tokens is not None and bound[0].shape[1] != spec.windowed_tokens:
        # (MAE's visible tokens of a masked Hiera: the windows were cut from all of them)
        raise AnalysisError(spec.name, f"its windows were cut from {spec.windowed_tokens} tokens, "
                            f"and it has {bound[0].shape[1]} (a call that dropped tokens, as MAE's "
                            "masking does)", sized=True)
    if spec.layout is MapTokens and tuple(bound[0].shape[1:3]) != spec.grid:
        raise AnalysisError(spec.name, f"its token map is {tuple(bound[0].shape[1:3])}, the "
                            f"map it was analysed on {spec.grid}", sized=True)
    return bound


def _twin_taking(spec: BlockSpec, args, kwargs, sticky: bool = True) -> Optional[nn.Module]:
    """The block of a size twin (runtime/state.py SizeVariant) whose program takes this call,
    with the twin's modes synced; None if none. Where the block's trailing special tokens follow
    a boolean argument's count (``suffix_from``), only a twin converted at the block's count: a
    compiled call has it (state.py refuses another), and twins of one size at other counts have
    the same shapes (a compiled call at 48 px with 8 masked ran the twin for 24 that an eager
    call had converted first, 1.0 off, until the forty-second session)."""
    for variant in list(spec.runtime.variants.values()):
        twin = variant.blocks[spec.index]
        if variant.stale() or (spec.suffix_from and twin._evoplug_spec.num_suffix != spec.num_suffix):
            continue                # (a stale one: the next call of the model converts anew)
        try:
            _bound(twin._evoplug_spec, args, kwargs)
        except AnalysisError:
            continue
        variant.sync()
        if sticky and not torch.compiler.is_compiling():
            spec.runtime._local.direct = (variant, spec.index)      # (see _sticky_twin)
        return twin
    return None


def _check_suffix_count(spec: BlockSpec):
    """A block whose trailing special tokens are as many as a boolean argument of the model's
    has True (or False) entries per image (``suffix_from``: VideoMAE's decoder trails one mask
    token per True entry of ``bool_masked_pos``) learns that count only from a call of the model
    (state.py ``counted``). Called outside one (``model.decoder(x, n)`` called directly) it
    cannot tell how many of its tokens are special: refused by name. (It kept the conversion's
    count, ranking mask tokens as patches, 2.6 off with 24 mask tokens where it was converted
    at 8, until the forty-second session.) While compiling, the model's forwards dynamo traces
    are counted instead (``EvoRuntime.compiled_entries``; a compiled direct call ran at the
    conversion's count until the forty-third session); the entry hook refuses the model's
    compiled calls at another count."""
    owner = spec.runtime.parent or spec.runtime       # (a size twin's: the model's runtime)
    if getattr(owner._local, "entry", None) or \
            torch.compiler.is_compiling() and owner.compiled_entries > 0:
        return
    arg, value = spec.suffix_from[0]
    raise EvoplugError(
        f"`{spec.name}` keeps its last tokens as special tokens, as many as the model's argument "
        f"`{arg}` has {value} entries per image ({spec.num_suffix} at the conversion), a count "
        "only a call of the model gives: called outside the model's forward (a module holding "
        "it called directly), it cannot tell how many of its tokens are special. Call the "
        "model itself, or set keep_ratio=1.0 for such calls")


def _form_twin(spec: BlockSpec, args, kwargs) -> Optional[nn.Module]:
    """In a forward of the model, the first block that runs a program, called with a tensor
    argument that is None where its analysis had a tensor or the reverse: the block of the twin
    converted on this forward's call (runtime/state.py SizeVariant; on 2 of its images that
    give its form, api.py ``_form_images``, else on all), which the rest of the forward runs.
    Such arguments follow the data: transformers passes a padding mask only when some image of
    the batch is padded (``None`` for a batch without padding), so a model converted on either
    form met the other in ordinary batches; its blocks ran their original forward then, and an
    image's output depended on the images batched with it (up to 2.5 apart on Siglip2), until
    the twenty-fourth session. None when the call differs in another way, or outside a model
    forward."""
    rt = spec.runtime
    owner = rt.parent or rt          # (a size twin's block: the model's runtime keeps the twins)
    call = owner.call()
    if call is None or call[0].factory is None:
        return None
    plan = spec.call
    try:
        values = plan.arguments(spec.name, args, kwargs)
    except AnalysisError:
        return None
    flipped, other, form = _other_form(plan, values)
    if form is None:
        return None
    hook, model, cargs, ckwargs = call
    key = (input_key(cargs, ckwargs, hook.batch_dims), form)
    if key in owner._no_form:
        # (its one warning was given: each block, at each call, said it again, audit V3 of the
        # thirty-seventh session)
        return _SAID
    if other and len(_flag_values(owner, other)) >= _FLAG_TWINS:
        # (a flag that changes with every call, a step count, would convert a twin each time)
        owner._no_form[key] = "too many values"
        warnings.warn(f"evoplug: `{spec.name}` is called with {', '.join(other)} of "
                      f"{_FLAG_TWINS} other values already, each of which converted a twin of the "
                      "model; for further values the blocks run their own forward (every token)",
                      stacklevel=7)
        return _SAID
    make = hook._factory()

    def takes(variant) -> bool:
        try:
            _bound(variant.blocks[spec.index]._evoplug_spec, args, kwargs)
        except AnalysisError:
            return False
        return True

    def build(m, a, k):     # on 2 images that give the call's form; else on all of them
        try:
            variant = make(m, a, k, on="form")
        except Exception:       # (a twin on all images may still convert)
            return make(m, a, k, on="all")
        return variant if takes(variant) else make(m, a, k, on="all")
    try:
        variant = owner.variant_for(key, build, model, cargs, ckwargs)
    except Exception as e:      # (the forward goes on as before the twins: each block its own)
        owner._no_form[key] = str(e)
        warnings.warn(f"evoplug: `{spec.name}` is called with {', '.join(flipped)} in another form "
                      f"than when it was analysed (None or a tensor, or another value), and "
                      f"converting the model on this call failed: {e}; the blocks run their own "
                      "forward (every token) for such calls", stacklevel=7)
        return _SAID
    if not takes(variant):
        return None
    variant.sync()
    owner.use_variant(variant)
    return variant.blocks[spec.index]


#: :func:`_form_twin`: the call's form was refused before, with a warning; the block runs its
#: original forward without another
_SAID = object()


def _other_form(plan, values):
    """How a call's arguments differ from the analysed ones in form: (the tensor arguments that
    are None where the analysis had a tensor or the reverse, and the flags of another value; the
    form's key, None where neither). A flag of another value: transformers' BEiT layers read
    ``interpolate_pos_encoding``, which a caller may pass at every size: at the conversion's
    size they ran their own forward, with a warning per layer and call (audits Q and T of the
    twenty-fifth session)."""
    flipped = [n for n in plan.names if n not in plan.packed and (
        (n in plan.tensor_args and values.get(n) is None) or
        (n in plan.constants and plan.constants[n] is None and isinstance(values.get(n), torch.Tensor)))]
    other = [n for n in plan.names if n not in plan.packed and n in plan.constants and n in values
             and _plain(plan.constants[n]) and _plain(values[n]) and values[n] != plan.constants[n]]
    if not flipped and not other:
        return flipped, other, None
    form = ("form", tuple((n, values.get(n) is None) for n in flipped) +
            tuple((n, "=", values[n]) for n in other))
    return flipped + other, other, form


#: twins converted for other values of a block's flags, at most (per flag)
_FLAG_TWINS = 4


def _flag_values(owner, names) -> set:
    """The values of the flags ``names`` that form twins were converted (or tried) for."""
    keys = list(owner.variants) + list(owner._no_form)
    return {e for k in keys if len(k) == 2 and isinstance(k[1], tuple) and k[1][:1] == ("form",)
            for e in k[1][1] if len(e) == 3 and e[0] in names}


def _plain(v) -> bool:
    """A flag's value (None, a bool, a number, a string): another one makes a form twin."""
    return v is None or isinstance(v, (bool, int, float, str))


def _following(block: nn.Module, twin: nn.Module) -> nn.Module:
    """The twin's block with the plain tensor attributes the model's block holds now (not its
    parameters, buffers or submodules, which the twin shares): prune's pruned weight, which its
    forward pre-hook on the model's block sets anew at each call, or the hook-based
    ``weight_norm``'s. The twin copied the block's attributes when it was built and read those
    (off by 1.2 after prune, audit O of the twenty-fifth session); one the block no longer holds
    leaves the twin (after ``prune.remove`` a stale copy hid the parameter again). Rescanned only
    when the block's attributes are added or removed (a pre-hook replaces a value: same keys)."""
    d, t = block.__dict__, twin.__dict__
    spec = twin._evoplug_spec
    size, names = spec.attributes
    if size != len(d):
        names = tuple(k for k, v in d.items() if isinstance(v, torch.Tensor))
        for k in [k for k, v in t.items() if isinstance(v, torch.Tensor) and k not in d]:
            del t[k]
        spec.attributes = (len(d), names)
    for k in names:
        v = d[k]
        if t.get(k) is not v:
            t[k] = v
    return twin


def _size_twin(spec: BlockSpec, args, kwargs) -> Optional[nn.Module]:
    """The block of the size twin this call runs: the one the model's forward runs with (an
    input of another size), or in a method called directly at a twin's size the twin an earlier
    block of it ran; None: this block runs the call."""
    rt = spec.runtime
    variant = rt.variant()
    if variant is not None and not spec.hooked():     # a forward of another input size
        _check_unchanged(spec)          # (the twin copied the block's attributes)
        return variant.blocks[spec.index]
    if rt.entered():
        return None
    if not torch.compiler.is_compiling() and _in_backward():
        return _recomputed_twin(spec, args, kwargs)
    return _sticky_twin(spec, args, kwargs)


def _recomputed_twin(spec: BlockSpec, args, kwargs) -> Optional[nn.Module]:
    """In backward, a block recomputed by gradient checkpointing whose forward ran a size
    twin's block (the model's forward has ended: no variant in force): that twin's block, found
    by the state its forward recorded with the block's input, which belongs to the twin's own
    runtime. (Recomputed as the block itself, it ran every token: wrong gradients under
    reentrant checkpointing, a CheckpointError under non-reentrant, until the twenty-third
    session.)"""
    rt = spec.runtime
    try:
        x = spec.call.arguments(spec.name, args, kwargs).get(spec.call.token_arg)
    except AnalysisError:
        return None
    if not isinstance(x, torch.Tensor):
        return None
    # the model's own records, else the nearest state upstream in the autograd graph (whichever
    # runtime made it: the nodes carry it), found once; a reentrant checkpoint's input is a
    # leaf with no graph, recorded by the twin's runtime only
    state = rt.recall(x, spec.index)
    if state is not None and state.plan is rt.plan:
        return None
    for variant in list(rt.variants.values()):
        twin = variant.blocks[spec.index]
        trt = twin._evoplug_spec.runtime
        found = state if state is not None else trt.recall(x, twin._evoplug_spec.index)
        if found is not None and found.plan is trt.plan:
            return twin
    if state is not None:
        return None
    # nothing recorded names it (the stage's input, a block run in its own forward before it:
    # PVTv2's first stage under non-reentrant checkpointing at another size): the forward's
    # rule, a twin's block that takes a call the block does not (see _bind); the block itself
    # ran every token, and a scoring block saved fewer tensors than its forward, torch's raw
    # CheckpointError, until the forty-fourth session
    try:
        _bound(spec, args, kwargs)
        return None
    except AnalysisError:
        return _twin_taking(spec, args, kwargs, sticky=False)


def _sticky_twin(spec: BlockSpec, args, kwargs) -> Optional[nn.Module]:
    """In a method called directly (``forward_features``) whose earlier block ran a size
    twin's block, the same twin's block for this one when it takes the call: a block whose
    shapes are also those of another size (PVTv2's last 2x2 stage at 48 and 64 px) ran that
    size's block, from scores it did not have (the output then differed from the model's
    forward at that size, and with the twins built before)."""
    if torch.compiler.is_compiling():
        return None
    local = spec.runtime._local
    held = getattr(local, "direct", None)
    if held is None:
        return None
    variant, last = held
    if spec.index <= last:            # a new forward
        local.direct = None
        return None
    twin = variant.blocks[spec.index]
    try:
        _bound(twin._evoplug_spec, args, kwargs)
    except AnalysisError:
        local.direct = None
        return None
    local.direct = (variant, spec.index)
    return twin


def _check_images(spec: BlockSpec, x: torch.Tensor, images: Optional[int]):
    """A block must see as many token sequences per image as at calibration: a model that
    packs several images into one sequence (transformers' Pixtral) would have their tokens
    ranked together."""
    if images is not None and x.shape[0] != images * spec.per_image:
        raise EvoplugError(
            f"`{spec.name}` runs on a batch of {x.shape[0]} token sequence(s) for {images} "
            f"image(s), where the conversion saw {spec.per_image} per image: the model packs or "
            "regroups its images before this block (several images in one sequence), and "
            "evoplug would rank the tokens of different images together. Call it with one "
            "image at a time, or leave it dense")


def _check_segment_arrived(name: str, x: torch.Tensor, segment: Segment):
    """A block after one that handed its kept tokens on must get exactly that output, and with
    autograd when it was made with autograd."""
    if x is not segment.out:
        raise EvoplugError(
            f"`{name}` did not receive the output of the converted block before it, unlike in "
            "the forward evoplug analysed: that block handed its kept tokens on in the "
            "selection's order. Convert with an example input that runs the model this way, or "
            "set reselect_every=1")
    if segment.out.requires_grad and not torch.is_grad_enabled():
        raise EvoplugError(
            f"`{name}` runs without autograd (reentrant gradient checkpointing around it, or "
            "torch.no_grad) right after a converted block that ran with autograd and handed its "
            "kept tokens on in the selection's order: the gradients of the tokens it did not "
            "keep would be lost. Checkpoint every converted block or none, use non-reentrant "
            "checkpointing (use_reentrant=False), or set reselect_every=1")


def _recomputed_state(spec: BlockSpec, rt: EvoRuntime, x: torch.Tensor, role: str) -> EvoState:
    """The state a block recomputed in backward ran with in its forward."""
    if role == "score":   # a scoring block starts the scores from its own attention
        return EvoState(-1, rt.plan)
    state = rt.recall(x, spec.index)
    if state is not None and state.plan != rt.plan:
        raise EvoplugError(
            f"`{spec.name}` runs again in backward (gradient checkpointing) after "
            "evoplug.set_options changed the options of its forward: the recomputation would "
            "not match the forward. Change options between training steps, not between a "
            "forward and its backward")
    if state is None:
        raise EvoplugError(
            f"`{spec.name}` runs again in backward (gradient checkpointing), but evoplug "
            "cannot trace its input back to the forward it belongs to, so it cannot know which "
            "tokens that forward selected. Checkpoint whole blocks (timm's "
            "set_grad_checkpointing, torch.utils.checkpoint around converted blocks), or "
            "convert with keep_ratio=1.0 for this run")
    return state


def gather_extras(block: str, extras, pos: torch.Tensor, N: int, P: int, S: int = 0, whole=(),
                  batched=(), shapes=None):
    """The block's other tensor arguments for a subset run: each gathered (:func:`gather_extra`)
    but those the program gathers itself (``whole``); ``batched``: the names of those whose
    first dim was the batch at calibration. An argument whose first dim was 1 there (one
    calibration image: read as one table for all) and is the batch now (``shapes``: the
    calibration's) holds one per image: gathered so (a mask made from integer ids, which the
    noise does not reach, was gathered as one table and its (B, N) raised a shape error in the
    block; audit of the twenty-ninth session)."""
    B = pos.shape[0] if pos is not None else 1     # (None: every token, in order)
    grown = () if B == 1 or not shapes else tuple(
        n for n, t in extras.items() if n not in batched and isinstance(t, torch.Tensor) and
        t.dim() >= 2 and t.shape[0] == B and
        len(shapes.get(n, ())) == t.dim() and shapes[n][0] == 1)
    return {n: t if n in whole else gather_extra(block, n, t, pos, N, P, S, n in batched or n in grown)
            for n, t in extras.items()}


def gather_extra(block: str, name: str, t: torch.Tensor, pos: torch.Tensor, N: int, P: int,
                 S: int = 0, batched: bool = False):
    """Other tensor arguments of the block follow the selected tokens: a trailing (N, N) pair
    (bias or mask) is gathered on both token dims; a dim of size N by token index; a dim of
    size M = N - P - S (patch-only terms such as EVA's rotary embedding) by patch index (the
    subset's P + S special tokens come first)."""
    if batched and t.dim() == 3 and t.shape[-2:] == (N, N):
        # a pair term per image (B, N, N): gathered image by image (taken for (1, heads, N, N),
        # it came out (B, B, n, n), a raw shape error in the probes; audit Q5 of the
        # twenty-eighth session)
        return ev.gather_pair_bias(t.unsqueeze(1), pos).squeeze(1)
    if (t.dim() >= 2 and t.shape[-2:] == (N, N)) or (t.dim() == 4 and t.shape[-2:] in ((1, N), (N, 1))):
        # (a key mask (B or 1, 1, 1, N) too: gathered per token it came out of rank 5, a shape
        # error in the program after a twin analysed on a (1, 1, N, N) mask; audit S of the
        # twenty-fifth session)
        return ev.gather_pair_bias(t, pos)
    first = 1 if batched and t.shape[0] in (1, pos.shape[0]) else 0    # (not the batch dim)
    for dim, size in enumerate(t.shape[first:], first):
        if size == N:
            return ev.gather_token_arg(t, pos, dim, batched)
    for dim, size in enumerate(t.shape[first:], first):
        if size == N - P - S:
            return ev.gather_token_arg(t, pos[:, P + S:] - P, dim, batched)
    # no token dim: one value per image or for all (DiT's adaLN conditioning (B, C)), the same
    # for every token of an image and for a subset of them (refused until the twenty-eighth
    # session; the analysis' probes run the subset with it)
    return t


_GONE = object()


def leaf_groups(paths) -> Tuple[Tuple[Tuple[str, ...], Tuple[str, ...]], ...]:
    """:attr:`BlockSpec.leaves` of submodule paths: (parent's path parts, child names), so a
    forward finds them with one dict look-up each (``attn.qkv``, ``norm1``)."""
    groups: Dict[Tuple[str, ...], list] = {}
    for path in paths:
        *parent, name = path.split(".")
        groups.setdefault(tuple(parent), []).append(name)
    return tuple((parent, tuple(names)) for parent, names in groups.items())


def traced_state(block: nn.Module, paths, attributes: Callable, volatile=None, leaves=(),
                 settings: Optional[Callable] = None) -> Tuple:
    """For :attr:`BlockSpec.traced`: every module under the block's attention paths
    (traced into), each with its parent, name and plain attributes (``attributes(m)``, a
    dict) but those a forward sets (``volatile``: {id(module): names}), and what a family says
    its forward read besides (``settings(m)``); not the modules the programs call by path
    (``leaves``) and what is inside them: those run live."""
    volatile = volatile or {}
    live = tuple(leaves)

    def entry(parent, path, m):
        skip = set(volatile.get(id(m), ())) | (_READ_OUTSIDE if m is block else set())
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
            if id(m) in seen or any(sub == p or sub.startswith(p + ".") for p in live):
                continue
            seen.add(id(m))
            pp = sub.rpartition(".")[0]
            out.append(entry(block.get_submodule(pp) if pp else block, sub, m))
    return tuple(out)


def traced_writes(traced: Tuple, volatile) -> Tuple[Tuple[str, str, Any], ...]:
    """For :attr:`BlockSpec.writes`: the plain attributes the calibration's forward set on the
    modules of :func:`traced_state` (``volatile``: {id(module): {name: value}})."""
    return tuple((path, k, v) for _, _, path, m, *_ in traced
                 for k, v in (volatile or {}).get(id(m), {}).items())


def _code(m: nn.Module) -> Tuple:
    """What decides the code a module's forward runs: its class, the forward that class
    has, a forward set on the instance (``m.forward = ...``)."""
    cls = type(m)
    return cls, cls.forward, m.__dict__.get("forward")


#: a block's own attributes read outside its traced forward: not checked by changed()
_READ_OUTSIDE = {"gradient_checkpointing"}

#: converted classes by original class, while a converted block holds one: a parametrized
#: block's class is torch's, one per module, and the cache kept each of them alive for good
_CLASS_CACHE: "weakref.WeakValueDictionary[type, type]" = weakref.WeakValueDictionary()
_CLASS_LOCK = threading.Lock()


def _new_class_lock():          # (a child forked while another thread held it: never released)
    global _CLASS_LOCK
    _CLASS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_class_lock)


def evo_class(cls: type) -> type:
    """The converted class of a block class (one per original class)."""
    if issubclass(cls, EvoBlockMixin):
        return cls
    with _CLASS_LOCK:
        new = _CLASS_CACHE.get(cls)
        if new is None:
            new = type(f"Evo{cls.__name__}", (EvoBlockMixin, cls), {"__module__": cls.__module__})
            _CLASS_CACHE[cls] = new
    return new
