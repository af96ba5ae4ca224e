"""The planner: which conversion options keep a classifier's predictions at a target speed-up.

    p = evoplug.plan(model, images, target_speedup=1.4)     # a dense classifier, unlabeled images
    print(p.table())                                         # every option measured, front marked
    fast = p.convert(model)                                  # evoplug.convert with p.best's options
    p.plot("plan.png")                                       # agreement against speed-up

For each global query (the class token's and the mean query's, when the model has a class
token), start block, keep ratio and trade-off, the converted model runs on the calibration
images and its top-1 predictions are compared with the dense model's (*agreement*; top-1 as
well when labels are given). Speed is the FLOP ratio of one image
(:func:`evoplug.tools.bench.flop_counter`) and, with ``timed=True``, the measured time ratio
(dense and converted interleaved, median), which then decides. Options at or above the target
are ranked by agreement, then speed; ``best`` is the first. No option reaching the target
raises :class:`PlanError` carrying the measured plan.

Only the conversion (once per query) costs analysis time; the other options change at run
time through :func:`evoplug.set_options`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import evoplug

from ..errors import EvoplugError
from ..options import check_keep_ratio

KEEP_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: what ``Choice.agreement`` holds without ``metric=``
AGREEMENT = "top-1 agreement with dense"


class PlanError(EvoplugError):
    """No measured option reaches the target speed-up; ``.plan`` holds what was measured."""

    def __init__(self, message: str, plan: "PlanResult"):
        super().__init__(message)
        self.plan = plan


@dataclasses.dataclass
class Choice:
    """One measured set of options."""
    keep_ratio: float
    start_block: int
    global_query: str
    trade_off: float
    agreement: float                      # top-1 agreement with the dense model, 0..1 (or metric)
    flop_speedup: float                   # dense FLOPs / converted FLOPs, one image
    timed_speedup: Optional[float] = None  # dense time / converted time (timed=True)
    top1: Optional[float] = None          # with labels
    meets: bool = False                   # speedup >= the target
    pareto: bool = False                  # no other choice is both faster and more faithful
    #: the other options given to :func:`plan`, the same for every choice (they were left out of
    #: :meth:`options`, so ``PlanResult.convert`` built another model than the one measured)
    fixed: Dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.timed_speedup if self.timed_speedup is not None else self.flop_speedup

    def options(self) -> Dict[str, object]:
        """Keyword arguments of :func:`evoplug.convert` for this choice."""
        return dict(keep_ratio=self.keep_ratio, start_block=self.start_block,
                    global_query=self.global_query, trade_off=self.trade_off, **self.fixed)


@dataclasses.dataclass
class PlanResult:
    choices: List[Choice]                 # every measured option, fastest first
    target_speedup: float
    images: int
    timed: bool
    dense_top1: Optional[float] = None
    metric: str = AGREEMENT               # or the name of plan's metric=, in its own units
    example: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)   # one calibration image

    @property
    def meeting(self) -> List[Choice]:
        """The options that reach the target, best first (agreement, then speed)."""
        return sorted((c for c in self.choices if c.meets), key=lambda c: (-c.agreement, -c.speedup))

    @property
    def best(self) -> Choice:
        m = self.meeting
        if not m:
            raise PlanError(_impossible(self), self)
        return m[0]

    @property
    def pareto(self) -> List[Choice]:
        return [c for c in self.choices if c.pareto]

    def score(self, c: Choice) -> str:
        """``c.agreement`` as the table prints it: the agreement in %, a ``metric=``'s own value
        (it was printed x100 with '%' under "agreement": -0.0% for a negative MSE)."""
        return f"{c.agreement:.1%}" if self.metric == AGREEMENT else f"{c.agreement:.4g}"

    def convert(self, model: nn.Module, **kwargs) -> nn.Module:
        """``evoplug.convert(model, **best.options(), **kwargs)``, on a calibration image."""
        kwargs.setdefault("example_input", self.example)
        return evoplug.convert(model, **{**self.best.options(), **kwargs})

    def table(self, rows: Optional[Sequence[Choice]] = None) -> str:
        """Markdown table (all options by default), ``*`` on the Pareto front, ``>`` the best."""
        rows = self.choices if rows is None else rows
        best = self.meeting[0] if self.meeting else None
        speed = "time ratio" if self.timed else "FLOP ratio"
        head = ["", "keep", "start", "query", "alpha", speed,
                "agreement" if self.metric == AGREEMENT else self.metric]
        if self.timed:
            head.insert(6, "FLOP ratio")
        if self.dense_top1 is not None:
            head.append(f"top-1 (dense {self.dense_top1:.1%})")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in rows:
            mark = (">" if c is best else "") + ("*" if c.pareto else "")
            cells = [mark, f"{c.keep_ratio:g}", str(c.start_block), c.global_query, f"{c.trade_off:g}",
                     f"{c.speedup:.2f}x", self.score(c)]
            if self.timed:
                cells.insert(6, f"{c.flop_speedup:.2f}x")
            if self.dense_top1 is not None:
                cells.append(f"{c.top1:.1%}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dict(target_speedup=self.target_speedup, images=self.images, timed=self.timed,
                    metric=self.metric, dense_top1=self.dense_top1,
                    best=dataclasses.asdict(self.meeting[0]) if self.meeting else None,
                    choices=[dataclasses.asdict(c) for c in self.choices])

    def save_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def plot(self, path: str, title: Optional[str] = None) -> str:
        """PNG of agreement against speed-up: every option, the Pareto front joined, the target
        as a vertical line, the best ringed."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        scale = 100 if self.metric == AGREEMENT else 1       # (a metric= in its own units)
        for q, marker in (("cls", "o"), ("mean", "s")):
            pts = [c for c in self.choices if c.global_query == q]
            if pts:
                sc = ax.scatter([c.speedup for c in pts], [scale * c.agreement for c in pts], marker=marker,
                                c=[c.keep_ratio for c in pts], cmap="viridis", vmin=0.0, vmax=1.0,
                                s=26, label=f"{q} query", edgecolors="none")
        front = sorted(self.pareto, key=lambda c: c.speedup)
        ax.plot([c.speedup for c in front], [scale * c.agreement for c in front], "k-", lw=1,
                label="Pareto front")
        ax.axvline(self.target_speedup, color="tab:red", ls="--", lw=1, label=f"target {self.target_speedup:g}x")
        if self.meeting:
            b = self.meeting[0]
            ax.scatter([b.speedup], [scale * b.agreement], s=160, facecolors="none", edgecolors="tab:red",
                       label=f"best: keep {b.keep_ratio:g}, start {b.start_block}, {b.global_query}")
        fig.colorbar(sc, ax=ax, label="keep ratio")
        ax.set_xlabel(("measured time" if self.timed else "FLOP") + " speed-up over dense (x)")
        ax.set_ylabel(f"{self.metric} (%)" if scale == 100 else self.metric)
        ax.set_title(title or f"evoplug plan on {self.images} images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def _impossible(p: PlanResult) -> str:
    fastest = max(p.choices, key=lambda c: c.speedup)
    kind = "measured time" if p.timed else "FLOP"
    return (f"no option reaches a {p.target_speedup:g}x speed-up ({kind} ratio) on this model: the "
            f"fastest measured, keep_ratio={fastest.keep_ratio:g} start_block={fastest.start_block} "
            f"global_query={fastest.global_query!r}, reaches {fastest.speedup:.2f}x "
            f"({'agreement' if p.metric == AGREEMENT else p.metric} {p.score(fastest)}); lower "
            f"the target, or measure smaller keep ratios or earlier start blocks")


def _mark_pareto(choices: List[Choice]) -> None:
    for c in choices:
        c.pareto = not any(o is not c and o.speedup >= c.speedup and o.agreement >= c.agreement and
                           (o.speedup > c.speedup or o.agreement > c.agreement) for o in choices)


#: the options the planner measures, each with its keyword of :func:`plan`
AXES = dict(keep_ratio="keep_ratios", start_block="start_blocks", global_query="global_queries",
            trade_off="trade_offs")


def _fixed_axes(options: dict, given: dict) -> dict:
    """The measured options ``given`` ({'keep_ratios': ..., ...}, None: the default) with one
    given as a single option instead (``trade_off=0.3``: only 0.3 is measured, as
    ``trade_offs=(0.3,)``); popped from ``options``. Both forms of one option are refused, and
    ``global_query='auto'`` is the default: both queries measured."""
    for one, many in AXES.items():
        if one not in options:
            continue
        value = options.pop(one)
        if given[many] is not None:
            raise EvoplugError(f"plan measures {one}: give {many}= or {one}=, not both "
                               f"({one}={value!r} measures only {value!r})")
        if not (one == "global_query" and value == "auto"):
            given[many] = (value,)
    return given


def _check_dense_classifier(model: nn.Module, logits: bool) -> None:
    """A dense model; a classifier where agreement is measured (``logits``: no ``metric=``,
    which may compare features)."""
    if evoplug.is_converted(model):
        raise EvoplugError("plan measures conversions of a dense model: pass the model before "
                           "evoplug.convert (or evoplug.revert(a copy))")
    if logits:
        evoplug.quality.check_classifier(model)


def plan(model: nn.Module, images, target_speedup: float = 1.3, *, labels=None,
         keep_ratios: Optional[Sequence[float]] = None, start_blocks: Optional[Sequence[int]] = None,
         global_queries: Optional[Sequence[str]] = None, trade_offs: Optional[Sequence[float]] = None,
         timed: bool = False, batch_size: int = 32, repeats: int = 5,
         metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
         max_images: Optional[int] = None, progress: bool = True, **options) -> PlanResult:
    """Measure conversion options of the dense classifier ``model`` on calibration ``images``
    and return the options that reach ``target_speedup`` (see the module docstring).

    start_blocks: default the first quarter, third and half of the blocks (the paper's third
    among them); global_queries: default both when the model has a class token, else the mean
    query; metric: ``metric(converted_logits, dense_logits) -> float``, higher is better,
    instead of the top-1 agreement. ``options``: other :class:`evoplug.EvoOptions` fields, the
    same for every option (e.g. ``reselect_every``); one the planner measures fixes it
    (``trade_off=0.3``: only 0.3 measured, as ``trade_offs=(0.3,)``)."""
    _check_dense_classifier(model, metric is None)
    target = float(target_speedup)
    if not target > 0:
        raise ValueError(f"target_speedup must be > 0, got {target_speedup!r}")
    axes = _fixed_axes(options, dict(keep_ratios=keep_ratios, start_blocks=start_blocks,
                                     global_queries=global_queries, trade_offs=trade_offs))
    keep_ratios, start_blocks, global_queries, trade_offs = axes.values()
    keeps = sorted({check_keep_ratio(k) for k in keep_ratios or KEEP_RATIOS})
    x = evoplug.quality.as_image_tensor(images, max_images)
    y = None if labels is None else torch.as_tensor(labels)[:len(x)]
    score = metric or evoplug.quality.agreement
    from . import bench
    ref = evoplug.quality.outputs(model, x)
    flops0 = bench.flops(model, x[:1])
    first = evoplug.convert(model, keeps[0], example_input=x[:1], **options)
    n_blocks = len(evoplug.get_report(first).blocks)
    has_cls = evoplug.get_report(first).blocks[0].analysis.global_query == "cls"
    queries = list(global_queries or (("cls", "mean") if has_cls else ("mean",)))
    starts = sorted(set(start_blocks or {max(1, n_blocks // 4), max(1, n_blocks // 3), max(1, n_blocks // 2)}))
    trade_offs = trade_offs or (0.5,)
    total = len(queries) * len(starts) * len(keeps) * len(trade_offs)
    bar = _bar(total, progress)
    choices: List[Choice] = []
    xb = x[:min(batch_size, len(x))]
    for q in queries:
        fast = first if q == evoplug.get_report(first).blocks[0].analysis.global_query else \
            evoplug.convert(model, keeps[0], example_input=x[:1], global_query=q, **options)
        for s in starts:
            for k in keeps:
                evoplug.set_options(fast, keep_ratio=k, start_block=s)
                fl = flops0 / bench.flops(fast, x[:1])
                tm = None
                if timed:
                    t = bench.interleaved({"dense": model, "evo": fast}, xb, repeats=repeats, warmup=1)
                    tm = t["dense"].median / t["evo"].median
                for a in trade_offs:
                    evoplug.set_options(fast, trade_off=a)
                    out = evoplug.quality.outputs(fast, x)
                    choices.append(Choice(k, s, q, float(a), float(score(out, ref)), fl, tm,
                                          None if y is None else evoplug.quality.top1(out, y),
                                          fixed=dict(options)))
                    if bar is not None:
                        bar.update(1)
    if bar is not None:
        bar.close()
    for c in choices:
        c.meets = c.speedup >= target
    _mark_pareto(choices)
    choices.sort(key=lambda c: (-c.speedup, -c.agreement))
    result = PlanResult(choices, target, len(x), timed, None if y is None else evoplug.quality.top1(ref, y),
                        AGREEMENT if metric is None else getattr(metric, "__name__", "metric"),
                        x[:1])
    if not result.meeting:
        raise PlanError(_impossible(result), result)
    return result


def _bar(total: int, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="evoplug plan", unit="option")
