"""Reselect every block, or once per stage? What ``reselect_every`` costs and what it saves.

evoplug used to re-run the top-k token selection in every evolving block (``reselect_every=1``);
the authors' DeiT code sorts the tokens once per stage of 4 blocks (now evoplug's default, 4).
This study measures both sides of that choice, in two parts that run separately:

--accuracy  top-1 and agreement with the dense model (fraction of inputs with the same
            argmax) of the two models trained in examples/, off the shelf (no fine-tuning),
            for keep_ratio 0.5 and 0.7 and reselect_every 1, 2, 4 (and the number of
            evolving blocks, "once per stage", if that is another number):
            - the small DeiT trained on scikit-learn's digits (examples/digits.py; 359 test
              images; cached in bench_out/deit_digits.pth);
            - the photo ViT of examples/photos.py (1,000 fresh random crops, seed 1234, as
              photos.evaluate draws them; trained once, 5-16 minutes on 2 cores, cached in
              bench_out/photo_vit.pth).
--cost      timm deit_small_patch16_224 (random weights) at keep 0.5, dense against
            reselect_every 1, 2, 4: ATen ops one forward dispatches (batch 2, eval, no_grad),
            extra ops per evolving block, and CPU images/s measured interleaved in one process
            (median of the repeats; batch 32 on 2 threads, batch 1 on 1 thread).

    python benchmarks/reselect.py --accuracy          # writes docs/bench/reselect_accuracy.json
    python benchmarks/reselect.py --cost              # writes docs/bench/reselect_cpu.json
    python benchmarks/reselect.py --cost --repeats 3 --json /tmp/smoke.json   # quick check

Each part prints Markdown tables and writes a JSON file with the machine, torch version,
date, settings and every figure.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import digits  # noqa: E402
import photos  # noqa: E402

import evoplug  # noqa: E402
from evoplug.tools import bench  # noqa: E402
from evoplug.tools.bench import OpCounter  # noqa: E402
from evoplug.tools.models import create_model  # noqa: E402

KEEPS = (0.5, 0.7)
RESELECT = (1, 2, 4)
COST_MODEL = "deit_small_patch16_224"


# --------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------

def evolving_blocks(fast) -> int:
    """Number of converted blocks whose role is 'evolve'."""
    return sum(s.role == "evolve" for s in evoplug.get_report(fast).blocks)


def reselect_values(n_evolve: int) -> list:
    """1, 2, 4 and "once per stage" (= the number of evolving blocks), sorted, no repeats."""
    return sorted(set(RESELECT) | {n_evolve})


def provenance(note: str = "") -> dict:
    """Machine, date, versions and commit (:func:`evoplug.tools.bench.provenance`), the folder
    of the evoplug the figures were measured with, and the note."""
    return dict(machine=bench.machine("cpu"), **bench.provenance(),
                evoplug_from=os.path.dirname(os.path.abspath(evoplug.__file__)), note=note)


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"\nwrote {os.path.relpath(path)}")


def markdown(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Part 1: accuracy on the trained models of examples/
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def predictions(model, x, batch: int = 250) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])


def digits_data():
    """(model, inputs, labels, description) of the small DeiT trained on digits."""
    model = digits.trained_small_deit()
    _, _, xt, yt = digits.load_digits_tensors()
    return model, xt, yt, f"small DeiT on scikit-learn digits, {len(yt)} test images"


def photo_data(n: int, seed: int):
    """(model, inputs, labels, description) of the photo ViT, on ``n`` fresh random crops drawn
    as photos.evaluate draws them."""
    model = photos.trained_model()
    x, y = photos.random_crops(photos.load_photos(), n, torch.Generator().manual_seed(seed))
    return model, x, y, f"photo ViT of examples/photos.py, {n} fresh random crops (seed {seed})"


def pct(mask: torch.Tensor) -> float:
    return round(100.0 * float(mask.float().mean()), 2)


def accuracy_rows(model, x, y) -> tuple:
    """(dense top-1, n evolving blocks, roles text, rows: one per (keep, reselect_every))."""
    dense = predictions(model, x)
    probe = evoplug.convert(model, keep_ratio=KEEPS[0], example_input=x[:1])
    n_evolve = evolving_blocks(probe)
    rows = []
    for keep in KEEPS:
        per_block = None
        for r in reselect_values(n_evolve):
            fast = evoplug.convert(model, keep_ratio=keep, example_input=x[:1], reselect_every=r)
            pred = predictions(fast, x)
            per_block = pred if r == 1 else per_block
            rows.append(dict(keep_ratio=keep, reselect_every=r, top1=pct(pred == y),
                             agreement=pct(pred == dense),
                             differs_from_every_block=pct(pred != per_block)))
    return pct(dense == y), n_evolve, evoplug.explain(probe), rows


def accuracy_table(dense_top1: float, n_evolve: int, rows) -> str:
    def label(every: int) -> str:
        return f"{every} (once per stage)" if every == n_evolve else str(every)

    body = [(f"{r['keep_ratio']:g}", label(r["reselect_every"]), f"{r['top1']:.2f}%",
             f"{r['agreement']:.2f}%", f"{r['differs_from_every_block']:.2f}%") for r in rows]
    body.insert(0, ("1 (dense)", "-", f"{dense_top1:.2f}%", "100.00%", "-"))
    return markdown(("keep_ratio", "reselect_every", "top-1", "agreement with dense",
                     "prediction differs from reselect_every=1"), body)


def run_accuracy(a) -> dict:
    torch.manual_seed(0)
    models = {}
    for key, load in (("digits", digits_data), ("photos", lambda: photo_data(a.crops, a.seed))):
        model, x, y, desc = load()
        dense, n_evolve, roles, rows = accuracy_rows(model, x, y)
        print(f"\n### {desc}\n\n```\n{roles}\n```\n")
        print(f"{n_evolve} evolving blocks: once per stage = reselect_every={n_evolve}\n")
        print(accuracy_table(dense, n_evolve, rows))
        models[key] = dict(description=desc, num_inputs=len(y), dense_top1=dense,
                           evolving_blocks=n_evolve, rows=rows)
    return dict(**provenance(a.note), part="accuracy",
                settings=dict(keep_ratios=list(KEEPS), fine_tuning=False, photo_crops=a.crops,
                              photo_seed=a.seed, metrics="top-1 and agreement (same argmax as "
                              "the dense model) in %, one trained model each, no seed averaging"),
                models=models)


# --------------------------------------------------------------------------------------------
# Part 2: ATen ops and CPU time of deit_small
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def count_ops(model, x) -> collections.Counter:
    """Ops of one forward after a warm-up forward (a converted model makes its constants once
    per device), as tests/test_op_budget.py counts them."""
    model(x)
    with OpCounter() as c:
        model(x)
    return c.ops


def cost_variants(keep: float):
    """{'dense': model, 'R=1': converted, ...} and the number of evolving blocks."""
    torch.manual_seed(0)
    model = create_model(COST_MODEL)
    h, w = evoplug.input_size(model)[1:]
    example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    variants = {"dense": model}
    for r in RESELECT:
        variants[f"R={r}"] = evoplug.convert(model, keep_ratio=keep, example_input=example,
                                             reselect_every=r).eval()
    return variants, evolving_blocks(variants["R=1"]), (h, w)


def op_rows(variants, n_evolve: int, size) -> dict:
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    counts = {n: count_ops(m, x) for n, m in variants.items()}
    dense = sum(counts["dense"].values())
    out = {}
    for n, c in counts.items():
        total = sum(c.values())
        extra = {op: c[op] - counts["dense"][op] for op in c | counts["dense"]
                 if c[op] != counts["dense"][op]}
        out[n] = dict(ops=total, extra_ops=total - dense,
                      extra_per_evolving_block=round((total - dense) / n_evolve, 2),
                      extra_by_op=dict(sorted(extra.items(), key=lambda kv: -abs(kv[1]))))
    return out


def time_rows(variants, size, settings, repeats: int, warmup: int) -> list:
    rows = []
    threads_before = torch.get_num_threads()
    for batch, threads in settings:
        torch.set_num_threads(threads)
        x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(2))
        t = bench.interleaved(variants, x, repeats, warmup)
        ips = {n: batch / t[n].median for n in variants}
        rows.append(dict(batch=batch, threads=threads, img_s={n: round(v, 2) for n, v in ips.items()},
                         vs_dense={n: round(v / ips["dense"], 3) for n, v in ips.items()},
                         seconds={n: t[n].seconds for n in variants}))
    torch.set_num_threads(threads_before)
    return rows


def cost_tables(ops: dict, times: list, n_evolve: int) -> str:
    names = list(ops)
    head = ["", *names]
    body = [("ATen ops per forward (batch 2)", *(ops[n]["ops"] for n in names)),
            (f"extra ops per evolving block ({n_evolve} blocks)",
             *("-" if n == "dense" else ops[n]["extra_per_evolving_block"] for n in names))]
    for t in times:
        body.append((f"img/s, batch {t['batch']}, {t['threads']} thread(s)",
                     *(f"{t['img_s'][n]:.2f}" for n in names)))
        body.append((f"vs dense, batch {t['batch']}", *(f"{t['vs_dense'][n]:.3f}x" for n in names)))
    return markdown(head, body)


def run_cost(a) -> dict:
    if a.malloc == "retain":
        bench.retain_freed_memory()
    variants, n_evolve, size = cost_variants(a.keep)
    print(f"\n### {COST_MODEL} (random weights), keep_ratio {a.keep}, "
          f"{n_evolve} evolving blocks; allocator: {bench.allocator()}\n")
    ops = op_rows(variants, n_evolve, size)
    settings = ((32, 2), (1, 1))
    times = time_rows(variants, size, settings, a.repeats, a.warmup)
    print(cost_tables(ops, times, n_evolve))
    print(f"\nR = reselect_every; img/s: median of {a.repeats} interleaved repeats after "
          f"{a.warmup} warm-up rounds")
    return dict(**provenance(a.note), part="cost", model=COST_MODEL,
                settings=dict(keep_ratio=a.keep, reselect_every=list(RESELECT), op_count_batch=2,
                              batch_threads=[list(s) for s in settings], repeats=a.repeats,
                              warmup=a.warmup, allocator=bench.allocator(), dtype="float32",
                              timing="evoplug.tools.bench.interleaved (inference_mode, median)"),
                evolving_blocks=n_evolve, ops=ops, timing=times)


# --------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", action="store_true", help="part 1: top-1 and agreement")
    p.add_argument("--cost", action="store_true", help="part 2: ATen ops and CPU images/s")
    p.add_argument("--accuracy-json", default=os.path.join(ROOT, "docs/bench/reselect_accuracy.json"))
    p.add_argument("--json", default=os.path.join(ROOT, "docs/bench/reselect_cpu.json"),
                   help="where --cost writes its JSON")
    p.add_argument("--crops", type=int, default=1000, help="photo ViT: random crops evaluated")
    p.add_argument("--seed", type=int, default=1234, help="photo ViT: seed of the crops")
    p.add_argument("--keep", type=float, default=0.5, help="--cost: keep ratio")
    p.add_argument("--repeats", type=int, default=15, help="--cost: timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="--cost: untimed rounds first")
    p.add_argument("--malloc", choices=["retain", "system"], default="retain",
                   help="--cost: as `evoplug bench --malloc` (default: retain freed memory)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. which "
                   "evoplug build was measured)")
    a = p.parse_args(argv)
    if not (a.accuracy or a.cost):
        p.error("choose --accuracy and/or --cost")
    print(f"machine: {bench.machine('cpu')}; evoplug from {os.path.dirname(evoplug.__file__)}")
    if a.accuracy:
        write_json(a.accuracy_json, run_accuracy(a))
    if a.cost:
        write_json(a.json, run_cost(a))


if __name__ == "__main__":
    main()
