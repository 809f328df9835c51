"""make -j 2 against a serial make, and the executors' memory estimate against real builds.

    python benchmarks/executors.py [--size small] [--repeat 2]

1. Peak memory: each merge of benchmarks/run.py (and a fused 4-variant TIES sweep) rebuilt
   (``make -B``, the sources already hashed, so only the build is measured) by a fresh
   ``mergebuild make`` process; its peak RSS (``ru_maxrss``) against
   ``estimate_peak_bytes`` of the same parents' headers. The estimate must stay above the
   measurement (it decides how many builds run at once) without being far above it.
2. Wall: four independent merges over the same models, serial and ``-j 2``, each in a fresh
   process and store, alternating; the ratio of medians (the machine is shared: compare the
   ratio, not the seconds).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import run

from mergebuild.build.compat import directory_metadata
from mergebuild.build.resources import estimate_peak_bytes

MIB = 2**20
INDEPENDENT = {  # four merges that share no node: -j 2 may build any two at once
    "lin-12": {"merge_method": "linear", "models": [
        {"model": "ft1", "parameters": {"weight": 0.5}},
        {"model": "ft2", "parameters": {"weight": 0.5}}]},
    "lin-23": {"merge_method": "linear", "models": [
        {"model": "ft2", "parameters": {"weight": 0.5}},
        {"model": "ft3", "parameters": {"weight": 0.5}}]},
    "slerp-b1": {"merge_method": "slerp", "base_model": "base",
                 "models": [{"model": "base"}, {"model": "ft1"}], "parameters": {"t": 0.4}},
    "slerp-b3": {"merge_method": "slerp", "base_model": "base",
                 "models": [{"model": "base"}, {"model": "ft3"}], "parameters": {"t": 0.6}},
}


def _mergefile(directory: Path, paths: dict[str, Path], merges: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    models = {name: {"source": str(path)} for name, path in paths.items()}
    mergefile = directory / "Mergefile"
    mergefile.write_text(yaml.safe_dump({"version": 1, "defaults": {"dtype": "bfloat16"},
                                         "models": {**models, **merges}}, sort_keys=False))
    return mergefile


def memory(size: str, paths: dict[str, Path]) -> list[tuple[str, int, int]]:
    scratch = run.WORK / "executors"
    rows = []
    cases = [(m, *run.merge_body(m, run.SIZES[size]["num_layers"]), 1)
             for m in ("linear", "slerp", "ties")]
    ties, reads = run.merge_body("ties", run.SIZES[size]["num_layers"])
    sweep = {**ties, "sweep": {"models.ft1.density": [0.3, 0.7], "lambda": [0.8, 1.0]}}
    cases.append(("ties sweep, 4 variants fused", sweep, reads, 4))
    for label, body, reads, variants in cases:
        mergefile = _mergefile(scratch / "memory", paths, {"out": body})
        store = scratch / "memory-store"
        shutil.rmtree(store, ignore_errors=True)
        make = [sys.executable, "-m", "mergebuild.cli", "-f", str(mergefile), "--cache-dir",
                str(store), "-q", "make"]
        # The first make hashes the sources (planning); the measured one only builds.
        run.run_measured([*make, "out"])
        _, rss = run.run_measured([*make, "-B", "out"])
        shutil.rmtree(store, ignore_errors=True)
        headers = {r: directory_metadata(paths[r]).tensors for r in reads}
        rows.append((label, rss, estimate_peak_bytes(headers, variants)))
        print(f"  {label}: peak {rss / MIB:.0f} MiB, estimate {rows[-1][2] / MIB:.0f} MiB",
              flush=True)
    return rows


def wall(paths: dict[str, Path], repeat: int) -> tuple[list[float], list[float]]:
    scratch = run.WORK / "executors"
    mergefile = _mergefile(scratch / "wall", paths, INDEPENDENT)
    serial: list[float] = []
    parallel: list[float] = []
    for rep in range(repeat):
        for jobs, walls in ((1, serial), (2, parallel)):
            store = scratch / "wall-store"
            shutil.rmtree(store, ignore_errors=True)
            seconds, _ = run.run_measured([sys.executable, "-m", "mergebuild.cli", "-f",
                                           str(mergefile), "--cache-dir", str(store), "-q",
                                           "make", "-j", str(jobs), *INDEPENDENT])
            walls.append(seconds)
            print(f"  run {rep + 1}, -j {jobs}: {seconds:.2f} s (load {run.loadavg():.2f})",
                  flush=True)
        shutil.rmtree(scratch / "wall-store", ignore_errors=True)
    return serial, parallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="small")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-wall", action="store_true", help="measure memory only")
    args = parser.parse_args()
    paths = run.generate(args.size)
    print(f"machine: {run.machine()}")
    print("peak memory against the estimate:")
    rows = memory(args.size, paths)
    print()
    print("| build | peak RSS | estimate | peak / estimate |")
    print("|---|---|---|---|")
    for label, rss, estimate in rows:
        print(f"| {label} | {rss / MIB:,.0f} MiB | {estimate / MIB:,.0f} MiB | "
              f"{rss / estimate:.2f} |")
    if args.no_wall:
        return
    print(f"four independent merges, {args.size} models, serial and -j 2:", flush=True)
    serial, parallel = wall(paths, args.repeat)
    s, p = statistics.median(serial), statistics.median(parallel)
    print()
    print(f"| four independent merges ({args.size}) | wall s, median of {args.repeat} | ")
    print("|---|---|")
    print(f"| serial | {s:.2f} |")
    print(f"| -j 2 | {p:.2f} |")
    print(f"| -j 2 / serial | {p / s:.2f} |")


if __name__ == "__main__":
    main()
