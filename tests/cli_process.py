"""Run the real `mergebuild` CLI in its own OS process, fast enough for dozens of runs per test.

Each run is a fresh process forked from a fork server that has imported torch and the other
heavy third-party modules once (torch's import costs seconds; a fork costs milliseconds).
``mergebuild`` itself is imported anew in every child, after its environment is set, so
``MERGEBUILD_FAULT`` is read exactly as in ``python -m mergebuild.cli``. The child's exit
status is the real one: ``-9`` when it was SIGKILLed, 130 after SIGINT, and so on.
`run_python_m` runs ``python -m mergebuild.cli`` itself, to show the two agree.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_PRELOAD = ["torch", "safetensors", "safetensors.torch", "numpy", "yaml", "click", "rich",
            "rich.console", "rich.progress", "rich.table", "networkx", "xxhash", "sqlite3"]
_CTX = None
# The lines mergebuild.report.PlainReporter prints while a make runs.
PROGRESS_PREFIXES = ("stale ", "building ", "built ", "reused ", "waiting: ", "downloading ",
                     "done in ", "nothing to do", "note: ", "  ")


@dataclass
class Run:
    argv: list[str]
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """stderr without make's progress lines (which go to stderr, stdout being for
        results): what is left must be the error, one line."""
        return [line for line in self.stderr.splitlines()
                if line.strip() and not line.startswith(PROGRESS_PREFIXES)]


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def _child(argv, env, cwd, out_path, err_path, fsize_limit):  # runs in the forked process
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if fsize_limit is not None:
        import resource

        # Ignore SIGXFSZ so an over-limit write fails with EFBIG, as a full disk fails with
        # ENOSPC, instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    try:
        from mergebuild.cli import invoke

        code = invoke(argv)  # what the console entry runs (cli.run), output flushed
    except BaseException as exc:  # noqa: BLE001 - a traceback is itself a test failure
        import traceback

        traceback.print_exception(exc)
        sys.stderr.flush()
        code = 99
    os._exit(code)


def run_cli(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
            fsize_limit: int | None = None, timeout: float = 120) -> Run:
    """Run ``mergebuild ARGV`` in a new process and wait for it (killed after ``timeout``)."""
    return start_cli(argv, cwd=cwd, env=env, fsize_limit=fsize_limit).wait(timeout)


class Started:
    def __init__(self, process, argv, out: Path, err: Path):
        self.process, self.argv, self.out, self.err = process, argv, out, err

    def wait(self, timeout: float = 120) -> Run:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise AssertionError(f"mergebuild {' '.join(self.argv)} hung for {timeout}s")
        run = Run(self.argv, self.process.exitcode, self.out.read_text(), self.err.read_text())
        self.out.unlink(missing_ok=True)
        self.err.unlink(missing_ok=True)
        return run


_counter = itertools.count(1)  # next() on it is atomic: runs may start from several threads


def start_cli(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
              fsize_limit: int | None = None) -> Started:
    """Start ``mergebuild ARGV`` without waiting (for concurrent runs)."""
    number = next(_counter)
    logs = Path(cwd) / ".cli-logs"
    logs.mkdir(exist_ok=True)
    out = logs / f"{os.getpid()}.{number}.out"
    err = logs / f"{os.getpid()}.{number}.err"
    full_env = {k: v for k, v in os.environ.items() if k != "MERGEBUILD_FAULT"}
    full_env.update(env or {})
    process = _context().Process(
        target=_child, args=(list(argv), full_env, str(cwd), str(out), str(err), fsize_limit))
    process.start()
    return Started(process, list(argv), out, err)


def run_python_m(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
                 timeout: float = 300) -> Run:
    """``python -m mergebuild.cli ARGV`` as a plain subprocess (pays torch's import)."""
    full_env = {k: v for k, v in os.environ.items() if k != "MERGEBUILD_FAULT"}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "mergebuild.cli", *argv], check=False, cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    return Run(list(argv), proc.returncode, proc.stdout, proc.stderr)


# Bind-mounts the store ($0) read-only over itself, then runs the rest. Inside a private mount
# namespace the mount is seen by that process alone and goes away with it.
_READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'


@functools.cache
def _private_mount_namespace() -> tuple[str, ...]:
    """unshare's arguments for a private mount namespace in which a read-only bind mount can
    be made: root's own (CAP_SYS_ADMIN, as in this container and CI's), else one inside a new
    user namespace (whose root may mount), for a container that withholds CAP_SYS_ADMIN."""
    for prefix in (("unshare", "--mount", "--propagation", "private"),
                   ("unshare", "--user", "--map-root-user", "--mount", "--propagation",
                    "private")):
        with tempfile.TemporaryDirectory() as probe:
            tried = subprocess.run([*prefix, "sh", "-c", _READ_ONLY, probe, "true"],
                                   check=False, capture_output=True)
        if tried.returncode == 0:
            return prefix
    raise AssertionError("no private mount namespace with mounts here (unshare, mount): a "
                         "read-only store cannot be made for the test")


def run_read_only(store: Path, argv: list[str], *, cwd: Path, python: str | None = None,
                  timeout: float = 300) -> Run:
    """``python -m mergebuild.cli ARGV`` (or ``python -c PYTHON``) as a plain subprocess
    that sees ``store`` on a read-only file system: a real EROFS, which root gets too, where
    chmod stops every user but root."""
    program = ["-c", python] if python is not None else ["-m", "mergebuild.cli"]
    full_env = {k: v for k, v in os.environ.items() if k != "MERGEBUILD_FAULT"}
    proc = subprocess.run([*_private_mount_namespace(), "sh", "-c", _READ_ONLY, str(store),
                           sys.executable, *program, *argv], check=False, cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    return Run(list(argv), proc.returncode, proc.stdout, proc.stderr)
