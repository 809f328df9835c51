"""make -j N: independent nodes and sweeps built at once in build processes, byte for byte a
serial make's, each key built once (also by two such makes sharing a store); the memory and
GPU arithmetic that decides how many run at once."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
from pathlib import Path

import pytest
from cli_process import run_python_m, start_cli
from conftest import CHAIN, TIES_SWEEP

from mergebuild.build import resources
from mergebuild.build.events import NodeResult, Reporter
from mergebuild.build.executors import ProcessExecutor, open_executor
from mergebuild.build.resources import (
    MemoryBudget,
    UnitNeeds,
    available_memory,
    concurrent_builds,
    estimate_peak_bytes,
    visible_gpus,
    worker_environment,
)
from mergebuild.errors import CheckpointError, CorruptParentError, ExecutorError, MergebuildError
from mergebuild.provenance.integrity import verify_directory
from mergebuild.store.objects import Store

# The chain (two independent merges under a third) and a 6-variant sweep beside it.
SWEEP = CHAIN + TIES_SWEEP
MERGES = ("base-instruct", "chat-code", "final-model")


class Recording(Reporter):
    def __init__(self) -> None:
        self.done: list[tuple[str, str]] = []
        self.notes: list[str] = []

    def node_done(self, result: NodeResult) -> None:
        self.done.append((result.name, result.outcome))

    def note(self, message: str) -> None:
        self.notes.append(message)


def _files(directory: Path) -> dict[str, str]:
    """sha256 of every file of a build but the two that carry its timestamps."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and p.name not in ("provenance.json", "README.md")}


def _outputs(project, names) -> dict[str, dict[str, str]]:
    return {name: _files(project.path(name)) for name in names}


def _assert_store_sound(root: Path) -> None:
    store = Store(root)
    for obj in store.iter_objects():
        assert verify_directory(obj) == [], obj
    if store.tmp.exists():
        assert sorted(store.tmp.iterdir()) == store.dead_tmp_dirs()


@pytest.fixture(scope="module")
def serial(tmp_path_factory, demo_models):
    """The Mergefile built serially: its nodes' outputs and what the reporter was told."""
    from mergebuild.api import Project

    root = tmp_path_factory.mktemp("serial")
    (root / "Mergefile").write_text(SWEEP.format(models=demo_models["base"].parent))
    project = Project(root / "Mergefile", root / "cache")
    reporter = Recording()
    result = project.make(["final-model", "blend"], reporter=reporter)
    names = [*MERGES, *project.mergefile.nodes["blend"].variants]
    return {"outputs": _outputs(project, names), "done": reporter.done, "names": names,
            "built": result.count("built")}


def test_j2_builds_byte_identical_each_key_once_reported_in_plan_order(workspace, serial):
    workspace.write(SWEEP)
    project = workspace.project()
    reporter = Recording()
    result = project.make(["final-model", "blend"], reporter=reporter, jobs=2)
    assert result.ok
    assert _outputs(project, serial["names"]) == serial["outputs"]
    # 3 merges and 6 variants, each its own key: 9 builds, as serially, no key twice.
    assert result.count("built") == serial["built"] == 9
    keys = [Store(workspace.cache).refs_of(workspace.mergefile).read(n)["key"]
            for n in serial["names"]]
    assert len(set(keys)) == 9
    assert reporter.done == serial["done"]  # the same lines in the same order
    _assert_store_sound(workspace.cache)
    # And a second make -j 2 has nothing to build.
    again = project.make(["final-model", "blend"], jobs=2)
    assert again.count("built") == 0 and again.count("fresh") == 9


