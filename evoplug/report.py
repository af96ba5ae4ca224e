"""What a conversion found and did: the report on the converted model, the table
:func:`explain` prints, and the tokens each block ran in the last forward."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from torch import nn

from .errors import ConversionError
from .options import EvoOptions
from .runtime import evolve as ev
from .runtime.block import EvoBlockMixin
from .runtime.spec import BlockSpec

if TYPE_CHECKING:
    from .analyse.block import BlockAnalysis


@dataclasses.dataclass(eq=False)
class ConversionReport:
    """What :func:`convert` found and did; ``str()`` is the table :func:`explain` prints.
    Compared by identity (the report of one conversion; hashable)."""
    model_class: str
    _options: EvoOptions               # (read-only ``options``; evoplug.set_options changes it)
    blocks: List[BlockSpec]
    failed: List[Tuple[str, str]]      # candidate blocks that could not be converted
    skipped: List[Tuple[str, str]]     # modules with attention that are not token blocks
    entry_hooks: Tuple[int, ...] = ()  # ids of the hooks on the model (runtime/entry.py EntryHook)
    #: top-1 agreement with the dense model per global query, when ``convert(images=...)`` chose
    query_agreement: Optional[Dict[str, float]] = None
    #: converted blocks no longer in the model (timm's ``prune_intermediate_layers``, a block
    #: replaced or deleted after conversion), as of the last :func:`get_report`
    removed: List[str] = dataclasses.field(default_factory=list)
    #: converted blocks that moved (``del model.blocks[1]`` renumbers the ones after it):
    #: their path at conversion -> their path now, as of the last :func:`get_report`
    moved: Dict[str, str] = dataclasses.field(default_factory=dict)
    #: of ``removed``, those whose place holds another module now (a block put there after
    #: conversion, or a converted block deep-copied there): it runs its own forward, as of the
    #: last :func:`get_report`
    replaced: List[str] = dataclasses.field(default_factory=list)
    #: converted blocks deep-copied into the model after conversion in no converted block's
    #: place (``model.blocks.append(copy.deepcopy(model.blocks[-1]))``): their path -> the name
    #: of the converted block they copy; they run their own forward, as of the last
    #: :func:`get_report`
    copied: Dict[str, str] = dataclasses.field(default_factory=dict)
    #: modules whose forward adds the residual branches of pairs (``x = attn(x) + x``) that the
    #: conversion regrouped into blocks (``runtime/pairs.py``), by name
    regrouped: Tuple[str, ...] = ()

    def path(self, spec: BlockSpec) -> str:
        """Where the converted block ``spec`` is in the model now (as of the last report)."""
        return self.moved.get(spec.name, spec.analysis.name)

    def __str__(self) -> str:
        return format_report(self)

    def __repr__(self) -> str:
        return (f"<ConversionReport of {self.model_class}: {len(self.blocks)} block(s) converted, "
                f"{len(self.failed)} not converted, {len(self.skipped)} skipped; {self._options}>")

    @property
    def options(self) -> EvoOptions:
        """The options in force (frozen, and not assignable: :func:`set_options` changes them,
        and the runtime with them)."""
        return self._options

    @options.setter
    def options(self, value):
        raise AttributeError("the options of a converted model change with "
                             "evoplug.set_options(model, ...), which checks them and tells the "
                             "runtime; assigning the report's would only change what explain() says")

    def __setstate__(self, state):
        if "options" in state:          # (a report pickled before the twenty-second session)
            state["_options"] = state.pop("options")
        state.setdefault("replaced", [])    # (one pickled before the forty-second session)
        state.setdefault("copied", {})      # (one pickled before the forty-third session)
        self.__dict__.update(state)

    @property
    def unscored(self) -> List[str]:
        """The evolving blocks no global scores reach under the options in force: they run
        every token (``explain()`` marks them; a strict conversion refuses them)."""
        idle = unscored([s.analysis for s in self.blocks], [s.role for s in self.blocks],
                        [s.index for s in self.blocks if s.starts_stream])
        return [self.blocks[i].name for i in idle]

    @property
    def too_few(self) -> List[str]:
        """The evolving blocks with too few tokens to run fewer under the options in force: the
        kept ones and the representative are all of them (``explain()`` marks them). None at
        keep 1.0, which runs every token of every block (every one was listed until the
        forty-third session, audit G2)."""
        o = self.options
        return [s.name for s in self.blocks if s.role == "evolve" and o.keep_ratio < 1 and
                ev.runs_every_token(s.analysis.num_tokens - s.analysis.num_prefix -
                                    s.analysis.num_suffix, o.keep_ratio, o.representative)]


def gives_row(a: BlockAnalysis) -> bool:
    """Whether the block's programs return a global attention row (windowed attention whose
    windows could not be mapped back to the tokens gives none)."""
    return not a.windowed or a.row_full


def unscored(analyses, roles, starts=()) -> List[int]:
    """Positions of the evolving blocks that no global scores reach: they run every token, as
    the runtime's ``EvoBlockMixin._evolve`` does when it holds no scores. Follows the scores
    the way the runtime carries them: started by the scoring block's row (or restarted by the
    first block with a row), kept through row-less blocks, pooled onto a new stage's grid when
    both grids are known, lost otherwise."""
    out, have, prev = [], False, None
    for i, (a, role) in enumerate(zip(analyses, roles)):
        if i in starts:       # another token stream: its scores start again
            have = False
        if role == "dense":
            continue
        if role == "evolve" and have and a.num_tokens != prev.num_tokens:
            have = ev.can_carry(prev.grid, a.grid) and not (prev.num_suffix or a.num_suffix)
        if role == "score" or not have:
            if role == "evolve":
                out.append(i)
            have = gives_row(a)
        prev = a
    return out


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` (or a module inside it) holds blocks converted by evoplug."""
    return any(isinstance(m, EvoBlockMixin) for m in model.modules())


