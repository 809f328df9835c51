"""Print the bytes-identity of the example chain and one medium merge per method family.

Used to show that a change which must not change output bytes (a refactor) did not:
run it before and after, and compare the two outputs line by line::

    python benchmarks/digests.py [--sizes medium] > before.txt

Every line is ``<what> <sha256 of the weight files, in name order>``. Models come from
``benchmarks/run.py``'s deterministic generator; each merge is built in a fresh store.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (benchmarks/run.py: models and configs)


def weights_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix == ".safetensors":
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def build(mergefile: Path, store: Path, target: str) -> Path:
    shutil.rmtree(store, ignore_errors=True)
    base = [sys.executable, "-m", "mergebuild.cli", "-f", str(mergefile), "--cache-dir", str(store)]
    subprocess.run([*base, "-q", "make", target], check=True)
    out = subprocess.run([*base, "path", target], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1].split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="medium")
    parser.add_argument("--methods", default=",".join(run.METHODS))
    args = parser.parse_args()
    scratch = run.WORK / "digests"
    example = HERE.parent / "Mergefile.example"
    for node in ("base-instruct", "chat-code", "final-model"):
        print(f"example/{node}", weights_sha256(build(example, scratch / "example", node)))
    for size in args.sizes.split(","):
        paths = run.generate(size)
        for method in args.methods.split(","):
            mergefile, _, _ = run.write_configs(size, method, paths)
            print(f"{size}/{method}", weights_sha256(build(mergefile, scratch / "store", "out")),
                  flush=True)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
