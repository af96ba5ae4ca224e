"""The ``evoplug`` command (also ``python -m evoplug``).

    evoplug bench deit_small_patch16_224 --keep 0.5 0.7 1.0 --batch 1 32 --plot bench.png
    evoplug bench deit_small_patch16_224 --train --keep 0.5 --batch 64 --device cuda --dtype float16
    evoplug explain eva02_tiny_patch14_224
    evoplug check deit_small_patch16_224 swinv2_tiny_window8_256 --keep 0.5
    evoplug visualize bench_out/photo_vit.pth skimage:astronaut skimage:coffee --out sel.png
    evoplug plan bench_out/photo_vit.pth calib_images/ --target 1.4 --png plan.png --json plan.json

Models are timm names (random weights: no hub; ``--model-arg img_size=112`` etc. go to
``timm.create_model``), or, for ``explain``, ``visualize``, ``check`` and ``plan``, a checkpoint file written by
:func:`evoplug.tools.visualize.save_checkpoint`; ``--checkpoint FILE`` loads a plain state_dict
into a timm model. Exit status: 0 done, 2 bad usage (unknown model, bad keep ratio, ...),
1 the work failed (e.g. a model evoplug cannot convert; the message says why).
"""
from __future__ import annotations

import argparse
import ast
import os
import pickle
import sys
from typing import List, Optional

from ..options import check_keep_ratio


class CliError(Exception):
    """A failure to report as ``evoplug: error: ...`` with exit status 1."""


class UsageError(CliError):
    """Options that do not go together, found once the model is known: exit status 2, as
    argparse's own usage errors (they exited 1 until the twenty-seventh session)."""