def test_two_concurrent_j2_makes_into_one_store_build_each_key_once(tmp_path, demo_models,
                                                                   serial):
    root = tmp_path / "shared"
    root.mkdir()
    (root / "Mergefile").write_text(SWEEP.format(models=demo_models["base"].parent))
    argv = ["--cache-dir", "cache", "make", "-j", "2", "final-model", "blend"]
    runs = [s.wait(300) for s in [start_cli(argv, cwd=root) for _ in range(2)]]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    built = [m.group(1) for r in runs
             for m in re.finditer(r"^built (\S+) in ", r.stderr, re.MULTILINE)]
    assert sorted(built) == sorted(serial["names"])  # every key built once, by one of them
    from mergebuild.api import Project

    project = Project(root / "Mergefile", root / "cache")
    assert _outputs(project, serial["names"]) == serial["outputs"]
    _assert_store_sound(root / "cache")


def test_j2_fails_and_keeps_going_as_a_serial_make_does(workspace):
    from mergebuild.api import Project

    # chat-code cannot be built (a parent's weights are not safetensors); base-instruct can.
    broken = workspace.root / "broken"
    broken.mkdir()
    for f in (Path(workspace.models) / "code").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    next(broken.glob("*.safetensors")).write_bytes(b"\0" * 64)
    workspace.write(CHAIN.replace("code:     {{source: {models}/code}}",
                                  f"code:     {{{{source: {broken}}}}}"))

    def make(store: str, **options):
        reporter = Recording()
        project = Project(workspace.mergefile, workspace.root / store)
        try:
            result = project.make(["final-model"], reporter=reporter, **options)
        except MergebuildError as exc:
            return type(exc), str(exc), reporter.done
        return {r.name: r.outcome for r in result.results}, reporter.done

    failed = make("serial")
    assert failed[0] is CheckpointError and failed[1].startswith("node 'code': ")
    # The same error; base-instruct, already building beside chat-code, is finished first.
    assert make("parallel", jobs=2) == (*failed[:2], [("base-instruct", "built")])
    kept = make("serial-k", keep_going=True)
    assert kept[0] == {"chat-code": "failed", "base-instruct": "built",
                       "final-model": "skipped"}
    assert make("parallel-k", keep_going=True, jobs=2) == kept


def test_a_memory_limit_runs_fewer_builds_at_once_and_says_so_once(workspace, serial,
                                                                   monkeypatch, tmp_path):
    # 600 MB available (540 MB for builds): one build (320 MB of process and its tiny
    # tensors) fits, two do not.
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000000 kB\nMemAvailable:     600000 kB\n")
    monkeypatch.setattr(resources, "MEMINFO", meminfo)
    workspace.write(SWEEP)
    project = workspace.project()
    reporter = Recording()
    result = project.make(["final-model", "blend"], reporter=reporter, jobs=2)
    assert result.count("built") == 9
    assert len(reporter.notes) == 1
    assert reporter.notes[0].startswith("running 1 build(s) at once, not 2")
    assert _outputs(project, serial["names"]) == serial["outputs"]


# memory and devices, by arithmetic ---------------------------------------------------------

