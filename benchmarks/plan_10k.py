"""Time `mergebuild plan` of a generated 10,000-node Mergefile (the spec/plan path at scale).

    python benchmarks/plan_10k.py [WORKDIR]

Prints the wall and CPU seconds of the whole command (a fresh interpreter, imports
included) and of loading the YAML alone. Issue 13's target: 2 s for 10,000 nodes.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    root.mkdir(parents=True, exist_ok=True)
    mergefile = write_mergefile(root)
    from mergebuild.spec.yaml_lines import load_yaml

    started = time.process_time()
    load_yaml(mergefile.read_text(), str(mergefile))
    print(f"load_yaml: {time.process_time() - started:.2f} s CPU")
    argv = [sys.executable, "-m", "mergebuild.cli", "-f", str(mergefile), "--cache-dir",
            str(root / "store"), "plan"]
    subprocess.run(argv, check=True, capture_output=True)  # warm: demo models, stat cache
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(f"plan of 10,000 nodes: {wall:.2f} s wall, {cpu:.2f} s CPU")


if __name__ == "__main__":
    main()