def _keep(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep_ratio must be a number in (0, 1], got {text!r}")
    try:
        return check_keep_ratio(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _trade_off(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"trade_off must be a number in [0, 1], got {text!r}")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"trade_off must be in [0, 1], got {text!r}")
    return value


def _checked(convert, ok, what: str):
    """An argparse type: ``convert(text)`` where ``ok`` accepts the value, else a usage error
    (exit status 2) saying what was expected."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a number > 0")


def _model_arg(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    # (``class_token=false`` was the string 'false', which timm took as true)
    words = {"true": True, "false": False, "none": None}
    if value.strip().lower() in words:
        return key.strip(), words[value.strip().lower()]
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass   # a plain string
    return key.strip(), value


def _add_model_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--img-size", type=_positive_int, default=None,
                   help="input size (passed to timm as img_size); default: the model's own")
    g.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument, e.g. depth=6 (repeatable)")


def _add_model_and_images(p: argparse.ArgumentParser, images_help: str):
    p.add_argument("model", metavar="MODEL", help="timm model name or evoplug checkpoint file")
    p.add_argument("images", nargs="+", metavar="IMAGE", help=images_help)
    p.add_argument("--checkpoint", metavar="FILE", help="state_dict to load into the timm model")


def _add_convert_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("conversion (evoplug.EvoOptions)")
    g.add_argument("--start-block", type=_positive_int, default=None,
                   help="first evolving block (default: a third of the blocks stay dense)")
    g.add_argument("--trade-off", type=_trade_off, default=None, help="alpha of the global attention update")
    g.add_argument("--reselect-every", type=_positive_int, default=None,
                   help="re-run top-k every N evolving blocks (default 4)")
    g.add_argument("--no-representative", action="store_true",
                   help="placeholder variant: non-selected tokens carried unchanged")
    g.add_argument("--global-query", choices=["auto", "cls", "mean"], default=None)


def _convert_options(a) -> dict:
    opts = {}
    for key in ("start_block", "trade_off", "reselect_every", "global_query"):
        if getattr(a, key, None) is not None:
            opts[key] = getattr(a, key)
    if getattr(a, "no_representative", False):
        opts["representative"] = False
    return opts


def _bench_convert_options(a) -> dict:
    return _convert_options(a) if a.strict else dict(_convert_options(a), strict=False)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = argparse.ArgumentParser(
        prog="evoplug", description="Evo-ViT slow-fast token evolution for existing vision "
        "transformers: benchmark, explain, visualise and check converted timm models and plan their "
        "options.",
        epilog="`evoplug COMMAND --help` for the options of a command.")
    p.add_argument("--version", action="version", version=f"evoplug {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser("bench", help="throughput and FLOPs, original vs converted, side by side",
                       description="Original vs converted timm models (random weights) in one "
                       "process: FLOPs per image (torch.utils.flop_counter) and images/s, every "
                       "variant timed interleaved with the others, median of the repeats.")
    b.add_argument("models", nargs="+", metavar="MODEL", help="timm model names")
    b.add_argument("--keep", type=_keep, nargs="+", default=[0.5, 1.0], metavar="K",
                   help="keep ratios, each in (0, 1] (default: 0.5 1.0)")
    b.add_argument("--batch", type=_positive_int, nargs="+", default=[32], metavar="B",
                   help="batch sizes (default: 32)")
    b.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    b.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    b.add_argument("--repeats", type=_positive_int, default=7, help="timed rounds (median; default 7)")
    b.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed rounds first (default 2)")
    b.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")
    b.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"],
                   help="also time torch.compile of the original and of each converted model; "
                        "MODE is torch.compile's mode (reduce-overhead: CUDA graphs on a GPU); "
                        "with --train: steps with forward and backward compiled")
    b.add_argument("--train", action="store_true",
                   help="time training steps instead of inference: forward + backward + optimizer "
                        "step in train mode, interleaved, median; float32 weights, --dtype "
                        "float16/bfloat16 runs the forward under autocast (AMP)")
    b.add_argument("--optimizer", choices=["adamw", "adamw-fused", "sgd", "none"], default=None,
                   help="with --train: adamw (default, torch's default implementation), "
                        "adamw-fused (fused=True), sgd (momentum 0.9) or none (forward + "
                        "backward only)")
    b.add_argument("--malloc", choices=["retain", "system"], default="retain",
                   help="CPU runs: 'retain' (default) makes glibc keep freed memory, so a forward "
                        "does not page-fault its activations in again (see "
                        "evoplug.tools.bench.retain_freed_memory); 'system' leaves malloc as it is")
    b.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    b.add_argument("--json", metavar="FILE", help="write machine, settings and rows as JSON")
    b.add_argument("--plot", metavar="PNG", help="plot speed-up and FLOP ratio against keep_ratio")
    b.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    b.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bar on stderr (default: when it is a terminal)")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    _add_model_options(b)
    _add_convert_options(b)
    b.add_argument("--no-strict", dest="strict", action="store_false",
                   help="a model only some of whose blocks convert: convert those, leave the "
                        "others as they are (strict=False; the rows say how many converted)")

    e = sub.add_parser("explain", help="what the analysis found in a model and what evolves",
                       description="Convert a model and print what evoplug found: blocks, roles, "
                       "tokens, prefix tokens, attention, position terms, residual stream, "
                       "refused modules; FLOPs per image before and after.")
    e.add_argument("model", metavar="MODEL", help="timm model name or evoplug checkpoint file")
    e.add_argument("--keep", type=_keep, default=0.5, metavar="K", help="keep ratio (default 0.5)")
    e.add_argument("--checkpoint", metavar="FILE", help="state_dict to load into the timm model")
    _add_model_options(e)
    _add_convert_options(e)

    v = sub.add_parser("visualize", aliases=["visualise"],
                       help="PNG grid of the tokens each evolving block selected",
                       description="For each image: which patch tokens each evolving block "
                       "ran on the slow path (the others washed out), and the final global "
                       "attention. Only meaningful for a trained model (see examples/photos.py).")
    _add_model_and_images(v, "image files, or skimage:NAME for scikit-image's sample photographs "
                             "(astronaut, coffee, chelsea, rocket, ...)")
    v.add_argument("--keep", type=_keep, default=0.5, metavar="K", help="keep ratio (default 0.5)")
    v.add_argument("--out", default="token_selection.png", metavar="PNG")
    v.add_argument("--tile", type=_positive_int, default=128, help="pixels per picture (default 128)")
    _add_model_options(v)
    _add_convert_options(v)

    c = sub.add_parser("check", help="convert models and check that they do what evoplug promises",
                       description="For each model: keep 1.0 reproduces it (both paths), every "
                       "evolving block runs fewer tokens at --keep, batch independence, state_dict "
                       "both ways, gradients reach every parameter (evoplug.tools.check). Exit "
                       "status 1 when a model is refused or a check fails.")
    c.add_argument("models", nargs="+", metavar="MODEL", help="timm model names or evoplug checkpoint files")
    c.add_argument("--keep", type=_keep, default=0.5, metavar="K", help="keep ratio (default 0.5)")
    c.add_argument("--json", metavar="FILE", help="write the results as JSON")
    c.add_argument("--compile", metavar="BACKEND", nargs="?", const="inductor", default=None,
                   help="also torch.compile the converted model (default backend inductor): "
                        "graphs, graph breaks, compiled vs eager output")
    _add_model_options(c)
    _add_convert_options(c)

    pl = sub.add_parser("plan", help="options that keep a classifier's predictions at a target speed-up",
                        description="Measure keep ratio x start block x global query (x trade-off) "
                        "of a converted classifier on calibration images: top-1 agreement with the "
                        "dense model against the FLOP ratio (or the measured time ratio, --timed); "
                        "print the table with the Pareto front and the best option that reaches "
                        "--target (exit status 1 when none does).")
    _add_model_and_images(pl, "image files, folders of them, skimage:NAME, or a .pt file holding "
                              "a preprocessed (N, 3, H, W) tensor")
    pl.add_argument("--target", type=_positive_float, default=1.3, help="speed-up to reach (default 1.3)")
    pl.add_argument("--keep", type=_keep, nargs="+", default=None, metavar="K",
                    help="keep ratios to measure (default 0.3 ... 0.9)")
    pl.add_argument("--start-blocks", type=_positive_int, nargs="+", default=None, metavar="S",
                    help="start blocks to measure (default: a quarter, a third and half of the blocks)")
    pl.add_argument("--trade-offs", type=_trade_off, nargs="+", default=[0.5], metavar="A")
    pl.add_argument("--queries", nargs="+", choices=["cls", "mean"], default=None,
                    help="global queries (default: both when the model has a class token)")
    pl.add_argument("--timed", action="store_true", help="also time dense vs converted (decides)")
    pl.add_argument("--batch", type=_positive_int, default=None, help="batch for --timed (default 32)")
    pl.add_argument("--max-images", type=_positive_int, default=None)
    pl.add_argument("--png", metavar="FILE", help="plot agreement against speed-up")
    pl.add_argument("--json", metavar="FILE", help="write every measured option as JSON")
    pl.add_argument("--progress", dest="progress", action="store_true", default=None)
    pl.add_argument("--no-progress", dest="progress", action="store_false")
    g = pl.add_argument_group("conversion (the same for every option measured)")
    g.add_argument("--reselect-every", type=_positive_int, default=None,
                   help="re-run top-k every N evolving blocks (default 4)")
    g.add_argument("--no-representative", action="store_true",
                   help="placeholder variant: non-selected tokens carried unchanged")
    _add_model_options(pl)
    return p


# --------------------------------------------------------------------------------------------

def _check_models(parser, names: List[str], allow_files: bool = False):
    from .models import check_model_name
    for n in names:
        if allow_files and os.path.isfile(n):
            continue
        try:
            check_model_name(n)
        except ValueError as err:
            if allow_files and os.path.isdir(n):
                parser.error(f"{n} is a folder, not a checkpoint file nor a timm model name")
            if allow_files and (os.sep in n or n.endswith((".pth", ".pt"))):
                parser.error(f"checkpoint file not found: {n}")
            parser.error(str(err))


def _load_model(a):
    """(model, meta) from a timm name or an evoplug checkpoint file."""
    import torch
    from .models import create_model, load_checkpoint, load_state_dict, read_torch_file
    kwargs = dict(a.model_arg)
    if os.path.isfile(a.model):
        if kwargs or a.img_size or getattr(a, "checkpoint", None):
            raise UsageError("--model-arg/--img-size/--checkpoint do not apply to a checkpoint file "
                           "(it stores how to build its model, and its weights)")
        return load_checkpoint(a.model)
    torch.manual_seed(0)
    kwargs.pop("img_size", None)           # (--model-arg img_size=112, as bench takes it)
    model = create_model(a.model, _img_size(a), **kwargs)
    meta = {}
    if a.checkpoint:
        if not os.path.isfile(a.checkpoint):
            raise CliError(f"checkpoint file not found: {a.checkpoint}")
        sd = read_torch_file(a.checkpoint)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CliError(f"{a.checkpoint}: not a state_dict (a dict of tensors), a {type(sd).__name__}")
        load_state_dict(model, sd, a.checkpoint)
    else:
        meta["random_weights"] = True
    return model.eval(), meta


def _img_size(a) -> Optional[int]:
    """--img-size, or --model-arg img_size=N; both given, they must agree."""
    size = dict(a.model_arg).get("img_size")
    if a.img_size is not None and size is not None and size != a.img_size:
        raise UsageError(f"--img-size {a.img_size} and --model-arg img_size={size!r} differ")
    return a.img_size if a.img_size is not None else size


def _no_nan(v):
    """``v`` with every float NaN (in dicts and lists) as None."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_no_nan(x) for x in v]
    return v


def _mode_text(a) -> str:
    if not a.train:
        return f"{a.dtype}, eval, inference_mode"
    step = "forward + backward" + ("" if a.optimizer == "none" else f" + {a.optimizer} step")
    amp = "float32" if a.dtype == "float32" else f"{a.dtype} autocast (AMP), float32 weights"
    return f"training steps ({step}, cross-entropy, train mode), {amp}"


def _unique(values):
    """The values in their order, each once (1 and 1.0 are one)."""
    return None if values is None else list(dict.fromkeys(values))


def cmd_bench(a, out) -> int:
    import torch
    from . import bench
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.malloc == "retain" and not str(a.device).startswith("cuda"):
        bench.retain_freed_memory()
    a.keep, a.batch = _unique(a.keep), _unique(a.batch)   # (a ratio given twice: one row)
    if a.optimizer is not None and not a.train:
        raise UsageError("--optimizer applies to --train (training steps) only")
    a.optimizer = a.optimizer or "adamw"
    # (--model-arg img_size=N is --img-size N: for a model that takes no img_size, PVTv2's,
    # bench ran it at 224 and explain, check, visualize and plan too until the forty-third session)
    size = _img_size(a)
    warmup = max(1, a.warmup) if a.train or a.compile else a.warmup    # (as bench runs them)
    settings = dict(allocator=bench.allocator(), keep_ratios=a.keep, batch_sizes=a.batch,
                    device=a.device, dtype=a.dtype, threads=a.threads or torch.get_num_threads(),
                    repeats=a.repeats, warmup=warmup, compile=a.compile, img_size=size,
                    model_kwargs=dict(a.model_arg), convert_options=_bench_convert_options(a),
                    train=a.train, optimizer=a.optimizer if a.train else None)
    bench.resolve_device(a.device)
    print(f"machine: {bench.machine(a.device)}", file=out)
    print(f"settings: {_mode_text(a)}, random weights; original and converted "
          f"models timed interleaved, median of {a.repeats} after {warmup} warm-up round(s); "
          f"allocator: {bench.allocator()}"
          f"{f'; torch.compile mode={a.compile} (first call untimed)' if a.compile else ''}", file=out)
    rows: List[dict] = []
    for name in a.models:     # the table grows model by model
        new = bench.run_bench([name], a.keep, a.batch, img_size=size, device=a.device,
                              dtype=a.dtype, repeats=a.repeats, warmup=a.warmup,
                              compile=a.compile, model_kwargs=dict(a.model_arg),
                              convert_options=_bench_convert_options(a), progress=a.progress,
                              train=a.train, optimizer=a.optimizer)
        print(bench.format_table(new, header=not rows, model_width=max(map(len, a.models))),
              file=out, flush=True)
        rows += new
    if a.markdown:
        print("\n" + bench.format_markdown(rows), file=out)
    if a.csv:
        bench.write_csv(rows, a.csv)
        print(f"wrote {a.csv}", file=out)
    if a.json:
        bench.write_json(rows, a.json, bench.machine(a.device), settings)
        print(f"wrote {a.json}", file=out)
    if a.plot:
        bench.plot(rows, a.plot)
        print(f"wrote {a.plot}", file=out)
    return 0


def cmd_explain(a, out) -> int:
    import torch
    import evoplug
    from . import bench
    model, meta = _load_model(a)
    h, w = bench.input_size(model, _img_size(a))
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    fast = evoplug.convert(model, keep_ratio=a.keep, example_input=x, strict=False,
                           **_convert_options(a))
    print(evoplug.explain(fast), file=out)
    f0, f1 = bench.flops(model, x), bench.flops(fast, x)
    with torch.no_grad():
        fast(x)
    specs = evoplug.get_report(fast).blocks
    toks = ", ".join(str(s.tokens_run) if s.tokens_run >= 0 else f"{s.analysis.num_tokens}*"
                     for s in specs)
    star = " (*: the block's original forward)" if any(s.tokens_run < 0 for s in specs) else ""
    print(f"input {h}x{w}; FLOPs per image: {f0 / 1e9:.3f} GFLOP dense -> {f1 / 1e9:.3f} GFLOP "
          f"converted ({f0 / f1:.2f}x fewer); tokens through attention/MLP per block: {toks}{star}",
          file=out)
    return 0


def cmd_check(a, out) -> int:
    import dataclasses
    import json
    import torch
    from .check import check_conversion
    from . import bench
    from .check import CheckResult
    from .models import load_checkpoint
    results = {}
    for name in a.models:
        a.model, a.checkpoint = name, None
        try:
            # (a checkpoint file knows its model and size: --img-size and --model-arg are for
            # the timm names beside it; they failed the file until the thirty-sixth session)
            own = os.path.isfile(name)
            model = load_checkpoint(name)[0] if own else _load_model(a)[0]
            h, w = bench.input_size(model, None if own else _img_size(a))
            x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
            r = check_conversion(model, x, keep_ratio=a.keep, compile=a.compile,
                                 **_convert_options(a))
        except Exception as e:     # noqa: BLE001 (a model that fails is reported, not fatal)
            # (one model that cannot be built or run ended the command: the models after it
            # went unchecked and --json unwritten until the thirty-sixth session, audit U2; and
            # for errors other than the usual ones until the thirty-seventh, audit V4)
            r = CheckResult(status="failed", refused=f"{type(e).__name__}: {e}")
        results[name] = r
        print(f"{name}: {r}", file=out, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            # (NaN, a figure not measured, is no JSON: strict parsers refused the file)
            json.dump(_no_nan({n: dataclasses.asdict(r) for n, r in results.items()}), f, indent=1)
        print(f"wrote {a.json}", file=out)
    return 0 if all(r.ok for r in results.values()) else 1


def cmd_visualize(a, out) -> int:
    from . import visualize as viz
    model, meta = _load_model(a)
    if meta.get("random_weights"):
        print("evoplug: warning: random weights (no --checkpoint): the class attention of an "
              "untrained model ranks tokens arbitrarily; train one, e.g. examples/photos.py",
              file=sys.stderr)
    mean, std = meta.get("mean"), meta.get("std")
    wh = viz.visualize(model, a.images, a.out, keep_ratio=a.keep, size=_img_size(a),
                       mean=tuple(mean) if mean else None, std=tuple(std) if std else None,
                       tile=a.tile, **_convert_options(a))
    print(f"wrote {a.out} ({wh[0]}x{wh[1]} px)", file=out)
    return 0


IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _calibration_images(specs: List[str], model, meta, img_size):
    """(N, 3, H, W) model inputs from image files, folders, skimage:NAME or .pt tensors."""
    import torch
    from . import bench
    from . import visualize as viz
    from .models import read_torch_file
    tensors, files = [], []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_FILES))
            if not found:
                raise CliError(f"no image files ({', '.join(IMAGE_FILES)}) in folder {spec}")
            files += found
        elif spec.endswith((".pt", ".pth")) and os.path.isfile(spec):
            t = read_torch_file(spec)
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.shape[0]:
                raise CliError(f"{spec}: expected a saved (N, 3, H, W) tensor of N >= 1 images")
            tensors.append(t.float())
        else:
            files.append(spec)
    if files:
        size = bench.input_size(model, img_size)[0]
        mean, std = meta.get("mean"), meta.get("std")
        if mean is None:
            mean, std = viz.model_norm(model)
        tensors.append(torch.stack([viz.to_tensor(viz.load_image(f), size, tuple(mean), tuple(std))
                                    for f in files]))
    return torch.cat(tensors)


