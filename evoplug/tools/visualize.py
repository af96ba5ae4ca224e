"""Token-selection pictures (as in Fig. 5 of the Evo-ViT paper).

For each image, which patch tokens each evolving block sent through its attention and MLP (the
slow path): a PNG grid, one row per image, one column per evolving block, the non-selected
tokens washed out; the last column shows the final global class attention ``g``.

    from evoplug.tools import visualize as viz
    rec = viz.record_selection(fast, x)           # fast: a converted model, x: (B, 3, H, W)
    viz.selection_grid([img1, img2], rec, "selection.png")

or, in one call, :func:`visualize` (takes a converted or a plain model, file names or
``skimage:NAME`` sample images). The command line: ``evoplug visualize MODEL IMAGE...``.

A selection only means something for a trained model: with random weights the class attention
ranks tokens arbitrarily. ``examples/photos.py`` trains a small ViT here on crops of
scikit-image's sample photographs (no download) and draws the picture with it.

Needs matplotlib (and Pillow, which matplotlib installs, to read image files).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .models import load_checkpoint, save_checkpoint  # noqa: F401  (public: evoplug visualize FILE)

# layout of the grid (pixels)
GAP = 4          # between tiles and around the grid
HEADER = 34      # strip above the first row for the column titles
DPI = 100


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def load_image(spec: Union[str, np.ndarray]) -> np.ndarray:
    """An RGB uint8 image (H, W, 3) from a file name, ``skimage:NAME`` (a photograph that ships
    with scikit-image, e.g. ``skimage:astronaut``, ``skimage:coffee``, ``skimage:chelsea``) or
    an array (gray, RGB or RGBA; float in [0, 1] or uint8)."""
    if isinstance(spec, np.ndarray):
        img = spec
    elif isinstance(spec, str) and spec.startswith("skimage:"):
        name = spec.split(":", 1)[1]
        try:
            import skimage.data as data
        except ImportError as e:
            raise ImportError(f"{spec}: needs scikit-image (pip install scikit-image)") from e
        fn = getattr(data, name, None)
        if fn is None or not callable(fn) or name.startswith("_"):
            raise ValueError(f"{spec}: scikit-image has no sample image {name!r} "
                             "(e.g. astronaut, coffee, chelsea, rocket, camera, coins)")
        img = fn()
        if isinstance(img, tuple):      # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
    else:
        if not os.path.exists(spec):
            raise FileNotFoundError(f"image file not found: {spec}")
        try:
            from PIL import Image
        except ImportError as e:
            raise ImportError("reading image files needs Pillow (pip install pillow)") from e
        with Image.open(spec) as im:
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                # 16-bit (or 32-bit) gray: convert("RGB") clips at 255 (a 16-bit PNG came out
                # white, until the twenty-sixth session); scaled to [0, 1] here
                a = np.asarray(im, dtype=np.float64)
                top = 1.0 if im.mode == "F" and a.max() <= 1.0 else \
                    65535.0 if im.mode != "F" and a.max() <= 65535 else max(float(a.max()), 1.0)
                img = np.clip(a / top, 0.0, 1.0)
            else:
                img = np.asarray(im.convert("RGB"))
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = np.clip(img.astype(np.float64), 0.0, 1.0 if img.max() <= 1.0 else 255.0)
        img = (img * (255.0 if img.max() <= 1.0 else 1.0)).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    if img.shape[-1] == 4:
        img = img[..., :3]
    return np.ascontiguousarray(img)


def center_square(img: np.ndarray, size: int) -> np.ndarray:
    """Central square crop of an (H, W, 3) uint8 image, resized to ``size`` x ``size``."""
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = torch.from_numpy(np.array(img[top:top + s, left:left + s])).permute(2, 0, 1)[None].float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()


def to_tensor(img: np.ndarray, size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """Model input (3, size, size): central square, resized, normalised."""
    x = torch.from_numpy(center_square(img, size)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def model_norm(model) -> Tuple[tuple, tuple]:
    """(mean, std) the model expects (timm's pretrained_cfg), default 0.5/0.5."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))


# --------------------------------------------------------------------------------------------
# Recording the selection
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class BlockSelection:
    index: int                       # position among the converted blocks
    name: str                        # module name, e.g. 'blocks.4'
    selected: Optional[torch.Tensor]  # (B, k) patch indices on the slow path; None = all
    grid: Tuple[int, int] = (0, 0)   # the block's patch grid (h, w): a pyramid's stages differ


@dataclasses.dataclass
class SelectionRecord:
    blocks: List[BlockSelection]     # evolving blocks, in execution order
    scores: torch.Tensor             # (B, M) final global attention
    grid: Tuple[int, int]            # patch grid (h, w) of the scores' M patch tokens
    num_prefix: int
    keep_ratio: float

    def block_masks(self) -> List[np.ndarray]:
        """Per evolving block, (B, h, w) booleans on its own patch grid: True where the token
        took the slow path."""
        B = self.scores.shape[0]
        out = []
        for b in self.blocks:
            gh, gw = b.grid
            m = np.zeros((B, gh * gw), dtype=bool)
            if b.selected is None:
                m[:] = True
            else:
                sel = b.selected.cpu().numpy()
                for i in range(B):
                    m[i, sel[i]] = True
            out.append(m.reshape(B, gh, gw))
        return out

    def masks(self) -> np.ndarray:
        """(B, n_blocks, h, w) booleans: True where the token took the slow path (every
        evolving block on one grid; a pyramid's: :meth:`block_masks`)."""
        grids = {b.grid for b in self.blocks}
        if len(grids) > 1:
            raise ValueError(f"the evolving blocks have {len(grids)} patch grids "
                             f"{sorted(grids)}: use block_masks()")
        return np.stack(self.block_masks(), 1)


def _grid_of(spec, M: int) -> Tuple[int, int]:
    grid = getattr(spec.analysis, "grid", None)
    if grid is not None and grid[0] * grid[1] == M:
        return (int(grid[0]), int(grid[1]))
    r = int(round(M ** 0.5))
    if r * r != M:
        raise ValueError(f"{spec.analysis.name}: {M} patch tokens and no known patch grid")
    return (r, r)


@torch.no_grad()
def record_selection(model, x: torch.Tensor) -> SelectionRecord:
    """Run a converted ``model`` (eval mode) on ``x`` and record, for every evolving block,
    the patch tokens it selected (forward hooks reading the state the block left, ``spec.context``)."""
    import evoplug
    report = evoplug.get_report(model)
    evolving = [s for s in report.blocks if s.role == "evolve"]
    if not evolving:
        raise ValueError("the model has no evolving block (start_block past the last block?)")
    grids = {s.index: _grid_of(s, s.analysis.num_tokens - s.analysis.num_prefix - s.analysis.num_suffix)
             for s in evolving}
    got: List[BlockSelection] = []
    handles = []
    for spec in evolving:
        def hook(mod, args, out, spec=spec):
            # tokens_run == -1: the original forward ran (keep 1.0), every token took it
            sel = spec.context.sel if spec.tokens_run != -1 else None
            got.append(BlockSelection(spec.index, spec.analysis.name,
                                      None if sel is None else sel.detach().clone(), grids[spec.index]))
        handles.append(spec.analysis.module.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    state = report.blocks[0].context          # what this thread's forward left
    scores = state.scores if state is not None else None
    # the scores are on the grid of the last stage they reached (a pyramid's last)
    grid = next((grids[s.index] for s in reversed(evolving) if scores is not None
                 and scores.shape == (x.shape[0], grids[s.index][0] * grids[s.index][1])), None)
    if grid is None:
        # keep 1.0 runs the original forwards: no global attention was computed
        grid = grids[evolving[0].index]
        scores = torch.zeros(x.shape[0], grid[0] * grid[1])
    return SelectionRecord(got, scores.detach().float().cpu().clone(), grid,
                           evolving[0].analysis.num_prefix, report.options.keep_ratio)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

def grid_size(n_rows: int, n_cols: int, tile: int) -> Tuple[int, int]:
    """(width, height) in pixels of a selection grid."""
    return (n_cols * tile + (n_cols + 1) * GAP, HEADER + n_rows * tile + n_rows * GAP)


def _token_map(mask: np.ndarray, tile: int) -> np.ndarray:
    """(gh, gw) -> (tile, tile) by nearest token."""
    gh, gw = mask.shape
    rows = np.arange(tile) * gh // tile
    cols = np.arange(tile) * gw // tile
    return mask[rows][:, cols]


def selection_grid(images: Sequence[np.ndarray], record: SelectionRecord, path: str,
                   tile: int = 128, names: Optional[Sequence[str]] = None,
                   wash: float = 0.8, title: Optional[str] = None) -> Tuple[int, int]:
    """Write the PNG grid: per image, the input, then each evolving block with the tokens it
    did *not* select washed out (blended ``wash`` towards white), then the final global
    attention as a heat map. ``images`` are (H, W, 3) uint8 arrays (shown as their central
    square). Returns the PNG's (width, height) in pixels, see :func:`grid_size`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("pictures need matplotlib: pip install matplotlib") from e
    B = len(images)
    if record.scores.shape[0] != B:
        raise ValueError(f"{B} images but the record holds {record.scores.shape[0]}")
    masks = record.block_masks()
    n_blk = len(record.blocks)
    cols = 1 + n_blk + 1
    W, H = grid_size(B, cols, tile)
    fig = plt.figure(figsize=((W + 0.01) / DPI, (H + 0.01) / DPI), dpi=DPI)
    fig.patch.set_facecolor("white")
    titles = ["input"] + [f"{b.name}" for b in record.blocks] + ["global attn."]
    fs = max(5.0, min(9.0, tile / 14))
    heat = plt.get_cmap("inferno")
    gh, gw = record.grid
    scores = record.scores.float().cpu().numpy().reshape(B, gh, gw)
    for i, img in enumerate(images):
        base = center_square(img, tile).astype(np.float32) / 255.0
        tiles = [base]
        for j in range(n_blk):
            keep = _token_map(masks[j][i], tile)[..., None]
            tiles.append(np.where(keep, base, base * (1 - wash) + wash))
        s = scores[i]
        s = (s - s.min()) / max(float(s.max() - s.min()), 1e-12)
        hm = heat(_token_map(s, tile))[..., :3]
        tiles.append(0.45 * base + 0.55 * hm)
        for j, t in enumerate(tiles):
            x0 = GAP + j * (tile + GAP)
            y0 = HEADER + i * (tile + GAP)          # from the top
            ax = fig.add_axes([x0 / W, 1 - (y0 + tile) / H, tile / W, tile / H])
            ax.imshow(np.clip(t, 0, 1), interpolation="nearest")
            ax.set_axis_off()
            if j == 0 and names:
                ax.text(0.03, 0.03, names[i], transform=ax.transAxes, fontsize=fs * 0.85,
                        color="white", va="bottom", ha="left",
                        bbox=dict(facecolor="black", alpha=0.55, pad=1.5, lw=0))
            if i == 0:
                fig.text((x0 + tile / 2) / W, 1 - (HEADER - 4) / H, titles[j], ha="center",
                         va="bottom", fontsize=fs)
    sub = title or (f"tokens on the slow path (keep_ratio={record.keep_ratio:g}); "
                    "washed out: fast update only")
    fig.text(GAP / W, 1 - 3 / H, sub, ha="left", va="top", fontsize=fs * 0.85, color="0.3")
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return (W, H)


# --------------------------------------------------------------------------------------------
# One call
# --------------------------------------------------------------------------------------------

def visualize(model, images: Sequence[Union[str, np.ndarray]], path: str, *,
              keep_ratio: Optional[float] = None, size: Optional[int] = None,
              mean=None, std=None, tile: int = 128, names: Optional[Sequence[str]] = None,
              **convert_options) -> Tuple[int, int]:
    """Token-selection grid of ``model`` on ``images`` (file names, ``skimage:NAME`` or
    arrays), written to ``path``. A model that is not converted yet is converted (a copy) at
    ``keep_ratio`` (default 0.5) with ``convert_options``; a converted one runs with its options,
    ``keep_ratio`` and ``convert_options`` set for the pictures (:func:`evoplug.set_options`) and
    put back afterwards. Returns the PNG's (width, height)."""
    import evoplug
    from .models import input_size
    arrays = [load_image(im) for im in images]
    if names is None:
        names = [im.split(":", 1)[1] if isinstance(im, str) and im.startswith("skimage:")
                 else (os.path.basename(im) if isinstance(im, str) else f"image {i}")
                 for i, im in enumerate(images)]
    dm, ds = model_norm(model)
    mean, std = mean or dm, std or ds
    h, w = input_size(model, size)
    if h != w:
        raise ValueError(f"square inputs only (the model takes {h}x{w})")
    x = torch.stack([to_tensor(a, h, mean, std) for a in arrays])
    try:
        x = x.to(next(model.parameters()).device)
    except StopIteration:
        pass
    if getattr(model, "_evoplug_report", None) is None:
        model = evoplug.convert(model, keep_ratio=0.5 if keep_ratio is None else keep_ratio,
                                example_input=x[:1], **convert_options)
        rec = record_selection(model, x)
    else:
        # (options given with a converted model were dropped, and keep_ratio stayed changed on
        # the caller's model until the thirty-sixth session: audit U2)
        change = dict(convert_options, **({} if keep_ratio is None else {"keep_ratio": keep_ratio}))
        opts = evoplug.get_report(model).options
        before = {k: getattr(opts, k) for k in change if hasattr(opts, k)}
        evoplug.set_options(model, **change)      # (an unknown option: its error, naming them)
        try:
            rec = record_selection(model, x)
        finally:
            evoplug.set_options(model, **before)
    return selection_grid(arrays, rec, path, tile=tile, names=names)
