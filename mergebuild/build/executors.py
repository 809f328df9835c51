"""Where a make's units of work run: in this process (``local``), in a pool of build processes
(``make -j N``), or as Ray tasks (``--executor ray``). The make loop stays in the driver."""

from __future__ import annotations

import abc
import contextlib
import importlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mergebuild.build.events import Reporter
from mergebuild.build.resources import (
    UnitNeeds,
    concurrent_builds,
    visible_gpus,
    worker_environment,
)
from mergebuild.errors import ExecutorError, MergebuildError
from mergebuild.store.objects import Store

if TYPE_CHECKING:
    from mergebuild.build.evaluation import Evaluations

EXECUTORS = ("local", "ray")
# A Ray task whose worker died (killed, out of memory, its node lost) runs again this many
# times; its killed attempt published nothing, and its temp dir is gc's.
RAY_RETRIES = 3


class WorkUnit(Protocol):
    """One unit of build work, handed to an executor once its parents are published: a
    merge node (with the evaluations its build record includes) or a sweep's fused group."""

    label: str  # the node, or "N variant(s) of SWEEP"
    store_root: Path
    needs: UnitNeeds

    def run(self, store: Store, reporter: Reporter, evaluations: Evaluations | None) -> Any:
        """Build under the per-key locks and publish; what the driver records comes back."""
        ...

    def worker_evaluations(self, store: Store, reporter: Reporter) -> Evaluations | None:
        """The evaluations object a worker builds this unit with (None: the unit has none)."""
        ...


Event = tuple[str, tuple[Any, ...]]  # a Reporter method's name and its arguments


@dataclass(frozen=True)
class Done:
    """A finished unit: what it returned, or the error it failed with, and what it told its
    reporter (a remote unit's events, for the driver's reporter to replay)."""

    ticket: int
    outcome: Any = None
    error: MergebuildError | None = None
    events: tuple[Event, ...] = ()
    evaluations_run: int = 0


class Executor(abc.ABC):
    """Runs units; the driver submits a unit only when its parents are published, at most
    ``slots`` at once, and waits for finished ones."""

    name = "local"
    remote = False  # units run in other processes: their reporter events come back recorded
    limits_memory = False  # the driver holds units back to fit this machine's memory

    @property
    def slots(self) -> int:
        return 1

    @abc.abstractmethod
    def submit(self, ticket: int, unit: WorkUnit, store: Store, reporter: Reporter,
               evaluations: Evaluations | None) -> None:
        """Start ``unit`` (or, in process, run it); its result comes back from ``wait``."""

    @abc.abstractmethod
    def wait(self) -> list[Done]:
        """Block until at least one submitted unit has finished; those that have."""

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM reached the driver: stop the running units (each removes its
        temp dir; a unit is published whole or not at all)."""

    def close(self) -> None:
        """Release the workers, after the running units have finished."""


class LocalExecutor(Executor):
    """Today's serial make: a unit runs in this process the moment it is submitted, with the
    driver's own store, reporter and evaluations, so bytes and messages are a serial make's."""

    def __init__(self) -> None:
        self._done: list[Done] = []

    def submit(self, ticket: int, unit: WorkUnit, store: Store, reporter: Reporter,
               evaluations: Evaluations | None) -> None:
        try:
            self._done.append(Done(ticket, outcome=unit.run(store, reporter, evaluations)))
        except MergebuildError as exc:
            self._done.append(Done(ticket, error=exc))

    def wait(self) -> list[Done]:
        done, self._done = self._done, []
        return done


class _RecordingReporter(Reporter):
    """A worker's reporter: the events a driver replays once the unit is done (progress is
    dropped; a download is kept when it finishes)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def _keep(self, name: str, *args: Any) -> None:
        self.events.append((name, args))

    def node_start(self, state: Any, tensors: int | None = None) -> None:
        self._keep("node_start", state, tensors)

    def waiting(self, name: str) -> None:
        self._keep("waiting", name)

    def download(self, node: str, label: str, done: int, total: int) -> None:
        if total > 0 and done >= total:
            self._keep("download", node, label, done, total)

    def eval_start(self, node: str, eval_name: str) -> None:
        self._keep("eval_start", node, eval_name)

    def eval_done(self, node: str, eval_name: str, metrics: Any, seconds: float) -> None:
        self._keep("eval_done", node, eval_name, dict(metrics), seconds)