def cmd_plan(a, out) -> int:
    import evoplug
    from .plan import PlanError
    model, meta = _load_model(a)
    if meta.get("random_weights"):
        print("evoplug: warning: random weights (no --checkpoint): agreement of an untrained "
              "model says little", file=sys.stderr)
    if a.batch is not None and not a.timed:
        raise UsageError("--batch applies to --timed only (the agreement runs on every image)")
    x = _calibration_images(a.images, model, meta, _img_size(a))
    a.batch = a.batch or 32
    if a.timed and a.batch > len(x):
        print(f"evoplug: warning: --batch {a.batch} is more than the {len(x)} calibration "
              f"images: timed at batch {len(x)}", file=sys.stderr)
    kw = dict(keep_ratios=_unique(a.keep)) if a.keep else {}
    progress = sys.stderr.isatty() if a.progress is None else a.progress
    try:
        p = evoplug.plan(model, x, a.target, start_blocks=a.start_blocks, global_queries=a.queries,
                         trade_offs=a.trade_offs, timed=a.timed, batch_size=a.batch,
                         max_images=a.max_images, progress=progress, **kw, **_convert_options(a))
        failed = None
    except PlanError as e:
        p, failed = e.plan, e
    print(f"{p.images} calibration images; target {p.target_speedup:g}x "
          f"({'measured time' if p.timed else 'FLOP'} ratio); * Pareto front, > best\n", file=out)
    print(p.table(), file=out)
    if a.json:
        p.save_json(a.json)
        print(f"wrote {a.json}", file=out)
    if a.png:
        p.plot(a.png, title=f"evoplug plan: {os.path.basename(a.model)}")
        print(f"wrote {a.png}", file=out)
    if failed is not None:
        raise CliError(str(failed))
    b = p.best
    opts = ", ".join(f"{k}={v!r}" for k, v in b.options().items())
    print(f"\nbest: evoplug.convert(model, {opts})  # {b.speedup:.2f}x, agreement {b.agreement:.1%}",
          file=out)
    return 0


