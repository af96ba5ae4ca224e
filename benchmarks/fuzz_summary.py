"""The command line and the summary both fuzzers (benchmarks/fuzz_pyramids.py, benchmarks/fuzz_flat.py) print and
store: counts by status, the seeds off their reference by more than 1e-4 (relative), keep 1.0's
largest differences, and the refusals counted by reason."""
import argparse
import collections
from typing import Callable, Dict, List


def fuzz_parser(doc: str) -> argparse.ArgumentParser:
    """A fuzzer's command line: the seeds START..END-1 and --json FILE."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("start", type=int)
    p.add_argument("end", type=int)
    p.add_argument("--json", default=None)
    p.add_argument("--grads", action="store_true",
                   help="also compare a training step's gradients (benchmarks/fuzz_grads.py)")
    return p


def summarise(rows: List[Dict], diff: str, over: str, reason: Callable[[Dict], str],
              digits: int = 4) -> Dict:
    conv = [r for r in rows if r["status"] == "converted"]
    graded = [r for r in conv if "grad_ok" in r]
    grads = {} if not graded else {
        "grads_compared": len(graded),
        "grads_off": [(r["seed"], r["grad_vs_reference"], r["out64_vs_reference"]) for r in graded
                      if not r["grad_ok"]],
        "grad_vs_reference_max": max(r["grad_vs_reference"] for r in graded),
        "grad_keep1_machinery_max": max(r["grad_keep1_machinery"] for r in graded)}
    return {**grads,
        "models": len(rows), **collections.Counter(r["status"] for r in rows),
        over: [(r["seed"], round(r[diff], digits)) for r in conv if r[diff] > 1e-4],
        "keep1_fast_path_max": max((r["keep1_fast_path"] for r in conv), default=None),
        "keep1_machinery_max": max((r["keep1_machinery"] for r in conv), default=None),
        "refusals": collections.Counter(reason(r)[:90] for r in rows
                                        if r["status"] == "refused").most_common(),
    }