def replay(events: tuple[Event, ...], reporter: Reporter) -> None:
    """Tell ``reporter`` what a remote unit told its own, in order."""
    for name, args in events:
        getattr(reporter, name)(*args)


_RUNNING = False  # in a build worker: whether a unit is running (Ctrl-C interrupts only it)


def run_remote(unit: WorkUnit) -> Done:
    """A unit in a build worker (a pool process or a Ray task): its own store handle, a
    recording reporter and, when it evaluates, its own evaluations object."""
    global _RUNNING
    store = Store(unit.store_root)
    recorder = _RecordingReporter()
    evaluations = unit.worker_evaluations(store, recorder)
    _RUNNING = True
    try:
        outcome = unit.run(store, recorder, evaluations)
    except MergebuildError as exc:
        return Done(-1, error=exc, events=tuple(recorder.events),
                    evaluations_run=evaluations.runs if evaluations else 0)
    finally:
        _RUNNING = False
    return Done(-1, outcome=outcome, events=tuple(recorder.events),
                evaluations_run=evaluations.runs if evaluations else 0)


def _interrupt_running_unit(signum: int, frame: Any) -> None:
    if _RUNNING:  # the unit turns it into BuildInterrupted, its temp dir removed
        raise KeyboardInterrupt


def _start_worker(claims: str, workers: int, gpus: int, device: str) -> None:
    """A pool process's start: its index (the first free one, claimed as a file: no
    semaphores to leak when the driver leaves with os._exit), its own GPU (before anything
    imports torch), and Ctrl-C only for a running unit (an idle worker waits for shutdown)."""
    index = os.getpid() % workers
    for candidate in range(workers):
        try:
            os.close(os.open(os.path.join(claims, str(candidate)), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        index = candidate
        break
    os.environ.update(worker_environment(index, gpus, device))
    signal.signal(signal.SIGINT, _interrupt_running_unit)
    importlib.import_module("mergebuild.build.engine")  # torch, once, before any build's clock
    importlib.import_module("torch")


class ProcessExecutor(Executor):
    """``make -j N``: N spawned build processes (spawn, not fork: torch's threads do not
    survive a fork). Each builds into the store's ``tmp/`` and publishes through the same
    atomic publish and per-key lock as a serial make."""

    name = "processes"
    remote = True
    limits_memory = True

    def __init__(self, workers: int, gpus: int = 0, device: str = "auto") -> None:
        self.workers = workers
        self._claims = tempfile.mkdtemp(prefix="mergebuild-workers-")
        self._pool = ProcessPoolExecutor(max_workers=workers,
                                         mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker,
                                         initargs=(self._claims, workers, gpus, device))
        self._running: dict[Future[Done], tuple[int, str]] = {}

    @property
    def slots(self) -> int:
        return self.workers

    def submit(self, ticket: int, unit: WorkUnit, store: Store, reporter: Reporter,
               evaluations: Evaluations | None) -> None:
        try:
            future = self._pool.submit(run_remote, unit)
        except BrokenProcessPool:
            raise _died(unit.label) from None
        self._running[future] = (ticket, unit.label)

    def wait(self) -> list[Done]:
        finished, _ = wait_futures(list(self._running), return_when=FIRST_COMPLETED)
        done = []
        for future in finished:
            ticket, label = self._running.pop(future)
            try:
                result = future.result()
            except BrokenProcessPool:
                done.append(Done(ticket, error=_died(label)))
                continue
            done.append(Done(ticket, result.outcome, result.error, result.events,
                             result.evaluations_run))
        return done

    def interrupt(self) -> None:
        # A terminal's Ctrl-C reaches the workers too; a SIGTERM to the driver does not.
        for process in list(getattr(self._pool, "_processes", {}).values()):
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(process.pid, signal.SIGINT)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._claims, ignore_errors=True)


def _died(label: str) -> ExecutorError:
    return ExecutorError("its build worker died; nothing of its build was published",
                         node=label, hint="run make again (without -j to build in-process)")


class RayExecutor(Executor):
    """``--executor ray``: each unit is a Ray task asking for a CPU, its estimated memory and,
    when builds use GPUs, a GPU. The store must be on a file system every worker mounts at
    the same path; its atomic publish and per-key locks work there as on one machine. A
    task whose worker dies is retried (``RAY_RETRIES``); a MergebuildError is a result,
    never retried."""

    name = "ray"
    remote = True

    def __init__(self, address: str | None, device: str = "auto",
                 connect: Callable[..., Any] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray, which is not installed",
                                hint="pip install 'mergebuild[ray]'") from None
        self._ray = ray
        try:
            (connect or ray.init)(address=address or "auto", logging_level=logging.ERROR,
                                  log_to_driver=False, configure_logging=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ExecutorError(f"cannot connect to the Ray cluster at {address or 'auto'}: "
                                f"{str(exc).splitlines()[0] if str(exc) else exc}",
                                hint="start one with 'ray start --head', or pass "
                                     "--ray-address HOST:PORT") from None
        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        self.device = device
        self._task = ray.remote(run_remote)
        self._running: dict[Any, tuple[int, str]] = {}

    @property
    def slots(self) -> int:
        return 1 << 16  # Ray's scheduler queues what the cluster cannot run yet

    def submit(self, ticket: int, unit: WorkUnit, store: Store, reporter: Reporter,
               evaluations: Evaluations | None) -> None:
        options: dict[str, Any] = {"num_cpus": 1, "memory": unit.needs.memory,
                                   "max_retries": RAY_RETRIES, "retry_exceptions": False}
        if unit.needs.gpu and self.gpus:
            options["num_gpus"] = 1
        self._running[self._task.options(**options).remote(unit)] = (ticket, unit.label)

    def wait(self) -> list[Done]:
        ready, _ = self._ray.wait(list(self._running), num_returns=1)
        done = []
        for ref in ready:
            ticket, label = self._running.pop(ref)
            try:
                result = self._ray.get(ref)
            except self._ray.exceptions.RayError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                done.append(Done(ticket, error=ExecutorError(
                    f"its Ray task failed after {RAY_RETRIES} retries: {first}", node=label,
                    hint="run make again; the store holds nothing half-built")))
                continue
            done.append(Done(ticket, result.outcome, result.error, result.events,
                             result.evaluations_run))
        return done

    def interrupt(self) -> None:
        for ref in list(self._running):
            with contextlib.suppress(Exception):
                self._ray.cancel(ref)

    def close(self) -> None:
        self._ray.shutdown()


@contextlib.contextmanager
def open_executor(kind: str = "local", jobs: int = 1, ray_address: str | None = None,
                  device: str = "auto") -> Iterator[Executor]:
    """The executor a make asks for, closed when the make ends: ``local`` with ``jobs`` 1 is
    the serial in-process make; ``jobs`` > 1 a pool of that many build processes (one per
    GPU when the builds use GPUs); ``ray`` the Ray cluster at ``ray_address``."""
    if kind not in EXECUTORS:
        raise ExecutorError(f"unknown executor '{kind}'", hint=f"one of: {', '.join(EXECUTORS)}")
    executor: Executor
    if kind == "ray":
        executor = RayExecutor(ray_address, device)
    elif jobs > 1:
        gpus = visible_gpus()
        executor = ProcessExecutor(concurrent_builds(jobs, gpus, device), gpus, device)
    else:
        executor = LocalExecutor()
    try:
        yield executor
    finally:
        executor.close()