def _picture_path(path: str) -> str:
    """The file a picture goes to: ``path``, with '.png' added where it has no extension (as
    matplotlib adds it: 'wrote selpic' named a file that was not there); a format matplotlib
    cannot write is a usage error before the work, not after it (audit U2, thirty-sixth session)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if not ext:
        return path + ".png"
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    if ext not in FigureCanvasAgg.get_supported_filetypes():
        raise UsageError(f"{path}: matplotlib cannot write .{ext} pictures (png, pdf, svg, jpg, ...)")
    return path


def main(argv: Optional[List[str]] = None, out=None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    a = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[a.command]
    if a.command == "bench":
        _check_models(sub, a.models)
    elif a.command == "check":
        _check_models(sub, a.models, allow_files=True)
    else:
        _check_models(sub, [a.model], allow_files=True)
    from ..errors import EvoplugError
    try:
        for name in {"bench": ("plot",), "plan": ("png",), "visualize": ("out",),
                     "visualise": ("out",)}.get(a.command, ()):
            if getattr(a, name, None):
                setattr(a, name, _picture_path(getattr(a, name)))
        fn = {"bench": cmd_bench, "explain": cmd_explain, "visualize": cmd_visualize,
              "visualise": cmd_visualize, "plan": cmd_plan, "check": cmd_check}[a.command]
        return fn(a, out)
    except UsageError as e:
        print(f"evoplug: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`evoplug explain ... | head`): no error (one until the
        # thirty-sixth session), and nothing more written to the closed pipe at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CliError, EvoplugError, ValueError, ImportError, OSError, RuntimeError, EOFError,
            pickle.UnpicklingError) as e:
        # (OSError: a folder or a file that is no image; UnpicklingError: a file torch.load
        # cannot read with weights_only, e.g. a whole pickled model: tracebacks until the
        # twenty-sixth session)
        what = f"{type(e).__name__}: " if isinstance(e, (OSError, EOFError, pickle.UnpicklingError)) \
            and not isinstance(e, FileNotFoundError) else ""
        hint = " (evoplug bench: --no-strict)" if a.command == "bench" and \
            "strict=False converts" in str(e) else ""
        print(f"evoplug: error: {what}{e}{hint}", file=sys.stderr)
        return 1
    except AssertionError as e:     # a model's own check of its input (timm: the image size)
        print(f"evoplug: error: the model refused its input: {e}", file=sys.stderr)
        return 1


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
