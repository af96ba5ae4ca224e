"""The files of the GPU benchmark suite (benchmarks/gpu_suite.py): one JSON and one Markdown file
per part, ``env.json``/``env.md``, and ``summary.md`` (ratios next to the targets of issue 12),
rewritten after every unit; optionally a bundle (``gpu_results.tar.gz`` and ``summary.md``) for
a machine that hands back only a few files."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tarfile
from typing import Callable, Dict, List, Optional

from evoplug.tools import bench


@dataclasses.dataclass(frozen=True)
class Target:
    """A target of issue 12: converted / original images per second in [low, high]."""
    text: str
    low: float
    high: Optional[float]
    applies: Callable[[dict], bool]

    def met(self, ratio: float) -> bool:
        return ratio >= self.low and (self.high is None or ratio <= self.high)

    @property
    def bound(self) -> str:
        return f"{self.low:.2f}x-{self.high:.2f}x" if self.high else f">= {self.low:.2f}x"


def _is(model: str, **kw) -> Callable[[dict], bool]:
    return lambda f: f["model"] == model and all(f[k] == v for k, v in kw.items())


TARGETS = [
    Target("DeiT-S fp16 batch 256 keep 0.5, torch.compile", 1.45, None,
           lambda f: _is("deit_small_patch16_224", dtype="float16", batch=256, keep=0.5)(f)
           and f["mode"].startswith("compile")),
    Target("DeiT-S fp16 batch 256 keep 0.5, eager", 1.30, None,
           _is("deit_small_patch16_224", dtype="float16", batch=256, keep=0.5, mode="eager")),
    Target("DeiT-B keep 0.5", 1.45, None, _is("deit_base_patch16_224", keep=0.5)),
    Target("float32 keep 0.5", 1.50, None, lambda f: f["dtype"] == "float32" and f["keep"] == 0.5),
    Target("ViT-L/16 at 384 keep 0.5", 1.60, None, _is("vit_large_patch16_384", keep=0.5)),
    Target("keep 1.0 within 2% of the original", 0.98, 1.02, lambda f: f["keep"] == 1.0),
]


def figures(parts: Dict[str, dict]) -> List[dict]:
    """One inference figure per row: compiled rows give the compiled ratio, with the eager
    ratio of the same run beside it."""
    out = []
    for name, part in parts.items():
        for r in part["rows"]:
            if r["mode"].startswith("train"):
                continue
            c = "compiled_speedup" in r
            out.append(dict(part=name, model=r["model"], batch=r["batch"], dtype=r["dtype"],
                            mode=r["mode"], keep=r["keep_ratio"], flop_ratio=r["flop_ratio"],
                            orig=r["orig_compiled_img_s" if c else "orig_img_s"],
                            evo=r["evo_compiled_img_s" if c else "evo_img_s"],
                            ratio=r["compiled_speedup" if c else "speedup"],
                            eager_same_run=r["speedup"] if c else None))
    return out


def _setting(f: dict) -> str:
    return f"{f['model']} {f['dtype']} b{f['batch']} keep {f['keep']:g}, {f['mode']}"


def targets_table(figs: List[dict]) -> List[str]:
    lines = ["| target | bound | setting | orig -> converted img/s | ratio | FLOP ratio | met |",
             "|---|---|---|---|---|---|---|"]
    for t in TARGETS:
        hits = [f for f in figs if t.applies(f)]
        if not hits:
            lines.append(f"| {t.text} | {t.bound} | not measured in this run | - | - | - | open |")
        for f in hits:
            lines.append(f"| {t.text} | {t.bound} | {_setting(f)} | {f['orig']:.1f} -> "
                         f"{f['evo']:.1f} | **{f['ratio']:.3f}x** | {f['flop_ratio']:.2f}x | "
                         f"{'yes' if t.met(f['ratio']) else 'no'} |")
    return lines


def figures_table(figs: List[dict]) -> List[str]:
    lines = ["| part | model | dtype | batch | mode | keep | orig img/s | converted img/s | ratio "
             "| eager ratio, same run | FLOP ratio | target | met |", "|---" * 13 + "|"]
    for f in figs:
        ts = [t for t in TARGETS if t.applies(f)]
        strict = max(ts, key=lambda t: t.low) if ts else None
        lines.append(
            f"| {f['part']} | {f['model']} | {f['dtype']} | {f['batch']} | {f['mode']} | "
            f"{f['keep']:g} | {f['orig']:.1f} | {f['evo']:.1f} | **{f['ratio']:.3f}x** | "
            f"{'-' if f['eager_same_run'] is None else format(f['eager_same_run'], '.3f') + 'x'} | "
            f"{f['flop_ratio']:.2f}x | {strict.bound if strict else '-'} | "
            f"{('yes' if all(t.met(f['ratio']) for t in ts) else 'no') if ts else '-'} |")
    return lines


class Report:
    """Collects the units' results by part and writes the files."""

    def __init__(self, out: pathlib.Path, bundle: Optional[str] = None):
        self.out = out
        self.bundle = pathlib.Path(bundle) if bundle else None
        self.out.mkdir(parents=True, exist_ok=True)
        self.parts: Dict[str, dict] = {}
        self.notes: List[str] = []
        self.env: dict = {}

    def add(self, unit, result: dict):
        part = self.parts.setdefault(unit.part, dict(units=[], rows=[], profiles={}))
        rec = dict(unit=unit.name, model=unit.model, kind=unit.kind, mode=unit.mode,
                   dtype=unit.dtype, batch=unit.batch, keeps=list(unit.keeps),
                   repeats=unit.repeats, warmup=unit.warmup)
        rec.update({k: v for k, v in result.items() if k not in ("rows", "profiles")})
        part["units"].append(rec)
        part["rows"] += [dict(r, mode=unit.mode, part=unit.part) for r in result.get("rows", [])]
        if "profiles" in result:
            part["profiles"][unit.model] = dict(dtype=unit.dtype, batch=unit.batch,
                                                keeps=list(unit.keeps), **result["profiles"])

    # ---- files ------------------------------------------------------------------------------

    def write_environment(self, env: dict, markdown: str):
        self.env = env
        (self.out / "env.json").write_text(json.dumps(env, indent=1, default=str))
        (self.out / "env.md").write_text(markdown)

    def write(self, env: dict, elapsed: float):
        for name, part in self.parts.items():
            settings = env.get("train_settings" if name.startswith("train") else "bench_settings")
            data = dict(machine=env.get("machine"), settings=settings, **part)
            (self.out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
            (self.out / f"{name}.md").write_text(self._part_md(name, part))
        (self.out / "summary.md").write_text(self._summary(elapsed))
        self._bundle()

    def fail(self, message: str):
        self.notes.append(f"**Failed:** {message}")
        (self.out / "summary.md").write_text(self._summary(0.0))
        self._bundle()

    def stopped(self, unit, elapsed: float):
        self.notes.append(f"**Stopped from outside** (gpu.sh's hard limit) after {elapsed:.0f} s, "
                          f"during {unit.name if unit else 'the start'}: that unit has no figures.")
        self.write(self.env, elapsed)

    def _bundle(self):
        if not self.bundle:
            return
        self.bundle.mkdir(parents=True, exist_ok=True)
        tmp = self.bundle / "gpu_results.tar.gz.part"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.out, arcname=self.out.name)
        tmp.replace(self.bundle / "gpu_results.tar.gz")
        if (self.out / "summary.md").exists():
            shutil.copyfile(self.out / "summary.md", self.bundle / "summary.md")

    # ---- Markdown ---------------------------------------------------------------------------

    def _part_md(self, name: str, part: dict) -> str:
        lines = [f"# {name}", "", f"machine: {self.env.get('machine')}", "",
                 "settings: " + str(self.env.get("train_settings" if name.startswith("train")
                                                 else "bench_settings")), ""]
        if part["rows"]:
            lines += [bench.format_markdown(part["rows"]), ""]
        for model, prof in part["profiles"].items():
            top = {k: v for k, v in prof.items() if isinstance(v, dict)}
            lines += [f"## {model}, {prof['dtype']}, batch {prof['batch']}: one forward, "
                      "torch.profiler", "", bench.format_profile(top), ""]
        lines += ["## Units", ""] + [self._unit_line(u) for u in part["units"]]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _unit_line(u: dict) -> str:
        text = f"* {u['unit']} ({u['mode']}, {u['dtype']}, batch {u['batch']}): {u['status']}"
        if "seconds" in u:
            text += f" in {u['seconds']} s (estimate {u['est_s']} s)"
        return text + (f": {u['reason']}" if u.get("reason") else "")

    def _summary(self, elapsed: float) -> str:
        env = self.env
        figs = figures(self.parts)
        lines = ["# GPU benchmark: original vs evoplug-converted (converted / original img/s)", ""]
        if env.get("dry"):
            lines += ["**DRY RUN on the CPU, tiny settings: the figures mean nothing.**", ""]
        lines += [f"* machine: {env.get('machine')}",
                  f"* torch {env.get('torch')}, CUDA {env.get('cuda')}, timm {env.get('timm')}, "
                  f"evoplug {env.get('evoplug')}; code: git {env.get('git')}, evoplug tree sha256 "
                  f"{str(env.get('evoplug_tree_sha256'))[:16]}",
                  f"* started {env.get('started_utc')} UTC; {elapsed:.0f} s of a "
                  f"{env.get('budget_s')} s budget; settings, versions and the plan: env.md / "
                  "env.json", ""]
        lines += self.notes + ([""] if self.notes else [])
        lines += ["## Targets of issue 12", ""] + targets_table(figs)
        lines += ["", "## All inference figures", ""] + figures_table(figs)
        lines += self._train_and_profile()
        lines += ["", "## Units", ""]
        lines += [self._unit_line(u) for p in self.parts.values() for u in p["units"]]
        return "\n".join(lines) + "\n"

    def _train_and_profile(self) -> List[str]:
        lines = []
        rows = [r for p in self.parts.values() for r in p["rows"] if r["mode"].startswith("train")]
        if rows:
            lines += ["", "## Training step (no target in the issue)", "", bench.format_markdown(rows)]
        for name, part in self.parts.items():
            for model, prof in part["profiles"].items():
                unit = next((p["unit"] for p in prof.values() if isinstance(p, dict)), "kernel")
                lines += ["", f"## Profile: {model} {prof['dtype']} batch {prof['batch']} "
                          f"(top {unit}s: {name}.md)", "",
                          f"| model | wall ms / forward | host ms (call returns) | {unit} ms (sum) "
                          f"| {unit}s run |", "|---|---|---|---|---|"]
                lines += [f"| {v} | {p['wall_ms']:.2f} | {p['host_ms']:.2f} | {p['total_ms']:.2f} "
                          f"| {p['launches']} |" for v, p in prof.items() if isinstance(p, dict)]
        return lines
