"""How often a two-rank CPU DDP process aborts at exit (torch 2.14.1, gloo), with and without
the ending of ``evoplug.mm.train`` (see ``finish_distributed``).

    python benchmarks/gloo_exit.py --runs 100            # both endings, 100 torchrun launches each

Each launch: ``torchrun --standalone --nproc_per_node 2`` of a script that builds a DDP
``Linear(64, 64)``, runs 5 backward passes and a barrier, then either destroys the process group
and returns (``plain``: interpreter shutdown follows) or calls ``finish_distributed``. A launch
fails when a rank dies (``terminate called without an active exception``, SIGABRT). Prints the
counts; no timings.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

RANK = '''
import sys, torch, torch.distributed as dist
from evoplug.mm.train import finish_distributed
dist.init_process_group("gloo")
m = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
for _ in range(5):
    m(torch.randn(8, 64)).sum().backward()
dist.barrier()
if sys.argv[1] == "finish":
    finish_distributed()
dist.destroy_process_group()
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100)
    a = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "rank.py")
        with open(script, "w") as f:
            f.write(RANK)
        for ending in ("plain", "finish"):
            failed = aborts = 0
            for _ in range(a.runs):
                r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2", script, ending],
                                   capture_output=True, text=True, env=env, timeout=300)
                failed += r.returncode != 0
                aborts += "terminate called without an active exception" in r.stderr + r.stdout
            print(f"{ending:<7} {failed} of {a.runs} launches failed ({aborts} with std::terminate)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
