"""Benchmark mergebuild against mergekit and the I/O floor, on generated Llama-layout models.

One command::

    python benchmarks/run.py [--sizes tiny,small,medium] [--methods linear,slerp,ties,...]
                             [--repeat 3] [--mergekit-sizes medium] [--extras]

Models are generated deterministically (``mergebuild.sources.demo.generate_model``) under
``benchmarks/.work/models/<size>/`` and kept between runs. Every timed run is a fresh
process with a fresh store (so mergebuild also hashes its sources: nothing is cached).
Peak RSS is the child's ``ru_maxrss`` from ``wait4`` — the number ``/usr/bin/time -v``
prints. The I/O floor is measured in the same run: read every input file of the merge once
(into a reused buffer, from page cache, as both tools do) and write the output's byte count
once with fsync. Results are printed as a Markdown table and saved as JSON in .work/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"

# Llama-layout shapes. small and medium share every tensor shape (the largest tensors are
# the 32000×1024 embeddings and lm_head) and differ only in layer count, which is what the
# memory-scaling claim needs: peak RSS must not grow from small to medium.
SIZES: dict[str, dict] = {
    "tiny": {"hidden_size": 256, "num_layers": 4, "vocab_size": 1024, "intermediate_size": 688,
                 "num_heads": 8, "num_kv_heads": 4},
    "small": {"hidden_size": 1024, "num_layers": 5, "vocab_size": 32000, "intermediate_size": 2816,
                  "num_heads": 16, "num_kv_heads": 4},
    "medium": {"hidden_size": 1024, "num_layers": 21, "vocab_size": 32000, "intermediate_size": 2816,
                   "num_heads": 16, "num_kv_heads": 4},
}
METHODS = ("linear", "slerp", "ties", "dare_ties", "passthrough")
FINETUNES = {"ft1": {"seed": 1, "density": 1.0, "scale": 0.004, "focus_layers": (2, 3)},
             "ft2": {"seed": 2, "density": 0.5, "scale": 0.005, "focus_layers": (1,)},
             "ft3": {"seed": 3, "density": 0.3, "scale": 0.008, "focus_layers": (0, 4)}}


# --------------------------------------------------------------------------- models/configs


def generate(size: str) -> dict[str, Path]:
    from mergebuild.sources.demo import Delta, generate_model

    root = WORK / "models" / size
    paths = {"base": generate_model(root / "base", 0, **SIZES[size])}
    for name, delta in FINETUNES.items():
        paths[name] = generate_model(root / name, 0, deltas=[Delta(**delta)], **SIZES[size])
    return paths


def merge_body(method: str, layers: int) -> tuple[dict, list[str]]:
    """The merge (mergekit's config keys, model names unresolved) and the models it reads."""
    if method == "linear":
        return {"merge_method": "linear", "models": [
            {"model": "ft1", "parameters": {"weight": 0.5}},
            {"model": "ft2", "parameters": {"weight": 0.3}},
            {"model": "ft3", "parameters": {"weight": 0.2}}]}, ["ft1", "ft2", "ft3"]
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": "base",
                "models": [{"model": "base"}, {"model": "ft1"}],
                "parameters": {"t": 0.4}}, ["base", "ft1"]
    if method in ("ties", "dare_ties"):
        return {"merge_method": method, "base_model": "base", "models": [
            {"model": "ft1", "parameters": {"weight": 0.4, "density": 0.5}},
            {"model": "ft2", "parameters": {"weight": 0.3, "density": 0.5}},
            {"model": "ft3", "parameters": {"weight": 0.3, "density": 0.5}}],
            "parameters": {"normalize": True}}, ["base", "ft1", "ft2", "ft3"]
    if method == "passthrough":
        half = layers // 2
        return {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "ft1", "layer_range": [0, layers]}]},
            {"sources": [{"model": "ft2", "layer_range": [half, layers]}]}]}, ["ft1", "ft2"]
    raise SystemExit(f"unknown method {method}")