def test_meminfo_is_read_for_the_available_memory(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16384 kB\nMemFree: 1024 kB\nMemAvailable: 8192 kB\n")
    assert available_memory(meminfo) == 8192 * 1024
    budget = MemoryBudget.of_this_machine(meminfo)
    assert budget.total == int(8192 * 1024 * 0.9)


def test_memory_budget_admits_what_fits_and_always_one():
    budget = MemoryBudget(total=1000)
    assert budget.fits(5000)  # alone: it runs anyway
    budget.take(1, 600)
    assert budget.fits(400) and not budget.fits(401)
    budget.take(2, 400)
    assert not budget.fits(1)
    budget.give_back(1)
    assert budget.fits(600)
    assert MemoryBudget(total=None).fits(10**15)


def test_peak_estimate_follows_the_largest_tensor_parents_and_variants():
    mib = 2**20
    two_parents = {p: {"big": ("BF16", (1024, 1024)), "small": ("F32", (16,))}
                   for p in ("a", "b")}
    one = estimate_peak_bytes(two_parents, 1)
    # a float32 copy of the largest tensor (4 MiB) per parent; three outputs of 2 MiB
    assert one == resources.PROCESS_BASELINE_BYTES + 2 * 4 * mib + 3 * 2 * mib
    # six variants' outputs in flight at once, and the writers' shared 64 MB
    six = estimate_peak_bytes(two_parents, 6)
    assert six == resources.PROCESS_BASELINE_BYTES + 2 * 4 * mib + 6 * 2 * mib + 64 * mib
    three_parents = {**two_parents, "c": two_parents["a"]}
    assert estimate_peak_bytes(three_parents, 1) - one == 4 * mib
    assert estimate_peak_bytes({}, 1) == resources.PROCESS_BASELINE_BYTES


def test_one_build_per_gpu_each_worker_its_own_device(tmp_path):
    devices = tmp_path / "dev"
    devices.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (devices / name).touch()
    assert visible_gpus({}, devices) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5,7"}, devices) == 3
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, devices) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, devices) == 0
    assert visible_gpus({}, tmp_path / "none") == 0
    assert concurrent_builds(8, 2, "auto") == 2
    assert concurrent_builds(8, 2, "cuda") == 2
    assert concurrent_builds(8, 2, "cpu") == 8  # CPU builds do not queue for the GPUs
    assert concurrent_builds(3, 0, "auto") == 3
    assert [worker_environment(i, 2, "auto") for i in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert worker_environment(1, 2, "cpu") == {}
    assert worker_environment(0, 0, "auto") == {}


class _WhichDevice:
    """A unit that reports the build worker it ran in and the GPU that worker was given."""

    label = "device-probe"
    store_root = Path("/nonexistent")
    needs = UnitNeeds(memory=0)

    def run(self, store, reporter, evaluations):
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")

    def worker_evaluations(self, store, reporter):
        return None


def test_pool_workers_get_one_fake_gpu_each():
    executor = ProcessExecutor(2, gpus=2, device="auto")
    try:
        seen: dict[int, str | None] = {}
        for ticket in range(4):
            executor.submit(ticket, _WhichDevice(), None, Reporter(), None)  # type: ignore[arg-type]
        done = []
        while len(done) < 4:
            done += executor.wait()
    finally:
        executor.close()
    for d in done:
        assert d.error is None
        pid, device = d.outcome
        assert seen.setdefault(pid, device) == device  # a worker keeps its device
    assert set(seen.values()) <= {"0", "1"}
    assert len(set(seen.values())) == len(seen)  # no two workers share one


# errors ------------------------------------------------------------------------------------

def test_errors_cross_process_boundaries_intact():
    error = CorruptParentError("bytes differ", parent="a", file="x.safetensors", node="b",
                               hint="run make again")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is CorruptParentError
    assert (str(back), back.parent, back.file, back.node) == (str(error), "a",
                                                             "x.safetensors", "b")


def test_ray_executor_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(ExecutorError) as error, open_executor("ray"):
        pass
    assert str(error.value) == ("--executor ray needs Ray, which is not installed "
                                "(pip install 'mergebuild[ray]')")


def test_cli_without_ray_fails_in_one_line(workspace):
    workspace.chain()
    run = run_python_m(["make", "--executor", "ray"], cwd=workspace.root,
                  env={"PYTHONPATH": f"{_no_ray_path(workspace.root)}{os.pathsep}"
                                     f"{os.environ.get('PYTHONPATH', '')}"})
    assert run.returncode == 1, run.stderr
    assert run.error_lines == [("mergebuild: error: --executor ray needs Ray, which is not installed "
                                "(pip install 'mergebuild[ray]')")]


def _no_ray_path(root: Path) -> Path:
    """A directory whose ``ray`` package fails to import, as when Ray is not installed."""
    shadow = root / "no-ray"
    (shadow / "ray").mkdir(parents=True)
    (shadow / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    return shadow


def test_j2_evaluates_in_the_workers_and_judges_checks_as_serially(tmp_path):
    from test_build_evaluation import CHAIN as EVAL_CHAIN
    from test_build_evaluation import _first_lines

    from mergebuild.api import Project
    from mergebuild.provenance.statement import EVALUATION_FILE
    from mergebuild.sources.skills import SKILL_DATA

    _first_lines(SKILL_DATA / "math.jsonl", tmp_path / "math.jsonl", 20)
    _first_lines(SKILL_DATA / "code.jsonl", tmp_path / "code.jsonl", 20)
    (tmp_path / "Mergefile").write_text(EVAL_CHAIN.format(retain=0.9))

    def make(store: str, jobs: int) -> tuple:
        project = Project(tmp_path / "Mergefile", tmp_path / store)
        result = project.make(["s3", "after-lost"], device="cpu", jobs=jobs,
                              keep_going=True)
        return (
            {r.name: (r.outcome, [(c.describe(), c.passed) for c in r.checks])
             for r in result.results},
            result.evaluations_run,
            {n: (project.path(n) / EVALUATION_FILE).read_text() for n in ("s1", "s3")},
        )

    serial = make("serial", 1)
    assert make("parallel", 2) == serial
    outcomes, evaluations_run, _ = serial
    assert outcomes["lost"][0] == "failed" and outcomes["after-lost"][0] == "skipped"
    assert evaluations_run >= 2
    # Edited eval data: sources and up-to-date nodes are scored again, in the workers.
    _first_lines(SKILL_DATA / "math.jsonl", tmp_path / "math.jsonl", 10)
    rescored = make("serial", 1)
    assert rescored[1] >= 2  # at least math and s1
    assert {n: o for n, (o, _) in rescored[0].items()}["s3"] == "fresh"
    assert make("parallel", 2)[:2] == rescored[:2]


def test_j2_build_interrupted_in_a_worker_publishes_nothing_and_exits_130(tmp_path,
                                                                          demo_models):
    (tmp_path / "Mergefile").write_text(CHAIN.format(models=demo_models["base"].parent))
    # Each worker's first tensor read is a Ctrl-C, in that worker.
    run = run_python_m(["--cache-dir", "cache", "make", "-j", "2", "final-model"],
                       cwd=tmp_path, env={"MERGEBUILD_FAULT": "engine.read_tensor:1:int"})
    assert run.returncode == 130, run.stderr[-2000:]
    lines = run.error_lines
    assert len(lines) == 1 and lines[0].startswith("mergebuild: error: node '"), run.stderr
    assert "interrupted; nothing was published" in lines[0]
    # Whatever a worker finished before is whole; nothing else is in the store.
    _assert_store_sound(tmp_path / "cache")
    assert not any((tmp_path / "cache" / "tmp").iterdir())  # each removed its temp dir


def test_j2_selects_the_same_variant_and_builds_the_child_on_it(tmp_path):
    from test_build_sweep import SELECTED

    from mergebuild.api import Project
    from mergebuild.sources.skills import SKILL_DATA

    for name, count in (("chat.jsonl", 20), ("code.jsonl", 20), ("text.txt", 12)):
        lines = (SKILL_DATA / name).read_text().splitlines()[:count]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    (tmp_path / "Mergefile").write_text(SELECTED.format(grid="[0.0, 0.5, 1.0]",
                                                        goal="maximize", metric="code-skill"))
    made = {}
    for store, jobs in (("serial", 1), ("parallel", 2)):
        project = Project(tmp_path / "Mergefile", tmp_path / store)
        reporter = Recording()
        result = project.make(["final"], device="cpu", jobs=jobs, reporter=reporter)
        made[store] = ({r.name: r.outcome for r in result.results}, result.evaluations_run,
                       reporter.done, project.lineage("blend").name, _files(project.path("final")))
    assert made["parallel"] == made["serial"]
    assert made["serial"][0]["final"] == "built"


@pytest.mark.parametrize(("argv", "says"), [
    (["make", "--executor", "ray", "-j", "2"], "drop -j"),
    (["make", "--ray-address", "127.0.0.1:6379"], "add --executor ray"),
])
def test_a_flag_the_executor_would_ignore_is_refused(workspace, argv, says):
    workspace.chain()
    run = run_python_m(argv, cwd=workspace.root)
    assert run.returncode == 2, run.stderr
    assert says in run.stderr
    assert not (workspace.root / "cache" / "objects").exists()
