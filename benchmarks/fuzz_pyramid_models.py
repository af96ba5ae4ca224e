"""Random hand-written pyramid / windowed models + an independent Evo-ViT reference (written by
audit Y5 of the thirty-ninth session from the docs, not from evoplug's code; run by
benchmarks/fuzz_pyramids.py).

Reference written from docs/architecture.md and docs/models.md ("How pyramids are evolved"):
 * scores g over the patch tokens; block start-1 (start = max(1, nblocks // 3)) scores (g = a);
   evolving blocks refresh only the kept tokens' entries: g = lerp(g, a, 0.5)
 * new grid: g average-pooled (adaptive) onto the new grid, renormalised, new selection
 * top-k (stable sort), rep weights g_j / sum over not kept, rep position = best token not kept
 * global blocks: [prefix, kept, rep] run the block; SR keys/values from the full (exact) map;
   MLP depthwise conv: map holds kept tokens at their places, the rep everywhere else;
   fast update x_j + (r_out - r)
 * windowed blocks: attention part on the exact full map for every token, rep slot =
   r + attention residual at rep position, MLP on [kept, rep slot], non-kept: y_j + MLP residual
   of the rep; score = per-window mean-query row scattered to tokens, normalised
 * one unpadded unshifted window covering the map: attention on [kept, rep] (global rules)
"""
import math
import random

import torch
import torch.nn.functional as F
from torch import nn

ALPHA = 0.5
FLAT_PAPER = False
SINGLE_AS_WINDOW = True


# ----------------------------------------------------------------------------------------------
# model pieces
# ----------------------------------------------------------------------------------------------

class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) * 0.7 + 0.3)

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> [depthwise 3x3 on the map] -> gelu -> fc2 over (B, N, C) with P prefix tokens."""

    def __init__(self, dim, hidden, dw, P=0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden) if dw else None
        self.fc2 = nn.Linear(hidden, dim)
        self.P = P

    def forward(self, x, H, W):
        x = self.fc1(x)
        if self.dw is not None:
            B, N, C = x.shape
            P = self.P
            if P:
                pre, x = x[:, :P], x[:, P:]
            m = x.transpose(1, 2).reshape(B, C, H, W)
            x = self.dw(m).flatten(2).transpose(1, 2)
            if P:
                x = torch.cat([pre, x], 1)
        return self.fc2(F.gelu(x))


def rel_index(h, w):
    """(h*w, h*w) index into a ((2h-1)*(2w-1)) table."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    rel = rel.permute(1, 2, 0)
    return (rel[..., 0] + h - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)


