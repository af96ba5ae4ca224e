"""Random hand-written flat ViTs and an independent Evo-ViT reference, written from the docs by
audit A1 of the fortieth session (benchmarks/fuzz_flat.py runs them; docs/models.md "Fuzzed
hand-written models"). Seeds below 1000 draw from the first generator's options; from 1000 on
also a trailing cls, registers before the cls, a cls named `class_embedding`, a shared relative
position bias handed to the blocks, mixed block kinds and the trade-off/representative options.

Every block has a styled ``forward`` (what evoplug sees) and a canonical ``ref(x, pos)`` written
from the block's parameters (explicit float32 softmax; position terms gathered at ``pos``) that
returns (output, logits (B, h, n, n)). ``reference`` runs the Evo-ViT rules from the docs:
 * start = max(1, nb // 3); blocks < start-1 dense; block start-1 scores (g = a)
 * global row: cls query (token 0) softmax over all keys, mean over heads, patch columns;
   no cls: softmax of the mean of the logits rows (rows = the patch tokens run: [kept, r])
 * k = max(1, floor(M*keep + 1e-6)); stable descending sort of g; top-k; rep weights g_j / sum
   over the not kept; rep position = the (k+1)-th ranked token
 * block on [prefix, kept, r]; non-kept x_j += r_out - r; g[kept] = lerp(g, a, alpha)
 * reselect_every R: a new selection every R evolving blocks (weights fixed in between)
"""
import math
import random

import einops
import torch
import torch.nn.functional as F
from torch import nn

ALPHA = 0.5


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1 - self.p
        m = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)
        return x * m / keep


