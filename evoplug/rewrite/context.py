"""What the rewrite passes share while they turn one traced block graph into its slow-path
program (rewrite/program.py runs them in order: positions.py, maps.py, row.py), and the small
graph queries more than one pass asks."""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch.fx as fx

from ..analyse.attention import AttentionSite
from ..analyse.block import BlockAnalysis
from ..analyse.graph import is_size_query, is_view, writes_in_place


@dataclasses.dataclass
class Rewrite:
    """What the passes share while they rewrite one block graph."""
    a: BlockAnalysis
    gm: fx.GraphModule
    site: AttentionSite
    token: fx.Node            # the subset's tokens (the block's token argument)
    pos: fx.Node              # placeholder ``_evo_pos``: original index of each subset token
    full: fx.Node             # placeholder ``_evo_full``: the block's full token input
    block: fx.Node            # placeholder ``_evo_block``: the block (a graph cannot name ``self``)
    root: fx.Node             # where the block's computation starts from the subset
    root_full: fx.Node        # ... and from the full input
    fast_base: Optional[fx.Node] = None   # exact stream after attention (map/windowed blocks)
    row: Optional[fx.Node] = None         # the global query's attention row
    read_backs: list = dataclasses.field(default_factory=list)   # (map -> subset tokens, dim)
    stream_is_input: bool = False   # a map block's stream is its input tokens (no read-back)
    lined: list = dataclasses.field(default_factory=list)   # arguments gathered as lined up
    stream_in: Optional[fx.Node] = None     # the stream past its head (``x = n0(x)`` before the
    stream_full: Optional[fx.Node] = None   # adds) on the subset and on the full input

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph


def keeps_state(gm: fx.GraphModule, target: str) -> bool:
    """The module at ``target`` (or one inside it) keeps state its forwards change (a counter,
    a running mean: BlockAnalysis.keeps_state, which rewrite/program.py puts in ``gm.meta``):
    a second run of it in the program runs without moving it (runtime/gather.py
    ``without_state_update``)."""
    return any(k.startswith(target + ".") for k in gm.meta.get("evo_keeps_state", ()))


def op_name(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"module {type(n.graph.owning_module.get_submodule(n.target)).__name__}"
    if n.op == "call_method":
        return f"method .{n.target}()"
    return f"function {getattr(n.target, '__name__', n.target)}" if n.op == "call_function" else n.op


_INT_OPS = (operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv,
            operator.mod, operator.neg)


def is_size_value(n: fx.Node) -> bool:
    """An int computed from sizes only (window counts, padding amounts)."""
    if is_size_query(n):
        return True
    return n.op == "call_function" and n.target in _INT_OPS and all(
        is_size_value(a) for a in n.all_input_nodes)


def describe(a: BlockAnalysis, old: Optional[str], new: str):
    """What explain() lists for the block: ``old`` replaced by ``new`` (or ``new`` added once;
    the train- and eval-mode programs are built from the same analysis)."""
    terms = a.position_terms
    if old in terms:
        terms[terms.index(old)] = new
    elif new not in terms:
        terms.append(new)


def viewed_attribute(n: fx.Node) -> Optional[fx.Node]:
    """The attribute (a get_attr node: a buffer, a plain tensor the forward changes) that ``n``
    is, or is a view of (``self.hist[:, :N]``), else None. An in-place method returns its first
    argument: ``self.m.mul_(0.9).add_(x.mean(), alpha=0.1)`` writes into ``self.m`` twice (an
    EMA of the tokens so was never named until audit J1 of the forty-fifth session)."""
    while n.op != "get_attr":
        if not (is_view(n) or (n.op == "call_method" and writes_in_place(n))):
            return None
        n = n.args[0]
    return n
