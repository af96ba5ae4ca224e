"""The clean-up passes a traced block's graph goes through before it becomes a GraphModule:
checks on constant arguments and unread attributes dropped, NumPy scalars as Python numbers,
``baddbmm`` split into its product and added term, ``out=`` written as an in-place copy, a
permute pair that cancels removed, baked-in tensors made buffers, and the signature cut to the
tensors a program takes (the block's extra outputs kept aside). trace.py runs them; split from
trace.py in the fifty-fourth session."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ..errors import AnalysisError
from ..runtime.call import CallPlan
from .graph import inserting_as


def python_numbers(graph: fx.Graph):
    """NumPy scalars in the graph's arguments as Python numbers: fx prints them as
    ``np.float64(...)`` in the code it generates, where ``np`` is no name (MMPretrain's
    SwinTransformerV2 clamps by ``np.log(1 / 0.01)``: a NameError out of the generated code,
    past every refusal; audit V of the twenty-fifth session)."""
    import numpy as np

    def plain(a):
        return a.item() if isinstance(a, np.generic) else a
    for n in graph.nodes:
        if n.op in ("call_function", "call_method"):
            n.args = torch.utils._pytree.tree_map(plain, n.args)
            n.kwargs = torch.utils._pytree.tree_map(plain, n.kwargs)


def constants_to_buffers(module: nn.Module):
    """Tensors that tracing baked into the graph are stored by fx as plain attributes of the
    root (the block): make them non-persistent buffers, so ``.to()``/``.half()`` move them with
    the block while the state_dict stays the same."""
    for k in [k for k, v in vars(module).items()
              if k.startswith("_tensor_constant") and isinstance(v, torch.Tensor)]:
        t = module.__dict__.pop(k)
        module.register_buffer(k, t, persistent=False)


def tensor_only_signature(graph: fx.Graph, plan: CallPlan, name: str):
    """Programs take (tokens, *tensor arguments): constant arguments (None, flags, the
    feature size list of PVT) are baked into the trace, so their placeholders go, and with
    them fx's pytree input handling for list constants."""
    keep = {plan.token_arg, *plan.tensor_args}
    for n in [n for n in graph.nodes if n.op == "placeholder"]:
        if n.target not in keep:
            if n.users:
                raise AnalysisError(name, f"constant argument `{n.target}` is used as a value in the trace")
            graph.erase_node(n)
    info = getattr(graph._codegen, "pytree_info", None)
    graph._codegen = fx.graph.CodeGen()
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    if info is not None and info.out_spec is not None and isinstance(result, (list, tuple)):
        # the output as the block returns it, not pytree's flat leaves: transformers' Swinv2
        # stage returns (tokens, tokens, (h, w, h, w)), which came back as 6 items and broke
        # the encoder (audit Q2 of the twenty-sixth session)
        tree = torch.utils._pytree.tree_unflatten(list(result), info.out_spec)
        if isinstance(tree, (list, tuple)):      # (a single tensor stays as its one leaf)
            result = tree
    if isinstance(result, (list, tuple)) and result and isinstance(result[0], fx.Node):
        # a tuple-returning block (Hugging Face: (hidden_states, attn_weights)): the graph
        # returns its tokens; the other items are kept aside (their nodes stay in the graph)
        # and the program returns them next to the tokens (rewrite/program.py: _outputs)
        out.args = (result[0],)
        out.meta["evo_rest"] = tuple(result[1:])
    graph.lint()


def out_as_copy(graph: fx.Graph):
    """``torch.add(a, b, out=t)`` as ``t.copy_(torch.add(a, b))``: a write into ``t`` in place,
    which the analysis follows as it follows ``t.mul_(...)`` or ``t[...] = ...`` (the writes
    from the tokens into a buffer named, keep 1.0 run by the block's own forward). Written with
    ``out=``, a running mean kept in a buffer was not seen as written: it held the kept tokens'
    mean where the block evolved, without a word (audit K6 of the forty-sixth session)."""
    for node in list(graph.nodes):
        out = node.kwargs.get("out") if node.op in ("call_function", "call_method") else None
        if not isinstance(out, fx.Node):
            continue
        with inserting_as(graph, node):
            value = graph.create_node(node.op, node.target, node.args, {
                k: v for k, v in node.kwargs.items() if k != "out"})
            written = graph.call_method("copy_", (out, value))
        node.replace_all_uses_with(written)
        graph.erase_node(node)


def split_baddbmm(graph: fx.Graph):
    """``baddbmm(bias, q, k^T, beta=, alpha=)``, attention logits with an added term in one
    call, as ``beta * bias + alpha * bmm(q, k^T)``: the product the analysis finds attention by,
    and an additive term on the logits like any other (gathered for the kept tokens)."""
    for node in list(graph.nodes):
        fn = node.op == "call_function" and node.target is torch.baddbmm
        if not (fn or (node.op == "call_method" and node.target == "baddbmm")):
            continue
        names = ("input", "batch1", "batch2")
        args = dict(zip(names, node.args)) | {k: v for k, v in node.kwargs.items() if k in names}
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if len(args) != 3 or set(node.kwargs) - set(names) - {"beta", "alpha"} or \
                not all(isinstance(v, (int, float, fx.Node)) for v in (beta, alpha)):
            continue
        with inserting_as(graph, node):
            out = graph.call_function(torch.bmm, (args["batch1"], args["batch2"]))
            if isinstance(alpha, fx.Node) or alpha != 1:      # (a scale read from a shape)
                out = graph.call_function(operator.mul, (out, alpha))
            if isinstance(beta, fx.Node) or beta != 0:
                bias = args["input"] if not isinstance(beta, fx.Node) and beta == 1 else \
                    graph.call_function(operator.mul, (args["input"], beta))
                out = graph.call_function(operator.add, (out, bias))
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def cancel_permutes(graph: fx.Graph):
    """``x.permute(p).permute(q)`` that gives ``x`` back is ``x``: a block that takes a
    channels-first map and permutes it to channels-last itself (VitDet) is traced through the
    permute to its own layout (CallPlan.token_perm) and back; the pair goes, so the residual
    stream starts at the block's input as for a block that takes the map."""
    def perm_of(n):
        if n.op == "call_method" and n.target == "permute" and isinstance(n.args[0], fx.Node):
            dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
            if all(isinstance(d, int) for d in dims):
                return tuple(dims)
        return None
    for n in list(graph.nodes):
        q = perm_of(n)
        first = n.args[0] if q is not None else None
        p = perm_of(first) if first is not None else None
        if p is None or len(p) != len(q) or tuple(p[i] for i in q) != tuple(range(len(q))):
            continue
        n.replace_all_uses_with(first.args[0])
        graph.erase_node(n)
        if not first.users:
            graph.erase_node(first)


def drop_unread_attributes(graph: fx.Graph):
    """Attributes the trace read and nothing uses go: ``self.register_buffer('last', ...)`` in a
    forward asks ``hasattr(self, 'last')``, which read the buffer the calibration's forward had
    registered and the conversion took away, and every program raised ``AttributeError`` (audit
    J1 of the forty-fifth session)."""
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)


def drop_constant_asserts(graph: fx.Graph):
    """fx guards concrete (constant) arguments with torch._assert; CallPlan.bind checks them."""
    for node in list(graph.nodes):
        if node.op == "call_function" and (node.target is torch._assert or
                                           getattr(node.target, "__name__", "") == "_assert_is_none"):
            cond = node.args[0]
            graph.erase_node(node)
            if isinstance(cond, fx.Node) and not cond.users:
                graph.erase_node(cond)
    graph.lint()
