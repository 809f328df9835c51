"""Benchmark the fused pass: an N-variant sweep built in one pass against one variant.

One command::

    python benchmarks/sweep.py [--size medium] [--methods linear,slerp,ties,dare_ties]
                               [--variants 8] [--repeat 3] [--separate] [--memory warm]
                               [--through engine|make]

Uses the models of ``benchmarks/run.py`` (generated once under ``benchmarks/.work/``). Each
timed run is a fresh process that builds through the engine (``run_builds``) into fresh
directories: one variant, then N variants in one pass (and with ``--separate`` the N variants
one after another, what a sweep cost before the fused pass). Wall time is the child's, torch
import included; peak RSS is the child's own VmHWM (its ``ru_maxrss`` would include the
driver's). The ratios N-variant / one-variant are what README quotes (CPU time, user + system, beside them: on a loaded machine wall
time mostly measures the load); runs alternate (1, N, 1, N, …) so load drifts hit both alike,
and the first pair is a warm-up (page cache, bytecode) left out of the medians. Every timed
run and floor starts from a synced disk (deleted files' discards done) and, by default, the
same warmed memory (``settle_memory``).

``--through make`` times what a user types instead: ``mergebuild make blend`` (in-process
in the child, so its own VmHWM is read), where ``blend`` is the same recipe as a Mergefile
node with a ``sweep:`` of the N points, or a plain node at the first point; the Mergefiles
and their store live in ``.work/sweep-make/<method>/``. The warm-up make hashes the sources;
before each timed make the store's builds are removed (``forget_builds``, untimed), so each
timed make is a first make of the sweep: plan, build, provenance, card and publish.

The I/O floor is measured in the same run, also for 1 and N outputs: read the method's input
weight files once, write the output's bytes 1 or N times and fsync them, with plain file I/O
(``floor``), and the same with the sha256 and xxh128 of every output byte that a build must
record (``floor+hash``, the hashes of the N files on N threads, as the engine's writers do).
``floor N / floor 1`` bounds the ratio a fused pass could reach if merging cost nothing.
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


def mergefile(method: str, count: int, paths: dict[str, Path]) -> Path:
    """A Mergefile holding the benchmark recipe of ``method`` as node ``blend``: a sweep of
    the ``count`` points of ``variant_jobs``, or with ``count`` 1 a plain node at the first
    point. Its store (``cache/`` beside it) is shared by every run of the method."""
    points = [round(0.1 + 0.8 * i / max(1, count - 1), 4) for i in range(count)]
    sources = "".join(f"  {node}: {{source: {json.dumps(str(paths[node]))}}}\n"
                      for node in ("base", "ft1", "ft2", "ft3"))
    if method == "linear":
        recipe = ("    merge_method: linear\n"
                  "    models:\n"
                  f"      - {{model: ft1, parameters: {{weight: {points[0]}}}}}\n"
                  "      - {model: ft2, parameters: {weight: 0.3}}\n"
                  "      - {model: ft3, parameters: {weight: 0.2}}\n"
                  "    parameters: {normalize: true}\n")
        swept = "models.ft1.weight"
    elif method == "slerp":
        recipe = ("    merge_method: slerp\n    base_model: base\n"
                  "    models: [{model: base}, {model: ft1}]\n"
                  f"    parameters: {{t: {points[0]}}}\n")
        swept = "t"
    elif method in ("ties", "dare_ties"):
        recipe = (f"    merge_method: {method}\n    base_model: base\n"
                  "    models:\n"
                  f"      - {{model: ft1, parameters: {{weight: 0.4, density: {points[0]}}}}}\n"
                  "      - {model: ft2, parameters: {weight: 0.3, density: 0.5}}\n"
                  "      - {model: ft3, parameters: {weight: 0.3, density: 0.5}}\n"
                  "    parameters: {normalize: true}\n")
        swept = "models.ft1.density"
    else:
        raise SystemExit(f"no sweep recipe for {method}")
    sweep = f"    sweep:\n      {swept}: {json.dumps(points)}\n" if count > 1 else ""
    directory = WORK / "sweep-make" / method
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"Mergefile{count}"
    path.write_text(f"models:\n{sources}  blend:\n{recipe}    dtype: bfloat16\n{sweep}")
    return path


def child(method: str, count: int, mode: str, size: str, out_root: Path) -> None:
    from run import generate

    if mode == "make":
        from mergebuild.cli import invoke

        path = mergefile(method, count, generate(size))
        code = invoke(["-q", "-f", str(path), "make", "blend"])
        if code:
            raise SystemExit(f"make blend of {path} exited {code}")
        status = Path("/proc/self/status").read_text()
        print(f"PEAK_RSS_KB {status.split('VmHWM:')[1].split()[0]}")
        return

    from mergebuild.build.engine import run_build, run_builds

    jobs = variant_jobs(method, count, generate(size))
    outs = [out_root / f"v{i}" for i in range(count)]
    if mode == "fused":
        run_builds(jobs, outs)
    else:
        for job, out in zip(jobs, outs, strict=True):
            run_build(job, out)
    # The peak of this process's own memory: ru_maxrss would also count the driver's pages
    # (Linux carries the high-water mark of the forked copy across exec).
    status = Path("/proc/self/status").read_text()
    print(f"PEAK_RSS_KB {status.split('VmHWM:')[1].split()[0]}")


def io_floor(inputs: list[Path], out_bytes: int, count: int, hashed: bool) -> float:
    """Read every input weight file once, then write ``out_bytes`` to each of ``count``
    files (each on its own thread, hashed with sha256 and xxh128 when ``hashed``) and fsync
    them: the wall seconds."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    import xxhash
    from run import read_weights

    scratch = WORK / "sweep-floor"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    os.sync()  # see measure
    read = memoryview(bytearray(64 * 2**20))
    block = memoryview(os.urandom(64 * 2**20))

    def write(index: int) -> None:
        sha, xxh = hashlib.sha256(), xxhash.xxh3_128()
        fd = os.open(scratch / f"out{index}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = out_bytes
            while left:
                part = block[: min(left, len(block))]
                left -= os.write(fd, part)
                if hashed:
                    sha.update(part)
                    xxh.update(part)
            os.fsync(fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    read_weights(inputs, read)
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(write, range(count)))
    wall = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    return wall


def method_inputs(method: str, paths: dict[str, Path]) -> list[Path]:
    """The parents the benchmark recipe of ``method`` reads."""
    job = variant_jobs(method, 1, paths)[0]
    nodes = {p.node for p in job.participants} | ({job.base} if job.base else set())
    return [paths[node] for node in sorted(nodes)]


REPORTED = Path("/sys/module/page_reporting/parameters/reported_kib")


def settle_memory(condition: str, nbytes: int) -> None:
    """Put the machine's free memory in the same state before every timed run.

    A VM whose host takes back free guest memory (virtio-balloon free page reporting: this
    project's machine had reported 836 GB by the time it was measured) makes the first
    touch of a page the host took back ~4× slower: writing 577 MB into the page cache took
    0.17 s CPU right after 4.6 GB were freed and 0.69–0.77 s 20 s later. Without settling,
    a run right after the floors (which free 4.6 GB) finds warmer pages than a run after a
    one-variant build. ``warm``: touch and free ``nbytes`` of memory right before the run (a
    machine whose memory stays its own, as on bare metal); ``cold``: wait until the kernel
    has reported the free memory (a VM idle before the make); ``as-is``: neither. Measured
    on 2026-12-01 (linear, medians of 2): warm 3.68 → 10.12 s (2.75×), cold 4.70 → 13.07 s
    (2.78×): the seconds move, the ratio hardly does.
    """
    if condition == "warm":
        buffer = bytearray(nbytes)
        view = memoryview(buffer)
        view[::4096] = b"\x01" * len(range(0, nbytes, 4096))
        del view, buffer
    elif condition == "cold" and REPORTED.exists():
        last, still, deadline = REPORTED.read_text(), 0, time.monotonic() + 120
        while still < 6 and time.monotonic() < deadline:  # unchanged for 3 s
            time.sleep(0.5)
            now = REPORTED.read_text()
            still = still + 1 if now == last else 0
            last = now


def forget_builds(method: str) -> None:
    """Remove the builds of the ``--through make`` store (objects, their records, the
    Mergefiles' refs), keeping its state (the sources' digests): the next make builds and
    publishes every variant, as the first make of a new sweep does, without hashing the
    sources again. Their deletion stays out of the timings (``measure`` syncs after it)."""
    cache = WORK / "sweep-make" / method / "cache"
    for part in ("objects", "published", "refs", "tmp"):
        target = cache / part
        if target.exists():
            for dirpath, dirnames, _ in os.walk(target):  # the store makes objects read-only
                os.chmod(dirpath, 0o755)
            shutil.rmtree(target)


def measure(method: str, count: int, mode: str, size: str, memory: str = "as-is",
            warm_bytes: int = 0) -> tuple[float, int, float]:
    """One timed child: its wall seconds, peak RSS and CPU seconds. ``warm_bytes``: what
    ``settle_memory`` touches first, the same for the one-variant and the N-variant runs
    (N + 1 outputs' worth), so neither finds colder pages than the other."""
    out_root = WORK / "sweep-scratch"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    if mode == "make":
        forget_builds(method)
    # Start from a quiet disk: the files the previous run (or floor) deleted are discarded
    # when the journal commits (this machine mounts its disk with ``discard``; 0.2 s per
    # 577 MB), and without this that work, and any writeback left, landed in the next timed
    # run (until 2026-12-02, mostly in the one-variant runs, which follow the floors).
    os.sync()
    settle_memory(memory, warm_bytes)
    cmd = [sys.executable, __file__, "--child", method, str(count), mode, size, str(out_root)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.decode()[-3000:]}")
    shutil.rmtree(out_root, ignore_errors=True)
    peak_kb = int(out.decode().rsplit("PEAK_RSS_KB ", 1)[1].split()[0])
    return wall, peak_kb * 1024, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium")
    parser.add_argument("--methods", default="linear,slerp,ties,dare_ties")
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--separate", action="store_true",
                        help="also build the variants one after another")
    parser.add_argument("--memory", choices=["as-is", "warm", "cold"], default="warm",
                        help="the free memory's state before each timed run "
                             "(see settle_memory)")
    parser.add_argument("--through", choices=["engine", "make"], default="engine",
                        help="time the engine's pass alone (run_builds), or the command a "
                             "user types: a first `mergebuild make blend` of a Mergefile "
                             "with the sweep (or one plain node), in a store that has "
                             "hashed its sources (the warm-up run)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, count, mode, size, out_root = args.child
        child(method, int(count), mode, size, Path(out_root))
        return
    from run import generate, output_bytes

    paths = generate(args.size)  # once, outside the timings
    out_bytes = output_bytes(paths["base"])  # every recipe writes the base's layout, bf16
    n = args.variants
    rows, results = [], []
    for method in args.methods.split(","):
        through = "make" if args.through == "make" else "fused"
        modes = [("one", 1, through), ("fused", n, through)]
        if args.separate:
            modes.append(("separate", n, "separate"))
        runs: dict[str, list[tuple[float, int, float]]] = {label: [] for label, _, _ in modes}
        floors: dict[str, list[float]] = {"1": [], "N": [], "1+hash": [], "N+hash": []}
        inputs = method_inputs(method, paths)
        loads = []
        for repeat in range(args.repeat + 1):
            timed = {label: measure(method, count, mode, args.size, args.memory,
                                    (n + 1) * out_bytes)
                     for label, count, mode in modes}
            walls = {"1": io_floor(inputs, out_bytes, 1, False),
                     "N": io_floor(inputs, out_bytes, n, False),
                     "1+hash": io_floor(inputs, out_bytes, 1, True),
                     "N+hash": io_floor(inputs, out_bytes, n, True)}
            if repeat == 0:
                continue  # warm-up: page cache, compiled bytecode
            for label, value in timed.items():
                runs[label].append(value)
            for label, value in walls.items():
                floors[label].append(value)
            loads.append(os.getloadavg()[0])
        med = {label: (statistics.median(w for w, _, _ in r), max(m for _, m, _ in r),
                       statistics.median(c for _, _, c in r)) for label, r in runs.items()}
        floor = {label: statistics.median(v) for label, v in floors.items()}
        wall_ratio = med["fused"][0] / med["one"][0]
        rss_ratio = med["fused"][1] / med["one"][1]
        cpu_ratio = med["fused"][2] / med["one"][2]
        result = {"method": method, "variants": n, "size": args.size, "memory": args.memory,
                  "through": args.through,
                  "runs": {k: [list(x) for x in v] for k, v in runs.items()},
                  "floors": floors, "wall_ratio": wall_ratio, "rss_ratio": rss_ratio,
                  "cpu_ratio": cpu_ratio, "loads": loads}
        separate = ""
        if args.separate:
            result["separate_ratio"] = med["separate"][0] / med["one"][0]
            separate = f" | {result['separate_ratio']:.2f}×"
        results.append(result)
        rows.append(
            f"| {method} | {med['one'][0]:.2f} s, {med['one'][1] / 2**20:,.0f} MB | "
            f"{med['fused'][0]:.2f} s, {med['fused'][1] / 2**20:,.0f} MB | "
            f"**{wall_ratio:.2f}×** (≤ {TARGETS.get(method, 3.0)}) | "
            f"**{rss_ratio:.2f}×** (≤ {RSS_TARGET}) | {cpu_ratio:.2f}× | "
            f"{floor['1']:.2f} → {floor['N']:.2f} s ({floor['N'] / floor['1']:.2f}×) | "
            f"{floor['1+hash']:.2f} → {floor['N+hash']:.2f} s "
            f"({floor['N+hash'] / floor['1+hash']:.2f}×) | "
            f"{med['fused'][0] - floor['N+hash']:.1f} s | "
            f"{min(loads):.1f}–{max(loads):.1f}{separate} |")
        print(rows[-1], flush=True)
    header = (f"| method | one variant (wall, peak RSS) | {n} variants, one pass | "
              f"wall ratio | RSS ratio | CPU-time ratio | I/O floor 1 → {n} | "
              f"floor + hashes 1 → {n} | {n} variants − floor + hashes | load"
              f"{' | separate builds' if args.separate else ''} |\n"
              f"|---|---|---|---|---|---|---|---|---|---|{'---|' if args.separate else ''}")
    print("\n" + header + "\n" + "\n".join(rows))
    name = "sweep-results.json" if args.through == "engine" else "sweep-make-results.json"
    (WORK / name).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