class LayerScale(nn.Module):
    def __init__(self, dim, style):
        super().__init__()
        self.style = style
        self.gamma = nn.Parameter(torch.rand(dim) * 0.7 + 0.3)

    def forward(self, x):
        return x.mul(self.gamma) if self.style else x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden, kind):
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.w12 = nn.Linear(dim, 2 * hidden)
            self.w3 = nn.Linear(hidden, dim)
        else:
            self.fc1 = nn.Linear(dim, hidden)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if self.kind == "swiglu":
            a, b = self.w12(x).chunk(2, dim=-1)
            return self.w3(F.silu(a) * b)
        return self.fc2(self.act(self.fc1(x)))

    def ref(self, x):
        if self.kind == "swiglu":
            h = F.linear(x, self.w12.weight, self.w12.bias)
            hd = h.shape[-1] // 2
            return F.linear(F.silu(h[..., :hd]) * h[..., hd:], self.w3.weight, self.w3.bias)
        return F.linear(F.gelu(F.linear(x, self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)


class Attention(nn.Module):
    """Custom attention module in many styles."""

    def __init__(self, dim, heads, c, N):
        super().__init__()
        self.heads, self.dim, self.c = heads, dim, c
        self.hd = dim // heads
        self.scale = self.hd ** -0.5
        if c["qkv"] == "fused":
            self.qkv = nn.Linear(dim, 3 * dim, bias=c["qkv_bias"])
        else:
            self.q = nn.Linear(dim, dim, bias=c["qkv_bias"])
            self.k = nn.Linear(dim, dim, bias=c["qkv_bias"])
            self.v = nn.Linear(dim, dim, bias=c["qkv_bias"])
        if c["qk_norm"]:
            self.q_norm = nn.LayerNorm(self.hd)
            self.k_norm = nn.LayerNorm(self.hd)
        if c["bias"] == "table":
            self.attn_bias = nn.Parameter(torch.randn(heads, N, N) * 0.7)
        elif c["bias"] == "head":
            self.head_bias = nn.Parameter(torch.randn(heads, 1, 1))
        self.proj = nn.Linear(dim, dim)

    # -- styled pieces ------------------------------------------------------------------
    def split(self, t):
        s = self.c["split"]
        B, N, C = t.shape
        h = self.heads
        if s == "reshape_permute":
            return t.reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        if s == "view_transpose":
            return t.view(B, N, h, -1).transpose(1, 2)
        if s == "unflatten":
            return t.unflatten(-1, (h, self.hd)).transpose(1, 2)
        return einops.rearrange(t, "b n (h d) -> b h n d", h=h)

    def merge(self, o):
        s = self.c["split"]
        B, h, N, d = o.shape
        if s == "rearrange":
            return einops.rearrange(o, "b h n d -> b n (h d)")
        if s == "unflatten":
            return o.transpose(1, 2).flatten(2)
        return o.transpose(1, 2).reshape(B, N, h * d)

    def qkv_heads(self, x):
        if self.c["qkv"] == "fused":
            if self.c["split"] == "rearrange":
                q, k, v = einops.rearrange(self.qkv(x), "b n (three h d) -> three b h n d",
                                           three=3, h=self.heads)
            elif self.c["split"] == "reshape_permute":
                B, N, C = x.shape
                q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                q, k, v = map(self.split, self.qkv(x).chunk(3, dim=-1))
        else:
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.c["qk_norm"]:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, mask=None, rel_pos_bias=None):
        q, k, v = self.qkv_heads(x)
        comp = self.c["compute"]
        bias = None
        if self.c["bias"] == "table":
            bias = self.attn_bias.unsqueeze(0)
        elif self.c["bias"] == "head":
            bias = self.head_bias.unsqueeze(0)
        if rel_pos_bias is not None:
            bias = rel_pos_bias.unsqueeze(0) if bias is None else bias + rel_pos_bias
        if comp == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        elif comp == "sdpa_scale":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            if comp.startswith("einsum"):
                a = torch.einsum("bhid,bhjd->bhij", q * self.scale, k)
            else:
                a = (q @ k.transpose(-2, -1)) * self.scale
            if bias is not None:
                a = a + bias
            if comp.endswith("f32"):
                a = a.float().softmax(dim=-1).type_as(v)
            elif comp.endswith("dtype"):
                a = F.softmax(a, dim=-1, dtype=torch.float32).to(v.dtype)
            else:
                a = a.softmax(dim=-1)
            if comp.startswith("einsum"):
                o = torch.einsum("bhij,bhjd->bhid", a, v)
            else:
                o = a @ v
        return self.proj(self.merge(o))

    # -- canonical reference ------------------------------------------------------------
    def ref(self, x, pos, shared=None):
        B, n, C = x.shape
        h, d = self.heads, self.hd
        if self.c["qkv"] == "fused":
            W, b = self.qkv.weight, self.qkv.bias
            Wq, Wk, Wv = W[:C], W[C:2 * C], W[2 * C:]
            bq, bk, bv = (b[:C], b[C:2 * C], b[2 * C:]) if b is not None else (None, None, None)
        else:
            Wq, Wk, Wv = self.q.weight, self.k.weight, self.v.weight
            bq, bk, bv = self.q.bias, self.k.bias, self.v.bias
        hs = lambda t: t.reshape(B, n, h, d).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = hs(F.linear(x, Wq, bq)), hs(F.linear(x, Wk, bk)), hs(F.linear(x, Wv, bv))
        if self.c["qk_norm"]:
            q = F.layer_norm(q, (d,), self.q_norm.weight, self.q_norm.bias)
            k = F.layer_norm(k, (d,), self.k_norm.weight, self.k_norm.bias)
        lg = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if self.c["bias"] == "table":
            lg = lg + self.attn_bias[:, pos[:, :, None], pos[:, None, :]].permute(1, 0, 2, 3)
        elif self.c["bias"] == "head":
            lg = lg + self.head_bias
        if shared is not None:
            lg = lg + shared[:, pos[:, :, None], pos[:, None, :]].permute(1, 0, 2, 3)
        p = lg.to(torch.promote_types(lg.dtype, torch.float32)).softmax(-1).to(v.dtype)
        o = (p @ v).permute(0, 2, 1, 3).reshape(B, n, C)
        return F.linear(o, self.proj.weight, self.proj.bias), lg


class MHAWrap(nn.Module):
    def __init__(self, dim, heads, batch_first):
        super().__init__()
        self.bf = batch_first
        self.heads = heads
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=batch_first)

    def forward(self, x, mask=None):
        if self.bf:
            return self.mha(x, x, x, need_weights=False)[0]
        t = x.transpose(0, 1)
        return self.mha(t, t, t, need_weights=False)[0].transpose(0, 1)

    def ref(self, x, pos, shared=None):
        B, n, C = x.shape
        h = self.heads
        d = C // h
        W, b = self.mha.in_proj_weight, self.mha.in_proj_bias
        qkv = F.linear(x, W, b)
        q, k, v = [t.reshape(B, n, h, d).permute(0, 2, 1, 3) for t in qkv.split(C, -1)]
        lg = q @ k.transpose(-1, -2) / math.sqrt(d)
        o = (lg.to(torch.promote_types(lg.dtype, torch.float32)).softmax(-1).to(v.dtype) @ v).permute(0, 2, 1, 3).reshape(B, n, C)
        return F.linear(o, self.mha.out_proj.weight, self.mha.out_proj.bias), lg


