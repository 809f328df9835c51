"""Benchmark the fused pass: an N-variant sweep built in one pass against one variant.

One command::

    python benchmarks/sweep.py [--size medium] [--methods linear,slerp,ties,dare_ties]
                               [--variants 8] [--repeat 3] [--separate]

Uses the models of ``benchmarks/run.py`` (generated once under ``benchmarks/.work/``). Each
timed run is a fresh process that builds through the engine (``run_builds``) into fresh
directories: one variant, then N variants in one pass (and with ``--separate`` the N variants
one after another, what a sweep cost before the fused pass). Wall time is the child's, torch
import included; peak RSS is the child's ``ru_maxrss``. The ratios N-variant / one-variant are
what README quotes (CPU time, user + system, beside them: on a loaded machine wall
time mostly measures the load); runs alternate (1, N, 1, N, …) so load drifts hit both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
sys.path.insert(0, str(HERE))

TARGETS = {"linear": 2.5, "slerp": 2.5, "ties": 3.0, "dare_ties": 3.0}
RSS_TARGET = 2.0


def variant_jobs(method: str, count: int, paths: dict[str, Path]):
    """``count`` variants of the benchmark recipe of ``method``, as a sweep would make them."""
    from mergebuild.build.engine import BuildJob, Participant
    from mergebuild.methods.registry import METHODS

    m = METHODS[method]
    points = [round(0.1 + 0.8 * i / max(1, count - 1), 4) for i in range(count)]
    jobs = []
    for i, x in enumerate(points):
        if method == "linear":
            parts = [("ft1", {"weight": x}), ("ft2", {"weight": 0.3}), ("ft3", {"weight": 0.2})]
            globals_, base = {"normalize": True}, None
        elif method == "slerp":
            parts, globals_, base = [("ft1", {})], {"t": x}, "base"
        elif method in ("ties", "dare_ties"):
            parts = [("ft1", {"weight": 0.4, "density": x}),
                     ("ft2", {"weight": 0.3, "density": 0.5}),
                     ("ft3", {"weight": 0.3, "density": 0.5})]
            defaults = {p.name: p.default for p in m.params
                        if p.scope == "global" and not p.required}
            globals_, base = {**defaults, "normalize": True}, "base"
        else:
            raise SystemExit(f"no sweep recipe for {method}")
        parent_defaults = {p.name: p.default for p in m.params
                           if p.scope == "parent" and not p.required}
        jobs.append(BuildJob(
            node="out", key=f"{method}-{i}", method=m, parents=dict(paths),
            participants=tuple(Participant(n, {**parent_defaults, **p}) for n, p in parts),
            base=base, donor=base or "ft1", global_parameters=globals_,
            out_dtype="bfloat16", device="cpu"))
    return jobs


def child(method: str, count: int, mode: str, size: str, out_root: Path) -> None:
    from run import generate

    from mergebuild.build.engine import run_build, run_builds

    jobs = variant_jobs(method, count, generate(size))
    outs = [out_root / f"v{i}" for i in range(count)]
    if mode == "fused":
        run_builds(jobs, outs)
    else:
        for job, out in zip(jobs, outs, strict=True):
            run_build(job, out)


def measure(method: str, count: int, mode: str, size: str) -> tuple[float, int, float]:
    out_root = WORK / "sweep-scratch"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--child", method, str(count), mode, size, str(out_root)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.decode()[-3000:]}")
    shutil.rmtree(out_root, ignore_errors=True)
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium")
    parser.add_argument("--methods", default="linear,slerp,ties,dare_ties")
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--separate", action="store_true",
                        help="also build the variants one after another")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, count, mode, size, out_root = args.child
        child(method, int(count), mode, size, Path(out_root))
        return
    from run import generate

    generate(args.size)  # once, outside the timings
    rows, results = [], []
    for method in args.methods.split(","):
        modes = [("one", 1, "fused"), ("fused", args.variants, "fused")]
        if args.separate:
            modes.append(("separate", args.variants, "separate"))
        runs: dict[str, list[tuple[float, int, float]]] = {label: [] for label, _, _ in modes}
        for _ in range(args.repeat):
            for label, count, mode in modes:
                runs[label].append(measure(method, count, mode, args.size))
        med = {label: (statistics.median(w for w, _, _ in r), max(m for _, m, _ in r),
                       statistics.median(c for _, _, c in r)) for label, r in runs.items()}
        wall_ratio = med["fused"][0] / med["one"][0]
        rss_ratio = med["fused"][1] / med["one"][1]
        cpu_ratio = med["fused"][2] / med["one"][2]
        result = {"method": method, "variants": args.variants, "size": args.size,
                  "runs": {k: [list(x) for x in v] for k, v in runs.items()},
                  "wall_ratio": wall_ratio, "rss_ratio": rss_ratio, "cpu_ratio": cpu_ratio,
                  "load": os.getloadavg()[0]}
        separate = ""
        if args.separate:
            result["separate_ratio"] = med["separate"][0] / med["one"][0]
            separate = f" | {result['separate_ratio']:.2f}×"
        results.append(result)
        rows.append(
            f"| {method} | {med['one'][0]:.2f} s, {med['one'][1] / 2**20:,.0f} MB | "
            f"{med['fused'][0]:.2f} s, {med['fused'][1] / 2**20:,.0f} MB | "
            f"**{wall_ratio:.2f}×** (≤ {TARGETS.get(method, 3.0)}) | "
            f"**{rss_ratio:.2f}×** (≤ {RSS_TARGET}) | {cpu_ratio:.2f}×{separate} |")
        print(rows[-1], flush=True)
    header = (f"| method | one variant (wall, peak RSS) | {args.variants} variants, one pass | "
              f"wall ratio | RSS ratio | CPU-time ratio"
              f"{' | separate builds' if args.separate else ''} |\n"
              f"|---|---|---|---|---|---|{'---|' if args.separate else ''}")
    print("\n" + header + "\n" + "\n".join(rows))
    (WORK / "sweep-results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
