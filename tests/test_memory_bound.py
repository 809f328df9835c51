"""The engine's memory follows the largest tensor, not the model: 8× the layers, same peak."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SHAPE = {"hidden_size": 256, "intermediate_size": 1024, "vocab_size": 2048, "num_heads": 4,
             "num_kv_heads": 2}
FEW, MANY = 3, 24  # layers; ~1.7 MB of bf16 weights per layer and model

MERGEFILE = """\
version: 1
defaults: {{dtype: bfloat16}}
models:
  base: {{source: {root}/base}}
  a: {{source: {root}/a}}
  b: {{source: {root}/b}}
  out:
    merge_method: {method}
    base_model: base
    models:
      - model: a
        parameters: {{weight: 0.6{extra}}}
      - model: b
        parameters: {{weight: 0.4{extra}}}
"""

# Runs in a child so its peak RSS is its own; prints the engine's peak scratch bytes.
CHILD = textwrap.dedent("""
    import sys
    import mergebuild.build.engine as engine
    from mergebuild.api import Project

    peaks = []
    real = engine.run_build

    def run_build(*args, **kwargs):
        out = real(*args, **kwargs)
        peaks.append(out.peak_scratch_bytes)
        return out

    engine.run_build = run_build
    result = Project(sys.argv[1], sys.argv[2]).make(["out"])
    assert result.ok, result
    print(peaks[0])
""")


def _models(root: Path, layers: int) -> Path:
    from mergebuild.sources.demo import Delta, generate_model

    base = root / f"L{layers}"
    generate_model(base / "base", 0, num_layers=layers, **SHAPE)
    generate_model(base / "a", 0, deltas=[Delta(seed=1)], num_layers=layers, **SHAPE)
    generate_model(base / "b", 0, deltas=[Delta(seed=2, density=0.3)], num_layers=layers,
                   **SHAPE)
    return base


SLERP = """\
version: 1
defaults: {{dtype: bfloat16}}
models:
  base: {{source: {root}/base}}
  a: {{source: {root}/a}}
  out:
    merge_method: slerp
    base_model: base
    models: [{{model: base}}, {{model: a}}]
    parameters: {{t: 0.4}}
"""


def _peak(tmp: Path, models: Path, method: str) -> tuple[int, int]:
    mergefile = tmp / f"{models.name}-{method}.Mergefile"
    extra = ", density: 0.5" if method == "ties" else ""
    mergefile.write_text(SLERP.format(root=models) if method == "slerp" else
                         MERGEFILE.format(root=models, method=method, extra=extra))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(mergefile),
                             str(tmp / f"cache-{models.name}-{method}")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, err.decode()[-2000:]
    return usage.ru_maxrss * 1024, int(out.split()[-1])


@pytest.fixture(scope="module")
def model_sets(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("memory")
    return {layers: _models(root, layers) for layers in (FEW, MANY)}


def _weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "slerp"])
def test_peak_memory_does_not_grow_with_layers(model_sets, tmp_path, method):
    few_rss, few_scratch = _peak(tmp_path, model_sets[FEW], method)
    many_rss, many_scratch = _peak(tmp_path, model_sets[MANY], method)
    # What holding the model would cost: the extra layers of three parents in float32.
    extra_f32 = 2 * sum(_weights_bytes(model_sets[MANY] / n) - _weights_bytes(model_sets[FEW] / n)
                        for n in ("base", "a", "b"))
    assert many_scratch == few_scratch  # scratch is sized by the largest tensor only
    largest = SHAPE["vocab_size"] * SHAPE["hidden_size"]
    # At most one float32 buffer of the largest tensor per input (base + two parents),
    # plus 4 MB chunk buffers per input, plus the streamed family's workspace: ~12 buffers
    # of 1 MB per worker thread (at most 8 workers).
    workers = min(8, len(os.sched_getaffinity(0)))
    assert many_scratch <= 3 * (largest * 4 + 4 * 2**20) + 12 * 2**20 * workers
    # Measured: +15–25 MB (allocator fragmentation over 8× the tensors); keeping each
    # parent's pages mapped adds ~120 MB and keeping the outputs ~80 MB.
    assert many_rss - few_rss < extra_f32 / 4, (
        f"peak RSS grew by {(many_rss - few_rss) / 2**20:.1f} MB from {FEW} to {MANY} layers "
        f"(holding the model would add ~{extra_f32 / 2**20:.0f} MB)"
    )