class Block(nn.Module):
    def __init__(self, dim, heads, c, N):
        super().__init__()
        self.c = c
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        if c["attn"] == "mha":
            self.attn = MHAWrap(dim, heads, c["batch_first"])
        else:
            self.attn = Attention(dim, heads, c, N)
        self.mlp = Mlp(dim, c["mlp_ratio"] * dim, c["mlp"])
        self.ls1 = LayerScale(dim, c["ls_style"]) if c["ls"] else nn.Identity()
        self.ls2 = LayerScale(dim, c["ls_style"]) if c["ls"] else nn.Identity()
        self.dp1 = DropPath(0.1) if c["droppath"] else nn.Identity()
        self.dp2 = DropPath(0.1) if c["droppath"] else nn.Identity()

    def _attn(self, x, mask=None, rpb=None):
        if rpb is not None:
            return self.attn(x, mask, rel_pos_bias=rpb)
        if self.c["inline"] and self.c["attn"] != "mha":
            # the attention written out in the block itself
            a = self.attn
            q, k, v = a.qkv_heads(x)
            s = q @ k.transpose(-2, -1) * a.scale
            if a.c["bias"] == "table":
                s = s + a.attn_bias
            elif a.c["bias"] == "head":
                s = s + a.head_bias
            s = s.softmax(-1)
            return a.proj(a.merge(s @ v))
        return self.attn(x, mask)

    def _fwd(self, x, mask=None, rpb=None):
        n = self.c["norm"]
        if n == "pre":
            x = x + self.dp1(self.ls1(self._attn(self.norm1(x), mask, rpb)))
            x = x + self.dp2(self.ls2(self.mlp(self.norm2(x))))
        elif n == "post":
            x = self.norm1(x + self.dp1(self.ls1(self._attn(x, mask, rpb))))
            x = self.norm2(x + self.dp2(self.ls2(self.mlp(x))))
        else:  # parallel
            x = x + self.dp1(self.ls1(self._attn(self.norm1(x), mask, rpb))) + self.dp2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def ref(self, x, pos, shared=None):
        n = self.c["norm"]
        ln = lambda m, t: F.layer_norm(t, m.normalized_shape, m.weight, m.bias)  # noqa: E731
        ls1 = (lambda t: t * self.ls1.gamma) if self.c["ls"] else (lambda t: t)
        ls2 = (lambda t: t * self.ls2.gamma) if self.c["ls"] else (lambda t: t)
        if n == "pre":
            a, lg = self.attn.ref(ln(self.norm1, x), pos, shared)
            x = x + ls1(a)
            x = x + ls2(self.mlp.ref(ln(self.norm2, x)))
        elif n == "post":
            a, lg = self.attn.ref(x, pos, shared)
            x = ln(self.norm1, x + ls1(a))
            x = ln(self.norm2, x + ls2(self.mlp.ref(x)))
        else:
            a, lg = self.attn.ref(ln(self.norm1, x), pos, shared)
            x = x + ls1(a) + ls2(self.mlp.ref(ln(self.norm2, x)))
        return x, lg


class BlockPlain(Block):
    def forward(self, x):
        return self._fwd(x)


class BlockKw(Block):
    def forward(self, x, mask=None, **kwargs):
        return self._fwd(x, mask)


class BlockTuple(Block):
    def forward(self, x):
        return self._fwd(x), None


class BlockRpb(Block):
    def forward(self, x, rel_pos_bias=None):
        return self._fwd(x, None, rel_pos_bias)


class BlockTupleTok(Block):
    def forward(self, x):
        y = self._fwd(x)
        return y, y[:, 0]


class BlockTupleAttn(Block):
    """Returns (x, aux) where aux is a tensor the model drops."""

    def forward(self, x):
        y = self._fwd(x)
        return y, y.new_zeros(())


