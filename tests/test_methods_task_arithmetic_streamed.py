"""The chunked task-arithmetic family: the same bytes as the whole-tensor methods, whatever
the chunk size or worker count."""

from __future__ import annotations

import pytest
import torch

from mergebuild.methods.chunks import ChunkWorkspace
from mergebuild.methods.registry import METHODS, TensorParams

N = 3 * 2**16 + 4321  # several reduce blocks and a ragged tail


def models(discrete: bool, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """bf16 base + three fine-tunes; ``discrete`` deltas make many magnitude ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=g).bfloat16()
    xs = []
    for density in (1.0, 0.5, 0.3):
        d = torch.randn(N, generator=g) * 0.01
        if discrete:
            d = (d * 200).round() / 200
        xs.append((base.float() + d * (torch.rand(N, generator=g) < density)).bfloat16())
    return base, xs


CASES = [
    ("ties", {}, [{"weight": 0.5, "density": 0.3}, {"weight": 0.3, "density": 0.6},
                  {"weight": 0.2, "density": 0.5}]),
    ("ties", {"consensus": "count", "lambda": 1.5},
     [{"weight": 0.5, "density": 0.01}, {"weight": 0.3}, {"weight": -0.2, "density": 0.05}]),
    ("breadcrumbs_ties", {}, [{"weight": 0.5, "density": 0.3, "gamma": 0.05},
                              {"weight": 0.3, "density": 0.6},
                              {"weight": 0.2, "density": 0.9, "gamma": 0.2}]),
    ("breadcrumbs", {}, [{"weight": 0.5, "density": 0.3, "gamma": 0.05},
                         {"weight": -0.3, "density": 0.0}, {"weight": 0.2, "density": 1.0}]),
    ("task_arithmetic", {"lambda": 0.7}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
    ("dare_ties", {}, [{"weight": 0.5, "density": 0.3}, {"weight": 0.3, "density": 0.6},
                       {"weight": 0.2, "density": 0.5}]),
    ("ties", {"rescale": "inverse_density"},
     [{"weight": 0.5, "density": 0.3}, {"weight": 0.3, "density": 0.6},
      {"weight": 0.2, "density": 0.5}]),
    ("breadcrumbs", {"rescale": "inverse_density"},
     [{"weight": 0.5, "density": 0.3, "gamma": 0.05}, {"weight": 0.3, "density": 0.6},
      {"weight": 0.2, "density": 1.0}]),
    ("dare_linear", {"rescale": "inverse_density"},
     [{"weight": 0.5, "density": 0.3}, {"weight": 0.3, "density": 0.6},
      {"weight": 0.2, "density": 1.0}]),
]


def streamed(method, xs, base, params, chunk, workers) -> torch.Tensor:
    workspace = ChunkWorkspace(workers, chunk)
    try:
        out = torch.empty(N, dtype=torch.bfloat16)
        METHODS[method].load_streamed()(xs, base, params, 77, out, workspace)
    finally:
        workspace.close()
    return out


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("method,globals_,per_parent", CASES, ids=[c[0] for c in CASES])
def test_streamed_is_bit_identical_to_whole_tensor(method, globals_, per_parent, discrete):
    base, xs = models(discrete)
    params = TensorParams(tensor_name="t", globals=globals_, parents=tuple(per_parent))
    assert METHODS[method].streamable(params)
    fn = METHODS[method].load()
    expected = fn([x.float() for x in xs], base.float(), params,
                  torch.Generator().manual_seed(77)).bfloat16()
    for chunk, workers in ((2**16, 1), (2**17, 2), (3 * 2**16, 2), (2**20, 2)):
        out = streamed(method, xs, base, params, chunk, workers)
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), (chunk, workers)


def test_dare_draws_do_not_depend_on_chunking_and_differ_per_parent():
    base, xs = models(False)
    same = [{"weight": 1.0, "density": 0.5}] * 3
    params = TensorParams(tensor_name="t", globals={"rescale": "none"}, parents=tuple(same))
    a = streamed("dare_linear", [xs[0]] * 3, base, params, 2**16, 1)
    b = streamed("dare_linear", [xs[0]] * 3, base, params, 2**18, 2)
    assert torch.equal(a, b)
    single = TensorParams(tensor_name="t", globals={"rescale": "none"}, parents=(same[0],))
    one = streamed("dare_linear", [xs[0]], base, single, 2**16, 1)
    assert not torch.equal(a, one)  # three parents draw three masks, not one mask thrice


def test_nan_and_inf_votes_match_whole_tensor():
    base, xs = models(False)
    xs[1][5] = float("nan")
    xs[2][70000], xs[0][70000] = float("inf"), float("-inf")
    params = TensorParams(tensor_name="t", globals={},
                          parents=tuple({"weight": 0.3, "density": 0.5} for _ in xs))
    expected = METHODS["ties"].load()([x.float() for x in xs], base.float(), params).bfloat16()
    out = streamed("ties", xs, base, params, 2**16, 2)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_not_streamable_della_and_magnitude_l1():
    p = TensorParams(tensor_name="t", globals={}, parents=({"weight": 1.0, "density": 0.5},))
    assert not METHODS["della"].streamable(p)
    l1 = TensorParams(tensor_name="t", globals={"rescale": "l1"}, parents=p.parents)
    assert not METHODS["ties"].streamable(l1) and METHODS["dare_ties"].streamable(l1)
