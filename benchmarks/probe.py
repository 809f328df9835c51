"""Run the mergebuild CLI and record what it touched: torch imported? weight files opened?

Usage: ``python benchmarks/probe.py REPORT.json -- <mergebuild arguments>``. An audit hook
counts every ``open``/``mmap`` of a ``*.safetensors`` file and the bytes read through them
are bounded by ``rchar`` from /proc/self/io; the report is written when the command returns.
"""

from __future__ import annotations

import json
import os
import sys

_opened: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], str | bytes):
        path = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if path.endswith(".safetensors"):
            _opened.append(path)
    elif event == "mmap.__new__":
        _opened.append(f"mmap(fd={args[0]})")


def _report(path: str) -> None:
    io = {}
    try:
        with open("/proc/self/io") as f:
            io = {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        pass
    data = {"torch_imported": "torch" in sys.modules, "weight_opens": _opened,
            "rchar": io.get("rchar"), "read_bytes": io.get("read_bytes")}
    with open(path, "w") as f:
        json.dump(data, f)


def main() -> None:
    report, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: probe.py REPORT.json -- ARGS"
    sys.addaudithook(_audit)
    from mergebuild.cli import invoke

    code = invoke(args)  # then leave as the ``mergebuild`` command does (cli.run)
    _report(report)
    os._exit(code) if "torch" in sys.modules else sys.exit(code)


if __name__ == "__main__":
    main()