class FlatViT(nn.Module):
    """Layout [lead prefix (P), patches (M), trailing (T)]; cls query row ``self.q_idx`` or None
    (mean query)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        dim, heads = cfg["dim"], cfg["heads"]
        p = cfg["patch"]
        self.patch_embed = nn.Conv2d(3, dim, p, p)
        self.M = (cfg["img"] // p) ** 2
        pre = cfg["prefix"]
        nreg = cfg.get("nreg", 0)
        self.P = {"cls": 1, "none": 0, "dist": 2, "trail": 0, "clsname": 1}.get(pre, 1 + nreg)
        self.T = 1 if pre == "trail" else 0
        self.q_idx = {"none": None, "trail": None, "regfirst": None}.get(pre, 0)
        self.cls_idx = {"regfirst": nreg, "trail": -1}.get(pre, 0)
        if pre == "clsname":
            self.class_embedding = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        elif pre != "none":
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        if pre == "dist":
            self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        if pre in ("reg", "regfirst"):
            self.reg_token = nn.Parameter(torch.randn(1, nreg, dim) * 0.5)
        N = self.P + self.M + self.T
        self.pos = cfg["pos"]
        if self.pos:
            self.pos_embed = nn.Parameter(torch.randn(1, N if self.pos == "all" else self.M, dim) * 0.5)
        call = cfg["call"]
        cls = {"plain": BlockPlain, "kw": BlockKw, "tuple": BlockTuple, "tuple2": BlockTupleAttn,
               "tuple3": BlockTupleTok, "rpb": BlockRpb}[call]
        bcs = cfg.get("blocks") or [cfg["block"]] * cfg["depth"]
        blocks = [cls(dim, heads, bc, N) for bc in bcs]
        self.blocks = nn.Sequential(*blocks) if cfg["seq"] else nn.ModuleList(blocks)
        if call == "rpb":
            self.rel_pos_bias = nn.Parameter(torch.randn(heads, N, N) * 0.7)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)
        if pre == "dist":
            self.head_dist = nn.Linear(dim, 10)

    def embed(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        B = x.shape[0]
        if self.pos == "patch":
            x = x + self.pos_embed
        pre = self.cfg["prefix"]
        if pre == "cls":
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1)
        elif pre == "clsname":
            x = torch.cat([self.class_embedding.expand(B, -1, -1), x], 1)
        elif pre == "dist":
            x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], 1)
        elif pre == "reg":
            x = torch.cat([self.cls_token.expand(B, -1, -1), self.reg_token.expand(B, -1, -1), x], 1)
        elif pre == "regfirst":
            x = torch.cat([self.reg_token.expand(B, -1, -1), self.cls_token.expand(B, -1, -1), x], 1)
        elif pre == "trail":
            x = torch.cat([x, self.cls_token.expand(B, -1, -1)], 1)
        if self.pos == "all":
            x = x + self.pos_embed
        return x

    def head_of(self, x):
        h = self.cfg["head"]
        if h == "tokens":
            return self.norm(x)
        if h == "mean":
            return self.head(self.norm(x[:, self.P:self.P + self.M].mean(1)))
        x = self.norm(x)
        if self.cfg["prefix"] == "dist":
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        return self.head(x[:, self.cls_idx])

    def forward(self, img):
        x = self.embed(img)
        call = self.cfg["call"]
        if self.cfg["seq"]:
            x = self.blocks(x)
        else:
            for blk in self.blocks:
                if call == "kw":
                    x = blk(x, mask=None)
                elif call == "rpb":
                    x = blk(x, rel_pos_bias=self.rel_pos_bias)
                elif call.startswith("tuple"):
                    x, _ = blk(x)
                else:
                    x = blk(x)
        return self.head_of(x)


def shared_bias(model):
    return model.rel_pos_bias if model.cfg["call"] == "rpb" else None


def gen_cfg(seed):
    rnd = random.Random(seed)
    dim = rnd.choice([32, 48, 64, 96])
    heads = rnd.choice([h for h in (1, 2, 4, 8) if dim % h == 0 and dim // h >= 8])
    img, patch = rnd.choice([(32, 4), (32, 8), (48, 8), (64, 8), (40, 8), (56, 8)])
    prefix = rnd.choice(["cls", "cls", "none", "reg", "dist"])
    attn = rnd.choice(["custom", "custom", "custom", "mha"])
    bc = dict(
        attn=attn,
        batch_first=rnd.random() < 0.5,
        qkv=rnd.choice(["fused", "separate"]),
        qkv_bias=rnd.random() < 0.7,
        split=rnd.choice(["reshape_permute", "view_transpose", "unflatten", "rearrange"]),
        compute=rnd.choice(["sdpa", "softmax", "softmax_f32", "einsum", "einsum_f32"]),
        qk_norm=rnd.random() < 0.25,
        bias=rnd.choice(["none", "none", "table", "head"]),
        norm=rnd.choice(["pre", "pre", "post", "parallel"]),
        ls=rnd.random() < 0.4, ls_style=rnd.random() < 0.5,
        droppath=rnd.random() < 0.4,
        mlp=rnd.choice(["gelu", "gelu", "swiglu"]),
        mlp_ratio=rnd.choice([2, 4]),
        inline=rnd.random() < 0.25,
    )
    call = rnd.choice(["plain", "plain", "kw", "tuple", "tuple2"])
    head = rnd.choice(["cls", "mean", "tokens"]) if prefix != "none" else rnd.choice(["mean", "tokens"])
    cfg = dict(seed=seed, dim=dim, heads=heads, img=img, patch=patch, prefix=prefix,
               nreg=rnd.choice([1, 2, 4]), pos=rnd.choice([None, "patch", "all"]),
               depth=rnd.randint(4, 8), block=bc, call=call,
               seq=(call == "plain" and rnd.random() < 0.4), head=head,
               keep=rnd.choice([0.3, 0.5, 0.7]), reselect=rnd.choice([1, 4]),
               start=rnd.choice([None, None, 1, 2, 3]))
    if seed < 1000:
        return cfg
    r2 = random.Random(seed * 7 + 3)
    cfg["prefix"] = prefix = r2.choice(["cls", "none", "reg", "dist", "regfirst", "trail", "clsname"])
    cfg["head"] = r2.choice(["cls", "mean", "tokens"]) if prefix != "none" else r2.choice(["mean", "tokens"])
    cfg["call"] = call = r2.choice(["plain", "kw", "tuple", "tuple2", "tuple3", "rpb"])
    cfg["seq"] = call == "plain" and r2.random() < 0.4
    cfg["trade_off"] = r2.choice([0.5, 0.5, 0.25, 1.0])
    cfg["representative"] = r2.random() > 0.2
    comps = ["sdpa", "sdpa_scale", "softmax", "softmax_f32", "softmax_dtype", "einsum", "einsum_f32", "einsum_dtype"]

    def blockcfg(base):
        b = dict(base)
        for key, opts in (("qkv", ["fused", "separate"]), ("compute", comps),
                          ("split", ["reshape_permute", "view_transpose", "unflatten", "rearrange"]),
                          ("bias", ["none", "table", "head"]), ("qk_norm", [False, False, True]),
                          ("ls", [False, True]), ("mlp", ["gelu", "swiglu"]), ("inline", [False, False, True])):
            if r2.random() < 0.5:
                b[key] = r2.choice(opts)
        if call == "rpb" and b["attn"] == "mha":
            b["attn"] = "custom"
        if b["bias"] == "table" and b["compute"].endswith("f32"):
            b["compute"] = b["compute"][:-3] + "dtype"    # known refusal (repro_bias_refused.py)
        if b["qkv"] == "fused" and b["split"] == "view_transpose":
            b["split"] = "unflatten"                       # known refusal (repro_heads_as_map.py)
        return b
    bc = blockcfg(bc)
    cfg["block"] = bc
    if r2.random() < 0.4:
        cfg["blocks"] = [blockcfg(bc) if r2.random() < 0.5 else bc for _ in range(cfg["depth"])]
    return cfg


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") and "attn_bias" not in name and "head_bias" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
            elif name.endswith("attn_bias") or name.endswith("head_bias") or "token" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
            elif name.endswith("in_proj_weight"):
                C = p.shape[1]
                gain = torch.tensor([2.5] * (2 * C) + [1.0] * C)[:, None]
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(C))
            elif p.dim() >= 2:
                gain = 2.5 if any(s in name for s in (".q.", ".k.", ".qkv.")) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p[0].numel()))
    return model.eval()


def build(seed):
    cfg = gen_cfg(seed)
    torch.manual_seed(seed)
    model = init_weights(FlatViT(cfg), seed)
    x = torch.randn(2, 3, cfg["img"], cfg["img"], generator=torch.Generator().manual_seed(seed + 1000))
    return model, x, cfg


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------

def global_row(lg, q_idx, rows):
    """lg (B, h, n, n) logits; query row q_idx, else the mean of the logits rows ``rows``.
    Detached: the rows rank tokens, no gradient flows back through them (docs/guarantees.md)."""
    if q_idx is not None:
        q = lg[:, :, q_idx, :]
    else:
        q = lg[:, :, rows, :].mean(-2)
    return q.float().softmax(-1).mean(1).detach()          # (B, n)


def select(g, k):
    vals, idx = g.sort(dim=-1, descending=True, stable=True)
    sel = idx[:, :k]
    rep_pos = idx[:, k] if k < g.shape[1] else idx[:, -1]
    wt = (g + torch.finfo(g.dtype).tiny).scatter(1, sel, 0.0)
    wt = wt / wt.sum(-1, keepdim=True)
    return sel, rep_pos, wt, vals


def reference(*args, grad=False, **kwargs):
    """The reference's output; ``grad``: with autograd (fuzz_grads.py), else under no_grad."""
    with torch.set_grad_enabled(grad):
        return _reference(*args, **kwargs)