def converted_inside(model: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """(the path of a converted model inside ``model``, of its first converted block), each
    None where there is none: what errors about a model that is not itself converted name."""
    inner = next((n for n, m in model.named_modules()
                  if n and getattr(m, "_evoplug_report", None) is not None), None)
    block = next((n for n, m in model.named_modules() if isinstance(m, EvoBlockMixin)), None)
    return inner, block


def get_report(model: nn.Module) -> ConversionReport:
    """The :class:`ConversionReport` of a converted model (options, converted blocks with their
    analyses, failed and skipped modules); a :class:`ConversionError` for any other model,
    naming the converted model inside it where there is one."""
    report = getattr(model, "_evoplug_report", None)
    if report is None:
        # a wrapper (AveragedModel, timm's ModelEma, DDP, Sequential) holding a converted model
        inner, block = converted_inside(model)
        hint = f"; `{inner}` inside it is: pass that (model.{inner})" if inner else ""
        if not inner and block is not None:
            # (peft's merge_and_unload of a converted PeftModel: the blocks still evolve, the
            # report stayed on the wrapper; audit O of the twenty-fifth session)
            hint = (f"; it holds blocks converted as part of another model (`{block}`): the "
                    "model evoplug.convert was given (a wrapper, such as peft's PeftModel before "
                    "merge_and_unload, or a model this one was taken out of) has the report: pass "
                    "that, or convert an unconverted copy of this one")
        raise ConversionError(f"{type(model).__name__} was not converted by evoplug{hint}")
    where = _where(model, report)
    report.removed = [b.name for b in report.blocks if id(b) not in where]
    report.moved = {b.name: where[id(b)] for b in report.blocks
                    if id(b) in where and where[id(b)] != b.name}
    report.replaced = [n for n in report.removed if n not in where.values() and _holds(model, n)]
    report.copied = _copied(model, report)
    return report


def _copied(model: nn.Module, report: ConversionReport) -> Dict[str, str]:
    """:attr:`ConversionReport.copied`: converted blocks whose runtime no model drives (copied
    apart from their model, runtime/block.py ``_apart``) in places that held no converted block
    (a copy appended after the last converted block ran its own forward, warned, but explain()
    and tokens_per_block() did not list it, until the forty-third session)."""
    mine = {id(b) for b in report.blocks}
    return {n: m._evoplug_spec.name for n, m in model.named_modules()
            if isinstance(m, EvoBlockMixin) and id(m._evoplug_spec) not in mine
            and not m._evoplug_spec.runtime.served and n not in report.replaced}


def _holds(model: nn.Module, path: str) -> bool:
    """Whether a module is at ``path`` in ``model`` (a removed block's place that holds another
    one was reported "removed after conversion", though that one ran: audit F1 of the
    forty-second session)."""
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _where(model: nn.Module, report: ConversionReport) -> Dict[int, str]:
    """id(spec) -> the path of the converted block that holds it, for the blocks still in the
    model, wherever they are now (a block found by its path at conversion only was reported
    removed when a block before it was deleted, though it ran: audit X of the twenty-sixth
    session)."""
    try:         # (the usual case: every block where the conversion found it)
        if all(getattr(model.get_submodule(b.name), "_evoplug_spec", None) is b for b in report.blocks):
            return {id(b): b.name for b in report.blocks}
    except AttributeError:
        pass
    mine = {id(b) for b in report.blocks}
    out: Dict[int, str] = {}
    for name, m in model.named_modules():
        spec = m.__dict__.get("_evoplug_spec")
        if spec is not None and id(spec) in mine:
            out.setdefault(id(spec), name)
    return out


def tokens_per_block(model: nn.Module) -> List[Tuple[str, int]]:
    """Tokens each converted block ran through its attention and MLP in the last forward
    (-1: the block's original forward ran, or no forward has run since the conversion; so for a
    module that replaced a converted block after conversion, which runs its own forward, and
    for a converted block copied into the model after conversion, last)."""
    report = get_report(model)
    return [(s.name, -1) if s.name in report.replaced else (report.path(s), s.tokens_run)
            for s in report.blocks if s.name not in report.removed or s.name in report.replaced
            ] + [(path, -1) for path in report.copied]


def format_report(report: ConversionReport) -> str:
    o = report.options
    lines = [f"evoplug: {report.model_class} - {len(report.blocks)} block(s) converted, "
             f"keep_ratio={o.keep_ratio}, trade_off={o.trade_off}, reselect_every={o.reselect_every}, "
             f"representative={'on' if o.representative else 'off'}"]
    hdr = ("block", "role", "tokens", "prefix", "attention", "position terms")
    rows = []
    analyses = [s.analysis for s in report.blocks]
    idle = unscored(analyses, [s.role for s in report.blocks],
                    [s.index for s in report.blocks if s.starts_stream])
    for s in report.blocks:
        a = s.analysis
        role = {"dense": "dense", "score": "dense + scores", "evolve": "evolving"}[s.role]
        if s.starts_stream:
            role += " (new stream)"
        special = a.num_prefix + a.num_suffix
        M = a.num_tokens - special
        k = ev.num_keep(M, o.keep_ratio)
        toks = f"{a.num_tokens}" if s.role != "evolve" or s.index in idle or k >= M else \
            f"{special + k + (1 if o.representative else 0)}/{a.num_tokens}"
        if s.role == "evolve" and ev.runs_every_token(M, o.keep_ratio, o.representative):
            role = "evolving, keep 1.0: all run" if o.keep_ratio >= 1 else \
                "evolving, too few tokens: all run"
            toks = f"{a.num_tokens}"
        if s.index in idle:
            role = "evolving, no scores: dense"
        if s.name in report.removed:
            role, toks = "removed after conversion", "-"
        if s.name in report.replaced:
            role = "replaced after conversion: its own forward"
        rows.append((report.path(s) if s.name not in report.moved else
                     f"{report.path(s)} (was {a.name})", role, toks, f"{a.num_prefix}+{a.num_suffix}" if a.num_suffix else
                     str(a.num_prefix), a.attention,
                     "; ".join(a.position_terms) or "-"))
    rows.extend(_copied_rows(report))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(hdr)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines.append(fmt.format(*hdr))
    lines.append(fmt.format(*("-" * w for w in widths)))
    lines.extend(fmt.format(*r) for r in rows)
    if report.blocks:
        a = report.blocks[0].analysis
        trailing = f", trailing tokens: {a.num_suffix}" if a.num_suffix else ""
        lines.append(f"prefix tokens: {a.num_prefix}{trailing} ({a.prefix_source}); global query: {a.global_query}; "
                     f"q=`{a.q}`, k=`{a.k}` in the first block")
        lines.extend(_following_the_call(report))
        if report.query_agreement:
            lines.append("global query chosen on the calibration images (top-1 agreement with dense: "
                         + ", ".join(f"{q} {v:.1%}" for q, v in report.query_agreement.items()) + ")")
        br = "; ".join(f"{b.role} branch at `{b.add}`: {' -> '.join(b.path) or '(ops)'}" for b in a.branches)
        lines.append(f"residual stream of `{a.name}`: {br}")
        for note in a.notes:
            lines.append(f"note: {note}")
    for name in report.regrouped:
        lines.append(f"regrouped `{name}`: its forward adds the residual branches of pairs "
                     "(`x = attn(x) + x; x = ff(x) + x`); each pair runs as one block, called by "
                     "a program of that forward (other arguments than at the conversion run its "
                     "own forward, dense)")
    if idle:
        lines.append(f"WARNING: {unscored_reason(analyses, idle)}")
    lines.extend(_removed_lines(report, idle))
    lines.extend(_copied_lines(report))
    for name, reason in report.failed:
        lines.append(f"NOT converted `{name}`: {reason}")
    for name, reason in report.skipped:
        lines.append(f"left alone `{name}`: {reason}")
    return "\n".join(lines)


def _copied_lines(report) -> List[str]:
    """The warnings about converted blocks copied into the model after the conversion."""
    return [f"WARNING: `{path}` is a copy of the converted block `{name}` put in the model "
            "after the conversion (copy.deepcopy of a converted block): it runs its own "
            "forward, every token (no speed-up; evoplug.set_options does not reach it); to "
            "have it evolve, convert again: evoplug.convert(evoplug.revert(model), ...)"
            for path, name in report.copied.items()]


def _copied_rows(report) -> List[Tuple[str, ...]]:
    """The table's rows of the converted blocks copied into the model after the conversion,
    from the analysis of the converted block each copies (the copy holds a copy of it)."""
    specs = {s.name: s.analysis for s in report.blocks}
    rows = []
    for path, name in report.copied.items():
        a = specs.get(name)
        rows.append((path, f"copy of `{name}`: its own forward", "-", "-", "-", "-") if a is None
                    else (path, f"copy of `{name}`: its own forward", str(a.num_tokens),
                          f"{a.num_prefix}+{a.num_suffix}" if a.num_suffix else str(a.num_prefix),
                          a.attention, "; ".join(a.position_terms) or "-"))
    return rows


def _removed_lines(report, idle) -> List[str]:
    """The warnings about converted blocks no longer in the model, and modules in their place."""
    if not report.removed:
        return []
    left = [s for s in report.blocks if s.name not in report.removed and s.role == "evolve"
            and s.index not in idle]
    gone = [n for n in report.removed if n not in report.replaced]   # (places left empty: a
    lines = [f"WARNING: {len(gone)} converted block(s) are no longer in the model "  # replaced
             f"({', '.join(gone)})"] if gone else []     # one was said gone too, until audit H1)
    if report.replaced:
        lines.append(f"WARNING: other modules are in the place of {', '.join(report.replaced)} "
                     "(put or deep-copied there after the conversion): they run their own "
                     "forward, every token; to have them evolve, convert again: "
                     "evoplug.convert(evoplug.revert(model), ...)")
    if not left and report.options.keep_ratio < 1:
        lines[0] += ("; none of the blocks left evolves its tokens: the model runs as the "
                     "original (convert after removing blocks)")
    return lines


def _following_the_call(report) -> List[str]:
    """A line where blocks' trailing tokens are as many as a boolean argument of the call has
    entries of a value per image (VideoMAE's decoder: its mask tokens)."""
    follow = [s for s in report.blocks if getattr(s, "suffix_from", ())]
    if not follow:
        return []
    arg, value = follow[0].suffix_from[0]
    return [f"trailing tokens of {len(follow)} block(s) from `{follow[0].name}` follow the call: "
            f"as many as `{arg}` has {value} entries per image (another count converts a twin "
            "for it)"]


def explain(model: nn.Module) -> str:
    """A readable table of what evoplug found in a converted model and what it does."""
    return format_report(get_report(model))


def unscored_reason(analyses, idle) -> str:
    names = ", ".join(f"`{analyses[i].name}`" for i in idle[:3]) + (" ..." if len(idle) > 3 else "")
    rowless = [a for a in analyses[:idle[-1] + 1] if not gives_row(a)]
    why = next((n for a in rowless for n in a.notes if n.startswith("windows not mapped")), "")
    if rowless:
        where = (f"blocks without one: {', '.join(f'`{a.name}`' for a in rowless[:3])}"
                 f"{' ...' if len(rowless) > 3 else ''}{'; ' + why if why else ''}")
    else:    # every block before gives a row, but the scores restart across a change of tokens
        where = "the scores start again where the token set changes, with nothing before to score it"
    return (f"{len(idle)} evolving block(s) ({names}) would run every token: no global attention "
            f"row reaches them ({where}). Set start_block later, or strict=False to convert "
            "anyway (explain() marks them)")
