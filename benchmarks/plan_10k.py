"""Time `mergebuild plan` of a generated 10,000-node Mergefile (the spec/plan path at scale).

    python benchmarks/plan_10k.py [WORKDIR] [--repeat N]

Prints the wall and CPU seconds (user + sys of the child) of the whole command, a fresh
interpreter with imports included, and the 1-minute load average before each run; then the
CPU seconds of each phase, measured in one more fresh interpreter. Issue 13's target: 2 s
wall for 10,000 nodes on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The phases of `mergebuild plan`, timed in a child interpreter as the command runs them (the
# collector paused while the specs are built where the CLI does so). Uses only entry points
# that older code has too, so that it times that code the same way.
PHASES = r"""
import gc, sys, time
from pathlib import Path
mergefile, store = Path(sys.argv[1]), Path(sys.argv[2])
marks = [("start", time.process_time())]
def mark(name):
    marks.append((name, time.process_time()))
import mergebuild.cli, mergebuild.report, mergebuild.api
from mergebuild.provenance.secrets import scrub_text
mark("imports")
import mergebuild.spec.parse as parse
from mergebuild.plan.lockfile import LockedResolver, SourceLock
from mergebuild.plan.staleness import Planner
from mergebuild.report import plan_rows
from mergebuild.spec.graph import build_graph
from mergebuild.store.objects import Store
pauses = hasattr(mergebuild.cli, "_loading")  # a CLI that pauses the collector while loading
if pauses:
    gc.disable()
text = mergefile.read_text()
document = parse.load_yaml(text, str(mergefile.resolve()))
mark("YAML load")
parse.load_yaml = lambda text, file: document
specs = parse.parse_mergefile(text, mergefile.resolve())
mark("typed specs + validation")
graph = build_graph(specs)
mark("graph")
if pauses:
    gc.enable()
    gc.freeze()
planner = Planner(specs, graph, Store(store), LockedResolver(Store(store), SourceLock(specs)))
states = planner.plan([])
mark("staleness (plan)")
rows = plan_rows(states)
width = max(len(r[0]) for r in rows)
lines = [scrub_text(f"{n:<{width}}  {w:<18} {s}  {y}".rstrip()) for n, w, s, y in rows]
mark("render")
for (_, before), (name, after) in zip(marks, marks[1:]):
    print(f"{name}\t{after - before:.3f}")
"""


def write_mergefile(root: Path, nodes: int = 10_000) -> Path:
    """Two demo sources and ``nodes - 2`` linear merges in a binary tree."""
    from mergebuild.sources.demo import generate_demo_models

    models = root / "models"
    if not models.exists():
        generate_demo_models(models)
    lines = ["version: 1", "models:", f"  base: {{source: {models}/base}}",
             f"  instruct: {{source: {models}/instruct}}"]
    for i in range(nodes - 2):
        parent = "instruct" if i == 0 else f"m{(i - 1) // 2}"
        lines += [f"  m{i}:", "    merge_method: linear", "    models:",
                  "      - {model: base, parameters: {weight: 0.5}}",
                  f"      - model: {parent}", "        parameters:",
                  f"          weight: 0.{i % 9 + 1}"]
    mergefile = root / "Mergefile"
    mergefile.write_text("\n".join(lines) + "\n")
    return mergefile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workdir", nargs="?", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    # Run as installed software does, with compiled bytecode (the warm-up run writes it): a
    # shell that sets PYTHONDONTWRITEBYTECODE would add the compilation of every module.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    root = args.workdir or Path(tempfile.mkdtemp())
    root.mkdir(parents=True, exist_ok=True)
    mergefile = write_mergefile(root)
    store = root / "store"
    argv = [sys.executable, "-m", "mergebuild.cli", "-f", str(mergefile), "--cache-dir",
            str(store), "plan"]
    subprocess.run(argv, check=True, capture_output=True, cwd=REPO)  # warm: bytecode, stats
    for _ in range(args.repeat):
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=REPO)
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(f"plan of 10,000 nodes: {wall:.2f} s wall, {cpu:.2f} s CPU (load {load:.2f})")
    phases = subprocess.run([sys.executable, "-c", PHASES, str(mergefile), str(store)],
                            check=True, capture_output=True, text=True, cwd=REPO).stdout
    print("phases, CPU s (one run):")
    for line in phases.splitlines():
        name, seconds = line.split("\t")
        print(f"  {name}: {seconds}")


if __name__ == "__main__":
    main()