def _resolve_models(obj, paths: dict[str, Path]):
    if isinstance(obj, dict):
        return {k: (str(paths[v]) if k in ("model", "base_model") else _resolve_models(v, paths))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_models(v, paths) for v in obj]
    return obj


def write_configs(size: str, method: str, paths: dict[str, Path]) -> tuple[Path, Path, list[Path]]:
    import yaml

    body, reads = merge_body(method, SIZES[size]["num_layers"])
    directory = WORK / "configs" / size / method
    directory.mkdir(parents=True, exist_ok=True)
    mergekit = directory / "mergekit.yml"
    mergekit.write_text(yaml.safe_dump({**_resolve_models(body, paths), "dtype": "bfloat16"},
                                       sort_keys=False))
    mergefile = directory / "Mergefile"
    models = {name: {"source": str(path)} for name, path in paths.items()}
    mergefile.write_text(yaml.safe_dump({"version": 1, "defaults": {"dtype": "bfloat16"},
                                         "models": {**models, "out": body}}, sort_keys=False))
    return mergefile, mergekit, [paths[n] for n in reads]


# --------------------------------------------------------------------------- measuring


def loadavg() -> float:
    return os.getloadavg()[0]


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process; raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out.decode()[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".safetensors")


def read_weights(inputs: list[Path], view: memoryview) -> None:
    """Read every weight file of the model directories ``inputs`` once, through ``view``."""
    for directory in inputs:
        for path in weight_files(directory):
            with open(path, "rb", buffering=0) as f:
                while f.readinto(view):
                    pass


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    """Read every input weight file once + write ``out_bytes`` once with fsync."""
    buf = bytearray(64 * 2**20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    read_weights(inputs, view)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = out_bytes
        while left:
            left -= os.write(fd, view[: min(left, len(buf))])
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    scratch.unlink()
    return wall


def output_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(directory))


def mergebuild_cmd(mergefile: Path, store: Path, target: str = "out") -> list[str]:
    return [sys.executable, "-m", "mergebuild.cli", "-f", str(mergefile), "--cache-dir",
            str(store), "-q", "make", target]


def mergekit_cmd(config: Path, out: Path) -> list[str] | None:
    # The interpreter's own bin/ first: a pyenv shim would add its start-up to every run.
    local = Path(sys.executable).parent / "mergekit-yaml"
    exe = str(local) if local.exists() else shutil.which("mergekit-yaml")
    if exe is None:
        return None
    return [exe, str(config), str(out), "--no-cuda", "--quiet"]


def built_dir(store: Path) -> Path:
    objects = [p for p in (store / "objects").glob("*/*") if p.is_dir()]
    assert len(objects) == 1, objects
    return objects[0]


def summarize(walls: list[float]) -> dict:
    return {"median": statistics.median(walls), "min": min(walls), "max": max(walls),
            "runs": walls}


def bench_merge(size: str, method: str, paths: dict[str, Path], repeat: int,
                with_mergekit: bool) -> dict:
    mergefile, mk_config, inputs = write_configs(size, method, paths)
    scratch = WORK / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    res: dict = {"size": size, "method": method, "mergebuild": [], "mergekit": [], "floor": [],
                 "rss_mergebuild": [], "rss_mergekit": [], "load": []}
    out_size = None
    mk = mergekit_cmd(mk_config, scratch / "mk-out") if with_mergekit else None
    for rep in range(repeat):
        store = scratch / f"store{rep}"
        res["load"].append(loadavg())
        wall, rss = run_measured(mergebuild_cmd(mergefile, store))
        out_size = output_bytes(built_dir(store))
        res["mergebuild"].append(wall)
        res["rss_mergebuild"].append(rss)
        shutil.rmtree(store, ignore_errors=True)
        res["floor"].append(io_floor(inputs, out_size, scratch / "floor.bin"))
        if mk:
            shutil.rmtree(scratch / "mk-out", ignore_errors=True)
            wall, rss = run_measured(mk)
            res["mergekit"].append(wall)
            res["rss_mergekit"].append(rss)
            shutil.rmtree(scratch / "mk-out", ignore_errors=True)
        print(f"  {size}/{method} run {rep + 1}: mergebuild {res['mergebuild'][-1]:.2f} s, "
              f"floor {res['floor'][-1]:.2f} s"
              + (f", mergekit {res['mergekit'][-1]:.2f} s" if mk else "")
              + f" (load {res['load'][-1]:.2f})", flush=True)
    res["output_bytes"] = out_size
    return res


