"""make --executor ray on a real Ray cluster on this machine (a head and two worker nodes,
started by the fixture with ``ray start``): a 6-variant sweep built through Ray is byte for
byte the local build, and a worker killed mid-build leaves nothing half-published while its
task is retried to completion."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_process import run_python_m
from conftest import TIES_SWEEP

from mergebuild.provenance.integrity import verify_directory
from mergebuild.store.objects import Store

SWEEP = """\
version: 1
defaults: {{dtype: bfloat16}}
models:
  base: {{source: {models}/base}}
  code: {{source: {models}/code}}
  math: {{source: {models}/math}}
""" + TIES_SWEEP
STARTED = "Ray runtime started"
MEMORY = str(80 * 2**20)  # each node's object store: small, nothing large travels through it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group: everything it starts (GCS,
    raylet, workers) is in that group, and killing the group ends exactly this node."""
    ray = Path(sys.executable).with_name("ray")
    command = [str(ray)] if ray.exists() else [shutil.which("ray") or "ray"]
    return subprocess.Popen(
        [*command, "start", *args, "--node-ip-address=127.0.0.1", "--disable-usage-stats",
         f"--object-store-memory={MEMORY}", "--block"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_started(nodes: list[tuple[subprocess.Popen, Path]], deadline: float) -> None:
    for process, log in nodes:
        while STARTED not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ray start did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """(the head's address, the hold file): a worker whose build finds the hold file takes
    it and blocks until killed (MERGEBUILD_FAULT hold=, armed on the worker nodes)."""
    root = Path(tempfile.mkdtemp(prefix="mbray", dir="/tmp"))  # short: Ray's socket paths
    hold = root / "hold"
    # A loaded machine (the full suite, beside other work) can take more than Ray's default
    # 30 s to register a raylet: wait longer rather than fail.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_raylet_start_wait_time_s": "240",
           "MERGEBUILD_FAULT": f"engine.read_tensor:1:hold={hold}"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[tuple[subprocess.Popen, Path]] = []
    try:
        # The head runs no tasks (0 CPUs): every build is on a worker node.
        head_log = root / "head.log"
        nodes.append((_ray_start(["--head", f"--port={port}", "--num-cpus=0",
                                  "--include-dashboard=false", f"--temp-dir={root / 'ray'}"],
                                 head_log, env), head_log))
        deadline = time.monotonic() + 300
        _wait_started(nodes, deadline)
        for n in range(2):  # one after the other: two raylets registering at once from
            log = root / f"worker{n}.log"  # one address can take each other's node info
            nodes.append((_ray_start([f"--address={address}", "--num-cpus=1"], log, env), log))
            _wait_started(nodes[-1:], deadline)
        yield address, hold
    finally:
        for process, _ in nodes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def _files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and p.name not in ("provenance.json", "README.md")}


@pytest.fixture(scope="module")
def local_build(tmp_path_factory, demo_models) -> tuple[Path, dict[str, dict[str, str]]]:
    from mergebuild.api import Project

    root = tmp_path_factory.mktemp("sweep")
    (root / "Mergefile").write_text(SWEEP.format(models=demo_models["base"].parent))
    project = Project(root / "Mergefile", root / "local")
    assert project.make(["blend"]).count("built") == 6
    variants = project.mergefile.nodes["blend"].variants
    return root, {v: _files(project.path(v)) for v in variants}


def _built_through_ray(root: Path, store: str) -> dict[str, dict[str, str]]:
    from mergebuild.api import Project

    project = Project(root / "Mergefile", root / store)
    return {v: _files(project.path(v)) for v in project.mergefile.nodes["blend"].variants}


def _assert_nothing_half_published(root: Path, keys: int) -> None:
    store = Store(root)
    objects = list(store.iter_objects())
    assert len(objects) == keys
    for obj in objects:
        assert verify_directory(obj) == [], obj
    if store.tmp.exists():  # what a killed build left: garbage for gc, never an object
        assert sorted(store.tmp.iterdir()) == store.dead_tmp_dirs()


def test_sweep_through_ray_is_the_local_build_byte_for_byte(ray_cluster, local_build):
    address, _ = ray_cluster
    root, local = local_build
    run = run_python_m(["--cache-dir", "ray-store", "make", "--executor", "ray",
                        "--ray-address", address, "blend"], cwd=root, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done in " in run.stderr and ": 6 built," in run.stderr
    assert _built_through_ray(root, "ray-store") == local
    _assert_nothing_half_published(root / "ray-store", 6)


def test_a_worker_killed_mid_build_is_retried_and_publishes_nothing_half_built(
        ray_cluster, local_build):
    address, hold = ray_cluster
    root, local = local_build
    hold.touch()  # the first build attempt to read a tensor takes it and blocks
    env = {k: v for k, v in os.environ.items() if k != "MERGEBUILD_FAULT"}
    make = subprocess.Popen(
        [sys.executable, "-m", "mergebuild.cli", "--cache-dir", "killed-store", "make",
         "--executor", "ray", "--ray-address", address, "blend"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (taken := list(hold.parent.glob("hold.*"))):
            assert make.poll() is None, make.communicate()
            assert time.monotonic() < deadline, "no build attempt took the hold file"
            time.sleep(0.2)
        worker = int(taken[0].suffix[1:])
        # Mid-build: the killed attempt holds the key's lock and has a temp dir.
        assert any((root / "killed-store" / "tmp").iterdir())
        assert not (root / "killed-store" / "objects").exists() or not any(
            (root / "killed-store" / "objects").iterdir())
        os.kill(worker, signal.SIGKILL)
        _out, err = make.communicate(timeout=180)
    finally:
        if make.poll() is None:
            make.kill()
            make.wait()
    assert make.returncode == 0, err[-3000:]
    assert ": 6 built," in err
    assert _built_through_ray(root, "killed-store") == local
    _assert_nothing_half_published(root / "killed-store", 6)
    leftovers = list((root / "killed-store" / "tmp").iterdir())
    # Only the killed attempt's temp dirs (one per variant of its pass) are left, for gc.
    assert {p.name.split(".")[1] for p in leftovers} == {str(worker)}