def _reference(model, img, keep, reselect_every=1, start=None, alpha=ALPHA, representative=True,
               info=None):
    """Sub-sequence run by an evolving block: [lead prefix, trailing, kept, (r)]."""
    blocks = list(model.blocks)
    nb = len(blocks)
    if start is None:
        start = max(1, nb // 3)
    P, M, T = model.P, model.M, model.T
    qi = model.q_idx
    shared = shared_bias(model)
    x = model.embed(img)
    B, N, C = x.shape
    k = max(1, min(M, int(math.floor(M * keep + 1e-6))))
    ar = torch.arange(N).expand(B, -1)
    g = sel = None
    since = 0
    margins = []
    S = P + T                         # special tokens in the sub-sequence
    for bi, blk in enumerate(blocks):
        if bi < start - 1:
            x, _ = blk.ref(x, ar, shared)
        elif bi == start - 1:
            x, lg = blk.ref(x, ar, shared)
            g = global_row(lg, qi, slice(P, P + M))[:, P:P + M]
        else:
            if k >= M:
                x, lg = blk.ref(x, ar, shared)
                g = torch.lerp(g, global_row(lg, qi, slice(P, P + M))[:, P:P + M], alpha)
                continue
            if sel is None or since % reselect_every == 0:
                sel, rep_pos, wt, vals = select(g, k)
                margins.append(((vals[:, k - 1] - vals[:, k]) / vals[:, k - 1]).min().item())
                since = 0
            xp = x[:, P:P + M]
            r = torch.bmm(wt[:, None].to(x.dtype), xp)
            kept = xp.gather(1, sel[..., None].expand(B, k, C))
            parts = [x[:, :P], x[:, P + M:], kept]
            pos = [ar[:, :P], ar[:, P + M:], P + sel]
            if representative:
                parts.append(r)
                pos.append(P + rep_pos[:, None])
            sub, pos = torch.cat(parts, 1), torch.cat(pos, 1)
            out, lg = blk.ref(sub, pos, shared)
            a = global_row(lg, qi, slice(S, None))[:, S:S + k]
            g = g.scatter(1, sel, torch.lerp(g.gather(1, sel), a, alpha))
            newp = xp + (out[:, -1:] - r) if representative else xp
            newp = newp.scatter(1, sel[..., None].expand(B, k, C), out[:, S:S + k])
            x = torch.cat([out[:, :P], newp, out[:, P:S]], 1)
            since += 1
    if info is not None:
        info["margins"] = margins
    return model.head_of(x)


@torch.no_grad()
def check_ref(model, img):
    """The canonical block refs reproduce the styled forwards (and the dense model)."""
    x = model.embed(img)
    B, N, _ = x.shape
    ar = torch.arange(N).expand(B, -1)
    worst = 0.0
    for blk in model.blocks:
        y = blk(x, rel_pos_bias=model.rel_pos_bias) if model.cfg["call"] == "rpb" else blk(x)
        if isinstance(y, tuple):
            y = y[0]
        yr, _ = blk.ref(x, ar, shared_bias(model))
        worst = max(worst, (y - yr).abs().max().item() / (y.abs().max().item() + 1e-6))
        x = y
    return worst