# --------------------------------------------------------------------------- extras


def probe(args: list[str], report: Path) -> tuple[float, dict]:
    cmd = [sys.executable, str(HERE / "probe.py"), str(report), "--", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, json.loads(report.read_text())


def bench_extras(repeat: int, chain_size: str) -> dict:
    import yaml

    out: dict = {}
    scratch = WORK / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    # One-merge make on tiny models, process start included (fresh store each time).
    tiny = generate("tiny")
    mergefile, _, _ = write_configs("tiny", "ties", tiny)
    walls = []
    for rep in range(repeat):
        store = scratch / f"tiny-store{rep}"
        walls.append(run_measured(mergebuild_cmd(mergefile, store))[0])
        shutil.rmtree(store, ignore_errors=True)
    out["tiny_make"] = summarize(walls)

    # Start-up of commands that must not import torch.
    starts = {}
    for name, args in {"--help": ["--help"], "plan": ["-f", str(mergefile), "--cache-dir",
                                                       str(scratch / "plan-store"), "plan"],
                       "graph": ["-f", str(mergefile), "graph"]}.items():
        walls, report = [], {}
        for _ in range(repeat):
            wall, report = probe(args, scratch / "probe.json")
            walls.append(wall)
        starts[name] = {**summarize(walls), "torch_imported": report["torch_imported"]}
    out["start"] = starts

    # No-op make of a 5-merge chain over the chain_size models.
    paths = generate(chain_size)
    models = {n: {"source": str(p)} for n, p in paths.items()}
    models["m1"] = {"merge_method": "linear", "models": [
        {"model": "ft1", "parameters": {"weight": 0.5}},
        {"model": "ft2", "parameters": {"weight": 0.5}}]}
    models["m2"] = {"merge_method": "slerp", "base_model": "m1",
                    "models": [{"model": "m1"}, {"model": "ft3"}], "parameters": {"t": 0.3}}
    models["m3"] = {"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "m2", "parameters": {"weight": 1.0}}]}
    models["m4"] = {"merge_method": "linear", "models": [
        {"model": "m3", "parameters": {"weight": 0.7}},
        {"model": "ft1", "parameters": {"weight": 0.3}}]}
    models["m5"] = {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "m4", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "ft2", "parameters": {"weight": 0.4, "density": 0.5}}]}
    chain = WORK / "configs" / chain_size / "chain" / "Mergefile"
    chain.parent.mkdir(parents=True, exist_ok=True)
    chain.write_text(yaml.safe_dump({"version": 1, "defaults": {"dtype": "bfloat16"},
                                     "models": models}, sort_keys=False))
    store = scratch / "chain-store"
    shutil.rmtree(store, ignore_errors=True)
    first, _ = run_measured(mergebuild_cmd(chain, store, "m5"))
    walls, report = [], {}
    for _ in range(repeat):
        wall, report = probe(["-f", str(chain), "--cache-dir", str(store), "-q", "make", "m5"],
                             scratch / "probe.json")
        walls.append(wall)
    out["noop_chain"] = {**summarize(walls), "first_build": first, "nodes": 5,
                         "weight_opens": len(report["weight_opens"]), "rchar": report["rchar"],
                         "torch_imported": report["torch_imported"]}
    shutil.rmtree(store, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- report


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def _wall(s: dict) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (f"{cpu}, {os.cpu_count()} cores, {mem / 2**30:.0f} GB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
            f", {torch.get_num_threads()} torch threads")


def report(results: list[dict], extras: dict | None) -> str:
    lines = [("| method | size | mergebuild wall s, median (min–max) | peak RSS | "
             "mergekit wall s | mergekit RSS | × mergekit (wall) | × mergekit (RSS) | "
             "I/O floor s | × floor | load |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mb = summarize(r["mergebuild"])
        floor = summarize(r["floor"])
        rss = max(r["rss_mergebuild"])
        mk = summarize(r["mergekit"]) if r["mergekit"] else None
        mk_rss = max(r["rss_mergekit"]) if r["rss_mergekit"] else None
        lines.append(
            f"| {r['method']} | {r['size']} ({_mb(r['output_bytes'])} out) | {_wall(mb)} | "
            f"{_mb(rss)} | {_wall(mk) if mk else '—'} | {_mb(mk_rss) if mk_rss else '—'} | "
            f"{mb['median'] / mk['median']:.2f}× | " if mk else
            f"| {r['method']} | {r['size']} ({_mb(r['output_bytes'])} out) | {_wall(mb)} | "
            f"{_mb(rss)} | — | — | — | "
        )
        if mk:
            lines[-1] += f"{rss / mk_rss:.2f}× | "
        else:
            lines[-1] += "— | "
        lines[-1] += (f"{floor['median']:.2f} | {mb['median'] / floor['median']:.1f}× | "
                      f"{statistics.mean(r['load']):.1f} |")
    if extras:
        t = extras["tiny_make"]
        lines += ["", "| other | wall s, median (min–max) | note |", "|---|---|---|",
                  (f"| one-merge make, tiny models (TIES, process start included) | {_wall(t)} "
                  "| fresh store |")]
        for name, s in extras["start"].items():
            lines.append(f"| `mergebuild {name}` | {_wall(s)} | torch imported: "
                         f"{'yes' if s['torch_imported'] else 'no'} |")
        n = extras["noop_chain"]
        lines.append(f"| no-op make, {n['nodes']}-merge chain over medium models | {_wall(n)} | "
                     f"weight files opened: {n['weight_opens']}, bytes read: "
                     f"{n['rchar'] / 2**10:,.0f} KiB, torch imported: "
                     f"{'yes' if n['torch_imported'] else 'no'} (first build "
                     f"{n['first_build']:.1f} s) |")
    return "\n".join(lines)


def main() -> None:
    # Both tools run as installed software does: with compiled bytecode. A shell that sets
    # PYTHONDONTWRITEBYTECODE (some containers do) would make every mergebuild process
    # recompile its own modules (~0.08 s) while mergekit's were compiled by pip at install.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mergekit-sizes", default="medium",
                    help="sizes on which mergekit also runs ('' for none)")
    ap.add_argument("--extras", action="store_true",
                    help="also: tiny one-merge make, start-up times, no-op chain make")
    ap.add_argument("--no-merges", action="store_true", help="only the extras")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    mk_sizes = {s for s in args.mergekit_sizes.split(",") if s}
    if shutil.which("mergekit-yaml") is None:
        print("mergekit-yaml not found: mergekit columns stay empty")
    results = []
    if not args.no_merges:
        for size in sizes:
            t0 = time.perf_counter()
            paths = generate(size)
            print(f"{size}: models ready in {time.perf_counter() - t0:.1f} s", flush=True)
            for method in args.methods.split(","):
                results.append(bench_merge(size, method, paths, args.repeat, size in mk_sizes))
    extras = bench_extras(args.repeat, "medium") if args.extras or args.no_merges else None
    text = report(results, extras)
    header = f"Machine: {machine()}"
    print()
    print(header)
    print()
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (WORK / f"results-{stamp}.json").write_text(json.dumps(
        {"machine": header, "results": results, "extras": extras}, indent=2))
    (WORK / "latest.md").write_text(header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