class GlobalAttn(nn.Module):
    """PVT-like attention: q from tokens, k/v from tokens or a spatially reduced map."""

    def __init__(self, dim, heads, sr, P, grid, rpb, fused):
        super().__init__()
        self.heads, self.P, self.fused = heads, P, fused
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_kind = sr
        if sr == "pool":
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.sr = nn.Conv2d(dim, dim, 1)
            self.sr_norm = nn.LayerNorm(dim)
        elif sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.sr_norm = nn.LayerNorm(dim)
        self.rpb = None
        if rpb:
            h, w = grid
            self.rpb = nn.Parameter(torch.randn((2 * h - 1) * (2 * w - 1), heads) * 0.7)
            self.register_buffer("rel_idx", rel_index(h, w), persistent=False)

    def kv_source(self, x, H, W):
        if self.sr_kind == 1:
            return x
        B, N, C = x.shape
        P = self.P
        m = (x[:, P:] if P else x).transpose(1, 2).reshape(B, C, H, W)
        if self.sr_kind == "pool":
            m = self.sr(self.pool(m))
        else:
            m = self.sr(m)
        m = self.sr_norm(m.flatten(2).transpose(1, 2))
        if self.sr_kind == "pool":
            m = F.gelu(m)
        return torch.cat([x[:, :P], m], 1) if P else m

    def forward(self, x, H, W):
        B, N, C = x.shape
        h = self.heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        src = self.kv_source(x, H, W)
        kv = self.kv(src).reshape(B, src.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        bias = None
        if self.rpb is not None:
            bias = self.rpb[self.rel_idx.view(-1)].view(N, N, h).permute(2, 0, 1).unsqueeze(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            a = q @ k.transpose(-2, -1) * self.scale
            if bias is not None:
                a = a + bias
            o = a.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class GlobalBlock(nn.Module):
    def __init__(self, dim, heads, grid, P, sr=1, dw=False, rpb=False, post=False, ls=False,
                 fused=False, args=True, cpe=False):
        super().__init__()
        self.grid, self.P, self.post, self.args = grid, P, post, args
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = GlobalAttn(dim, heads, sr, P, grid, rpb, fused)
        self.mlp = Mlp(dim, 2 * dim, dw, P)
        self.ls1 = LayerScale(dim) if ls else nn.Identity()
        self.ls2 = LayerScale(dim) if ls else nn.Identity()
        self.cpe = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim) if cpe else None

    def _fwd(self, x, H, W):
        if self.cpe is not None:
            B, N, C = x.shape
            P = self.P
            m = (x[:, P:] if P else x).transpose(1, 2).reshape(B, C, H, W)
            pe = self.cpe(m).flatten(2).transpose(1, 2)
            x = x + (F.pad(pe, (0, 0, P, 0)) if P else pe)
        if self.post:
            x = self.norm1(x + self.ls1(self.attn(x, H, W)))
            x = self.norm2(x + self.ls2(self.mlp(x, H, W)))
        else:
            x = x + self.ls1(self.attn(self.norm1(x), H, W))
            x = x + self.ls2(self.mlp(self.norm2(x), H, W))
        return x


class GlobalBlockArgs(GlobalBlock):
    def forward(self, x, H, W):
        return self._fwd(x, H, W)


class GlobalBlockNoArgs(GlobalBlock):
    def forward(self, x):
        return self._fwd(x, self.grid[0], self.grid[1])


def swin_mask(Hp, Wp, ws, s):
    img = torch.zeros(1, Hp, Wp, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws).squeeze(-1)          # (nW, n)
    m = win[:, None, :] - win[:, :, None]
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def window_partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def window_reverse(w, ws, H, W):
    C = w.shape[-1]
    x = w.view(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


class WindowAttn(nn.Module):
    def __init__(self, dim, heads, ws, rpb, fused):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rpb = None
        if rpb:
            self.rpb = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.7)
            self.register_buffer("rel_idx", rel_index(ws, ws), persistent=False)

    def logits_qkv(self, x, mask):
        B_, n, C = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(B_, n, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        a = q @ k.transpose(-2, -1) * self.scale
        if self.rpb is not None:
            a = a + self.rpb[self.rel_idx.view(-1)].view(n, n, h).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            a = (a.view(B_ // nW, nW, h, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(B_, h, n, n)
        return a, v

    def forward(self, x, mask=None):
        B_, n, C = x.shape
        h = self.heads
        if self.fused:
            q, k, v = self.qkv(x).reshape(B_, n, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
            bias = None
            if self.rpb is not None:
                bias = self.rpb[self.rel_idx.view(-1)].view(n, n, h).permute(2, 0, 1).unsqueeze(0)
            if mask is not None:
                nW = mask.shape[0]
                mm = mask.unsqueeze(1).repeat(B_ // nW, 1, 1, 1)
                bias = mm if bias is None else bias + mm
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            a, v = self.logits_qkv(x, mask)
            o = a.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B_, n, C))


class WinBlock(nn.Module):
    """Swin-like block. layout 'cl' (B, H, W, C) in/out; 'args' (B, N, C) + H, W; 'attr'
    (B, N, C), grid from attributes. norm 'pre' or 'respost' (SwinV2)."""

    def __init__(self, dim, heads, grid, ws, shift, layout, norm="pre", ls=False, rpb=True,
                 fused=False, mlp_on_map=False):
        super().__init__()
        H, W = grid
        if ws >= H and ws >= W:
            ws, shift = max(H, W), 0
        self.grid, self.ws, self.shift, self.layout, self.normmode = grid, ws, shift, layout, norm
        self.mlp_on_map = mlp_on_map
        self.pad_h, self.pad_w = (ws - H % ws) % ws, (ws - W % ws) % ws
        Hp, Wp = H + self.pad_h, W + self.pad_w
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttn(dim, heads, ws, rpb, fused)
        self.mlp = Mlp(dim, 2 * dim, False)
        self.ls1 = LayerScale(dim) if ls else nn.Identity()
        self.ls2 = LayerScale(dim) if ls else nn.Identity()
        if shift:
            self.register_buffer("mask", swin_mask(Hp, Wp, ws, shift), persistent=False)
        else:
            self.mask = None

    @property
    def single_window(self):
        if SINGLE_AS_WINDOW and self.layout == "cl":
            return False
        return self.pad_h == 0 and self.pad_w == 0 and self.shift == 0 and self.ws == self.grid[0] == self.grid[1]

    def windows(self, h):
        """(B, H, W, C) map -> windows (B*nW, n, C)."""
        if self.pad_h or self.pad_w:
            h = F.pad(h, (0, 0, 0, self.pad_w, 0, self.pad_h))
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), (1, 2))
        return window_partition(h, self.ws)

    def attn_part(self, x):
        """(B, H, W, C) -> (B, H, W, C) after the attention residual."""
        B, H, W, C = x.shape
        h = self.norm1(x) if self.normmode == "pre" else x
        a = self.attn(self.windows(h), self.mask)
        a = window_reverse(a, self.ws, H + self.pad_h, W + self.pad_w)
        if self.shift:
            a = torch.roll(a, (self.shift, self.shift), (1, 2))
        a = a[:, :H, :W, :]
        if self.normmode == "respost":
            a = self.norm1(a)
        return x + self.ls1(a)

    def mlp_part(self, t):
        H, W = self.grid
        if self.normmode == "pre":
            return t + self.ls2(self.mlp(self.norm2(t), H, W))
        return t + self.ls2(self.norm2(self.mlp(t, H, W)))

    def _fwd(self, x):
        B, H, W, C = x.shape
        x = self.attn_part(x)
        if self.mlp_on_map:
            return self.mlp_part(x)
        return self.mlp_part(x.reshape(B, H * W, C)).reshape(B, H, W, C)


class WinBlockCL(WinBlock):
    def forward(self, x):
        return self._fwd(x)


class WinBlockArgs(WinBlock):
    def forward(self, x, H, W):
        B, L, C = x.shape
        return self._fwd(x.view(B, H, W, C)).reshape(B, L, C)


class WinBlockAttr(WinBlock):
    def forward(self, x):
        B, L, C = x.shape
        H, W = self.grid
        return self._fwd(x.view(B, H, W, C)).reshape(B, L, C)


class PEG(nn.Module):
    def __init__(self, dim, P):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.P = P

    def forward(self, x, H, W, cl):
        if cl:
            return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        B, N, C = x.shape
        P = self.P
        m = x[:, P:].transpose(1, 2).reshape(B, C, H, W)
        y = m + self.proj(m)
        y = y.flatten(2).transpose(1, 2)
        return torch.cat([x[:, :P], y], 1) if P else y


class Down(nn.Module):
    """map (B, C, H, W) -> (B, C', H', W'); 'merge' Swin patch merging, 'conv3' k3 s2 p1, 'conv2'."""

    def __init__(self, kind, cin, cout):
        super().__init__()
        self.kind = kind
        if kind == "merge":
            self.norm = nn.LayerNorm(4 * cin)
            self.red = nn.Linear(4 * cin, cout)
        else:
            self.conv = nn.Conv2d(cin, cout, 3 if kind == "conv3" else 2, 2, 1 if kind == "conv3" else 0)
            self.norm = nn.LayerNorm(cout)

    def forward(self, m):
        if self.kind == "merge":
            x = m.permute(0, 2, 3, 1)
            B, H, W, C = x.shape
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            return self.red(self.norm(x)).permute(0, 3, 1, 2)
        m = self.conv(m)
        return self.norm(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def out_grid(self, H, W):
        if self.kind == "merge":
            return (H + 1) // 2, (W + 1) // 2
        if self.kind == "conv3":
            return (H - 1) // 2 + 1, (W - 1) // 2 + 1
        return H // 2, W // 2


class Stage(nn.Module):
    def __init__(self, blocks, peg, cl):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.peg = peg
        self.cl = cl


class Pyramid(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.P = cfg["P"]
        self.patch = nn.Conv2d(3, cfg["dims"][0], cfg["patch"], cfg["patch"])
        if self.P:
            self.cls_token = nn.Parameter(torch.randn(1, 1, cfg["dims"][0]) * 0.5)
        self.downs = nn.ModuleList()
        self.cls_proj = nn.ModuleList()
        self.stages = nn.ModuleList()
        H, W = cfg["grid0"]
        grids = []
        for s, sc in enumerate(cfg["stages"]):
            dim = cfg["dims"][s]
            if s > 0:
                d = Down(sc["down"], cfg["dims"][s - 1], dim)
                self.downs.append(d)
                H, W = d.out_grid(H, W)
                if self.P:
                    self.cls_proj.append(nn.Linear(cfg["dims"][s - 1], dim))
            grids.append((H, W))
            blocks = []
            for bc in sc["blocks"]:
                kw = dict(bc)
                kind = kw.pop("kind")
                if kind == "win":
                    layout = kw.pop("layout")
                    cls = {"cl": WinBlockCL, "args": WinBlockArgs, "attr": WinBlockAttr}[layout]
                    blocks.append(cls(dim, sc["heads"], (H, W), layout=layout, **kw))
                else:
                    args = kw.pop("args")
                    cls = GlobalBlockArgs if args else GlobalBlockNoArgs
                    blocks.append(cls(dim, sc["heads"], (H, W), self.P, args=args, **kw))
            peg = PEG(dim, self.P) if sc["peg"] else None
            self.stages.append(Stage(blocks, peg, sc["cl"]))
        self.grids = grids

    def forward(self, img):
        m = self.patch(img)
        B, C, H, W = m.shape
        cls = self.cls_token.expand(B, -1, -1) if self.P else None
        feats = []
        for s, stage in enumerate(self.stages):
            if s > 0:
                m = self.downs[s - 1](m)
                if self.P:
                    cls = self.cls_proj[s - 1](cls)
            B, C, H, W = m.shape
            if stage.cl:
                x = m.permute(0, 2, 3, 1)
            else:
                x = m.flatten(2).transpose(1, 2)
                if self.P:
                    x = torch.cat([cls, x], 1)
            for i, blk in enumerate(stage.blocks):
                if isinstance(blk, (GlobalBlockArgs, WinBlockArgs)):
                    x = blk(x, H, W)
                else:
                    x = blk(x)
                if i == 0 and stage.peg is not None:
                    x = stage.peg(x, H, W, stage.cl)
            if stage.cl:
                m = x.permute(0, 3, 1, 2)
            else:
                if self.P:
                    cls, x = x[:, :self.P], x[:, self.P:]
                m = x.transpose(1, 2).reshape(B, C, H, W)
            feats.append(m.flatten(1))
            if self.P:
                feats.append(cls.flatten(1))
        return torch.cat(feats, 1)


# ----------------------------------------------------------------------------------------------
# generator
# ----------------------------------------------------------------------------------------------

def gen_cfg(seed, allow_cpe=False):
    rnd = random.Random(seed)
    patch = rnd.choice([2, 4])
    hh = rnd.choice([16, 24, 32, 40])
    ww = hh if rnd.random() < 0.7 else rnd.choice([16, 24, 32, 40])
    grid0 = (hh // patch, ww // patch)
    nst = rnd.choice([2, 3, 4])
    style = rnd.choice(["swin", "pvt", "mixed"])
    P = 0
    if style == "pvt" and rnd.random() < 0.35:
        P = 1
    dims, stages = [], []
    d = rnd.choice([16, 24, 32])
    H, W = grid0
    for s in range(nst):
        heads = rnd.choice([1, 2, 4]) if d % 4 == 0 else rnd.choice([1, 2])
        dims.append(d)
        sc = dict(heads=heads, blocks=[], peg=rnd.random() < 0.25)
        if s > 0:
            down = rnd.choice(["merge", "conv3", "conv2"])
            if down == "conv2" and (H % 2 or W % 2):
                down = "conv3"
            sc["down"] = down
            H, W = Down(down, 1, 1).out_grid(H, W) if False else {
                "merge": ((H + 1) // 2, (W + 1) // 2), "conv3": ((H - 1) // 2 + 1, (W - 1) // 2 + 1),
                "conv2": (H // 2, W // 2)}[down]
        if style == "swin" or (style == "mixed" and rnd.random() < 0.5):
            kind = "win"
        else:
            kind = "glob"
        if P:
            kind = "glob"
        if kind == "win":
            layout = rnd.choice(["cl", "args", "attr"])
            sc["cl"] = layout == "cl"
        else:
            sc["cl"] = False
            layout = None
        depth = rnd.choice([1, 2, 2, 3])
        norm_post = rnd.random() < 0.25
        ls = rnd.random() < 0.4
        fused = rnd.random() < 0.5
        ws = rnd.choice([2, 3, 4, 5])
        for b in range(depth):
            if kind == "win":
                bc = dict(kind="win", layout=layout, ws=ws, shift=(ws // 2 if (b % 2 == 1 and rnd.random() < 0.8) else 0),
                          norm="respost" if norm_post else "pre", ls=ls, rpb=rnd.random() < 0.7,
                          fused=fused, mlp_on_map=(layout == "cl" and rnd.random() < 0.3))
            else:
                sr = rnd.choice([1, 1, 2, "pool"]) if min(H, W) >= 4 else 1
                if sr == 2 and (H % 2 or W % 2):
                    sr = 1
                args = rnd.random() < 0.6
                bc = dict(kind="glob", sr=sr, dw=rnd.random() < 0.4, rpb=(P == 0 and sr == 1 and rnd.random() < 0.3),
                          post=norm_post, ls=ls, fused=fused, args=args,
                          cpe=allow_cpe and rnd.random() < 0.3)
            sc["blocks"].append(bc)
        stages.append(sc)
        d = min(64, d + rnd.choice([0, 8, 16]))
    return dict(seed=seed, patch=patch, img=(hh, ww), grid0=grid0, P=P, dims=dims, stages=stages)


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or ("norm" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
            elif name.endswith("rpb") or name.endswith("cls_token"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
            elif p.dim() >= 2:
                gain = 2.5 if (".q." in name or ".kv." in name or ".qkv." in name) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p[0].numel()))
    return model.eval()


def build(seed, allow_cpe=False):
    cfg = gen_cfg(seed, allow_cpe)
    torch.manual_seed(seed)
    model = init_weights(Pyramid(cfg), seed)
    x = torch.randn(2, 3, *cfg["img"], generator=torch.Generator().manual_seed(seed + 1000))
    return model, x, cfg


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------

def heads_mean_softmax(logits):
    return logits.float().softmax(-1).mean(1)


def upsample(row, kv_grid, grid):
    B = row.shape[0]
    r = row.reshape(B, 1, *kv_grid)
    r = F.interpolate(r, size=tuple(grid), mode="bilinear", align_corners=False)
    r = r.reshape(B, -1).clamp_min(0)
    return r / r.sum(-1, keepdim=True)


def kv_grid_of(attn, H, W):
    if attn.sr_kind == 1:
        return None
    if attn.sr_kind == "pool":
        return (2, 2)
    return (H // attn.sr_kind, W // attn.sr_kind)


def glob_logits(blk, sub, full, pos, H, W):
    """Logits (B, h, n, nk) of the block's attention for queries from ``sub`` (already normed
    / as fed), keys from ``sub`` or the full map ``full`` (as fed), bias gathered at ``pos``."""
    attn = blk.attn
    B, n, C = sub.shape
    h = attn.heads
    q = attn.q(sub).reshape(B, n, h, C // h).transpose(1, 2)
    src = sub if attn.sr_kind == 1 else attn.kv_source(full, H, W)
    kv = attn.kv(src).reshape(B, src.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    a = q @ k.transpose(-2, -1) * attn.scale
    if attn.rpb is not None:
        # pos (B, n) map positions of the sub tokens (no prefix with rpb)
        idx = attn.rel_idx[pos[:, :, None], pos[:, None, :]]                 # (B, n, n)
        a = a + attn.rpb[idx].permute(0, 3, 1, 2)
    return a, v


def glob_row(blk, logits, P, H, W, n_q_rows):
    """Global row over the M patch positions or over the subset's keys: returns (row, full)
    full=True: row over M map positions (reduced keys upsampled)."""
    if P:
        row = heads_mean_softmax(logits[:, :, :1, :])[:, 0]         # cls query
    else:
        row = heads_mean_softmax(logits.mean(-2, keepdim=True))[:, 0]
    kvg = kv_grid_of(blk.attn, H, W)
    if kvg is None:
        return row[:, P:], False
    return upsample(row[:, P:], kvg, (H, W)), True


def glob_attn_out(blk, logits, v):
    B, h, n, _ = logits.shape
    o = logits.softmax(-1) @ v
    return blk.attn.proj(o.transpose(1, 2).reshape(B, n, -1))


def ref_glob_dense_row(blk, x, H, W):
    P = blk.P
    B, N, C = x.shape
    if blk.cpe is not None:
        B, N, C = x.shape
        m = x[:, P:].transpose(1, 2).reshape(B, C, H, W)
        pe = blk.cpe(m).flatten(2).transpose(1, 2)
        x = x + (F.pad(pe, (0, 0, P, 0)) if P else pe)
    src = x if blk.post else blk.norm1(x)
    pos = torch.arange(N - P).expand(B, -1)
    lg, _ = glob_logits(blk, src, src, pos, H, W)
    row, _ = glob_row(blk, lg, P, H, W, N)
    return row


def canvas_mlp(blk, t, sel, pos, H, W, M):
    """Mlp over subset tokens t (B, P+k+1, C) whose depthwise conv sees a map of the kept
    tokens at their places and the representative everywhere else."""
    mlp = blk.mlp
    f = mlp.fc1(t)
    if mlp.dw is not None:
        P = blk.P
        B, n, Ch = f.shape
        pre, fp = f[:, :P], f[:, P:]
        k = sel.shape[1]
        canvas = fp[:, -1:].expand(B, M, Ch).clone()
        canvas.scatter_(1, sel[..., None].expand(B, k, Ch), fp[:, :k])
        m = mlp.dw(canvas.transpose(1, 2).reshape(B, Ch, H, W)).flatten(2).transpose(1, 2)
        fp = m.gather(1, pos[..., None].expand(B, pos.shape[1], Ch))
        f = torch.cat([pre, fp], 1)
    return mlp.fc2(F.gelu(f))


def ref_glob_evolve(blk, x, H, W, sel, rep_pos, w):
    """x (B, P+M, C) -> new x, row at kept (B, k)."""
    P = blk.P
    B, N, C = x.shape
    M = N - P
    k = sel.shape[1]
    xp = x[:, P:]
    r = torch.bmm(w[:, None].to(x.dtype), xp)                              # (B, 1, C)
    kept = xp.gather(1, sel[..., None].expand(B, k, C))
    sub = torch.cat([x[:, :P], kept, r], 1)
    pos = torch.cat([sel, rep_pos[:, None]], 1)
    if blk.cpe is not None:
        m = xp.transpose(1, 2).reshape(B, C, H, W)
        pe = blk.cpe(m).flatten(2).transpose(1, 2)
        pe_sub = pe.gather(1, pos[..., None].expand(B, k + 1, C))
        sub = sub + (F.pad(pe_sub, (0, 0, P, 0)) if P else pe_sub)
        full = x + (F.pad(pe, (0, 0, P, 0)) if P else pe)
    else:
        full = x
    if blk.post:
        lg, v = glob_logits(blk, sub, full, pos, H, W)
        x1 = blk.norm1(sub + blk.ls1(glob_attn_out(blk, lg, v)))
        x2 = blk.norm2(x1 + blk.ls2(canvas_mlp(blk, x1, sel, pos, H, W, M)))
    else:
        h = blk.norm1(sub)
        lg, v = glob_logits(blk, h, blk.norm1(full), pos, H, W)
        x1 = sub + blk.ls1(glob_attn_out(blk, lg, v))
        x2 = x1 + blk.ls2(canvas_mlp(blk, blk.norm2(x1), sel, pos, H, W, M))
    row, full_row = glob_row(blk, lg, P, H, W, k + 1)
    a = row.gather(1, sel) if full_row else row[:, :k]
    newp = xp + (x2[:, -1:] - r)
    newp = newp.scatter(1, sel[..., None].expand(B, k, C), x2[:, P:P + k])
    return torch.cat([x2[:, :P], newp], 1), a


def token_index_windows(blk):
    """(nW, n) token index (1-based, 0 = padding) of each window slot."""
    H, W = blk.grid
    idx = (torch.arange(H * W) + 1).float().view(1, H, W, 1)
    return blk.windows(idx).squeeze(-1).long()[: None or 10 ** 9]


def ref_win_row(blk, xm):
    """Per-window mean-query rows scattered to tokens, normalised: (B, M)."""
    B, H, W, C = xm.shape
    h = blk.norm1(xm) if blk.normmode == "pre" else xm
    lg, _ = blk.attn.logits_qkv(blk.windows(h), blk.mask)
    rows = heads_mean_softmax(lg.mean(-2, keepdim=True))[:, 0]            # (B*nW, n)
    idx = token_index_windows(blk)                                      # (nW, n)
    nW, n = idx.shape
    rows = rows.reshape(B, nW * n)
    out = torch.zeros(B, H * W + 1).scatter_add_(1, idx.reshape(1, -1).expand(B, -1), rows)[:, 1:]
    return out / out.sum(-1, keepdim=True)


def ref_single_window(blk, x, sub, pos):
    """attention over the tokens sub (B, n, C) at map positions pos (single window)."""
    attn = blk.attn
    B, n, C = sub.shape
    h = attn.heads
    src = blk.norm1(sub) if blk.normmode == "pre" else sub
    q, k, v = attn.qkv(src).reshape(B, n, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
    lg = q @ k.transpose(-2, -1) * attn.scale
    if attn.rpb is not None:
        idx = attn.rel_idx[pos[:, :, None], pos[:, None, :]]
        lg = lg + attn.rpb[idx].permute(0, 3, 1, 2)
    o = attn.proj((lg.softmax(-1) @ v).transpose(1, 2).reshape(B, n, C))
    if blk.normmode == "respost":
        o = blk.norm1(o)
    return sub + blk.ls1(o), lg


def ref_win_dense_row(blk, xm):
    if blk.single_window:
        B, H, W, C = xm.shape
        t = xm.reshape(B, H * W, C)
        _, lg = ref_single_window(blk, None, t, torch.arange(H * W).expand(B, -1))
        return heads_mean_softmax(lg.mean(-2, keepdim=True))[:, 0]
    return ref_win_row(blk, xm)


def ref_win_evolve(blk, xm, sel, rep_pos, w):
    """xm (B, H, W, C) map -> new map, row at kept."""
    B, H, W, C = xm.shape
    M = H * W
    k = sel.shape[1]
    xt = xm.reshape(B, M, C)
    r = torch.bmm(w[:, None].to(xt.dtype), xt)
    pos = torch.cat([sel, rep_pos[:, None]], 1)
    if blk.single_window:
        kept = xt.gather(1, sel[..., None].expand(B, k, C))
        sub = torch.cat([kept, r], 1)
        x1, lg = ref_single_window(blk, None, sub, pos)
        x2 = blk.mlp_part(x1)
        a = heads_mean_softmax(lg.mean(-2, keepdim=True))[:, 0, :k]
        new = xt + (x2[:, -1:] - r)
        new = new.scatter(1, sel[..., None].expand(B, k, C), x2[:, :k])
        return new.reshape(B, H, W, C), a
    y = blk.attn_part(xm).reshape(B, M, C)
    row = ref_win_row(blk, xm)
    r_slot = r + (y.gather(1, rep_pos[:, None, None].expand(B, 1, C)) -
                  xt.gather(1, rep_pos[:, None, None].expand(B, 1, C)))
    sub = torch.cat([y.gather(1, sel[..., None].expand(B, k, C)), r_slot], 1)
    z = blk.mlp_part(sub)
    if FLAT_PAPER and blk.layout != "cl":
        new = xt + (z[:, -1:] - r)
    else:
        new = y + (z[:, -1:] - r_slot)
    new = new.scatter(1, sel[..., None].expand(B, k, C), z[:, :k])
    return new.reshape(B, H, W, C), row.gather(1, sel)


#: the relative gap at the cut of each selection of the last :func:`reference` run
MARGINS = []


def select(g, k, near_ties):
    """g (B, M) -> sel (B, k), rep_pos (B,), w (B, M)."""
    B, M = g.shape
    ranked = g
    if near_ties and k < M:
        kth = g.kthvalue(M - k + 1, -1, keepdim=True).values
        ranked = torch.where((g - kth).abs() <= kth * 3e-7, kth, g)
    vals, idx = ranked.sort(dim=-1, descending=True, stable=True)
    if k < M:     # (the relative gap at the cut: 0 is a tie the two may break apart)
        raw = g.sort(-1, descending=True).values
        MARGINS.append(((raw[:, k - 1] - raw[:, k]) / raw[:, k - 1]).min().item())
    sel = idx[:, :k]
    rest_v, rest_i = vals[:, k:], idx[:, k:]
    if k < M:
        near = rest_v >= rest_v[:, :1] * (1 - 3e-7)
        rep_pos = rest_i.masked_fill(~near, M).amin(-1)
    else:
        rep_pos = idx[:, -1]
    wt = (g + torch.finfo(g.dtype).tiny).scatter(1, sel, 0.0)
    wt = wt / wt.sum(-1, keepdim=True)
    return sel, rep_pos, wt


@torch.no_grad()
def pooled_scores(g, grid, new_grid):
    """Scores g (B, M) on ``grid`` average-pooled (adaptive) onto ``new_grid``, renormalised."""
    B = g.shape[0]
    g = F.adaptive_avg_pool2d(g.reshape(B, 1, *grid), new_grid).reshape(B, -1)
    return g / g.sum(-1, keepdim=True)


def reference(model, img, keep, reselect_every=1, start=None):
    """Evo-ViT forward of a Pyramid from the documented rules. Returns output, roles (and
    leaves the selections' gaps at the cut in ``MARGINS``). Autograd as the caller's mode has
    it (fuzz_grads.py); the attention rows are detached (they rank tokens)."""
    MARGINS.clear()
    blocks = [b for st in model.stages for b in st.blocks]
    nb = len(blocks)
    if start is None:
        start = max(1, nb // 3)
    near_ties = any(isinstance(b, GlobalBlock) and b.attn.sr_kind != 1 for b in blocks)
    P = model.P
    m = model.patch(img)
    B = m.shape[0]
    cls = model.cls_token.expand(B, -1, -1) if P else None
    feats, roles = [], []
    g, ggrid, sel, since = None, None, None, 0
    bi = 0
    for s, stage in enumerate(model.stages):
        if s > 0:
            m = model.downs[s - 1](m)
            if P:
                cls = model.cls_proj[s - 1](cls)
        _, C, H, W = m.shape
        M = H * W
        k = max(1, min(M, int(math.floor(M * keep + 1e-6))))
        x = m.permute(0, 2, 3, 1).reshape(B, M, C)        # patch tokens
        for i, blk in enumerate(stage.blocks):
            windowed = isinstance(blk, WinBlock)
            if windowed:          # (B, H, W, C) map in, (B, M, C) tokens out
                t = x.reshape(B, H, W, C)
                dense_row = lambda t=t, blk=blk: ref_win_dense_row(blk, t)  # noqa: E731
                run = lambda t=t, blk=blk: blk._fwd(t).reshape(B, M, C)  # noqa: E731

                def evolve(s, r, w, t=t, blk=blk):
                    new, a = ref_win_evolve(blk, t, s, r, w)
                    return new.reshape(B, M, C), a
            else:                 # [prefix, patches] tokens and (H, W)
                t = torch.cat([cls, x], 1) if P else x
                dense_row = lambda t=t, blk=blk: ref_glob_dense_row(blk, t, H, W)  # noqa: E731
                run = lambda t=t, blk=blk: blk._fwd(t, H, W)  # noqa: E731
                evolve = lambda s, r, w, t=t, blk=blk: ref_glob_evolve(blk, t, H, W, s, r, w)  # noqa: E731
            if bi < start - 1:
                out = run()
                roles.append("dense")
            elif bi == start - 1 or g is None:
                row = dense_row().detach()      # (rows rank tokens: no gradient through them)
                out = run()
                g, ggrid, sel = row.float(), (H, W), None
                roles.append("score")
            else:
                if ggrid != (H, W):
                    g, ggrid, sel = pooled_scores(g, ggrid, (H, W)), (H, W), None
                if k >= M:
                    row = dense_row().detach()
                    out = run()
                    g = (1 - ALPHA) * g + ALPHA * row
                    roles.append("evolve(all)")
                else:
                    if sel is None or since % reselect_every == 0:
                        sel, rep_pos, wt = select(g, k, near_ties)
                        since = 0
                    out, a = evolve(sel, rep_pos, wt)
                    g = g.scatter(1, sel, torch.lerp(g.gather(1, sel), a.detach().float(), ALPHA))
                    since += 1
                    roles.append("evolve")
            if windowed or not P:
                x = out
            else:
                cls, x = out[:, :P], out[:, P:]
            bi += 1
            if i == 0 and stage.peg is not None:
                if stage.cl:
                    x = stage.peg(x.reshape(B, H, W, C), H, W, True).reshape(B, M, C)
                else:
                    xf = torch.cat([cls, x], 1) if P else x
                    xf = stage.peg(xf, H, W, False)
                    if P:
                        cls, x = xf[:, :P], xf[:, P:]
                    else:
                        x = xf
        m = x.transpose(1, 2).reshape(B, C, H, W)
        feats.append(m.flatten(1))
        if P:
            feats.append(cls.flatten(1))
    return torch.cat(feats, 1), roles
