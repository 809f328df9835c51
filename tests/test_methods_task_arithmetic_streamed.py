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


def _parts(seed: int) -> tuple[list[torch.Tensor], list[float]]:
    """Weighted, sparsified parts with every sign of zero, exact cancellations and NaN-free
    extremes: what makes the sign election's bits subtle."""
    g = torch.Generator().manual_seed(seed)
    n = 4099
    parts = []
    for _ in range(3):
        p = (torch.randn(n, generator=g) * 0.01).round(decimals=3)
        p[torch.rand(n, generator=g) < 0.3] = 0.0
        p[torch.rand(n, generator=g) < 0.1] = -0.0
        parts.append(p)
    parts[1][:50] = -parts[0][:50]  # sums of exactly zero
    return parts, [0.5, -0.2, 0.3]


@pytest.mark.parametrize("consensus", ["sum", "count", None])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_mix_with_shared_signs_and_constants_gives_the_same_bits(consensus, normalize, lam):
    from mergebuild.methods.task_arithmetic.whole import mix_

    for seed in range(3):
        parts, weights = _parts(seed)
        kept = [p.clone() for p in parts]
        plain = mix_(parts, weights, consensus, normalize, lam).clone()
        n = parts[0].numel()
        fast = mix_(parts, weights, consensus, normalize, lam,
                    signs=[torch.sign(parts[0]), None, torch.sign(parts[2])],
                    ones=torch.ones(n + 7), zeros=torch.zeros(n + 7))
        assert torch.equal(plain.view(torch.int32), fast.view(torch.int32))
        # The parts are read, never written: a sweep's variants share them.
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
                   for a, b in zip(parts, kept))


def test_the_plain_vote_leaves_the_parts_as_they_are():
    from mergebuild.methods.task_arithmetic.whole import mix_

    parts, weights = _parts(7)
    parts[2][3] = float("inf")  # a sum that is not finite takes the plain formulation
    kept = [p.clone() for p in parts]
    mix_(parts, weights, "sum", True, 1.0)
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in zip(parts, kept))


def test_masking_into_a_buffer_keeps_exactly_the_bounded_magnitudes():
    from mergebuild.methods.task_arithmetic.streamed import _keep_between_into
    from mergebuild.methods.task_arithmetic.topk import abs_bits

    g = torch.Generator().manual_seed(3)
    src = torch.randn(5000, generator=g) * 0.01
    src[::17] = -0.0
    bits = abs_bits(src, torch.empty(5000, dtype=torch.int32))
    points = sorted(bits[torch.randint(0, 5000, (4,), generator=g)].tolist())
    bounds = [(0, 1 << 31), (0, points[2]), (points[1], 1 << 31), (points[0], points[3]),
              (points[3], points[0]), (1, 1 << 31), ((1 << 31) - 1, 1 << 31)]
    for low, high in bounds:
        wide = bits.long()  # 2³¹ as a bound does not fit int32
        expected = src.masked_fill((wide < low) | (wide >= high), 0.0)
        out = torch.full((5000,), 7.0)
        _keep_between_into(out, src, bits, low, high, torch.empty(5000, dtype=torch.int32))
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), (low, high)


def test_variants_share_a_parent_part_only_when_it_is_the_same():
    """Parents whose keep and cut agree across variants are masked once per chunk; DARE's
    draws follow each variant's seed, so its parts are never shared. Either way every variant
    equals its own single-variant merge."""
    base, xs = models(True)
    cases = {
        "ties": [[{"weight": 0.5, "density": d}, {"weight": 0.3, "density": 0.6},
                  {"weight": 0.2, "density": 0.5}] for d in (0.2, 0.5, 0.2)],
        "dare_ties": [[{"weight": 0.5, "density": d}, {"weight": 0.3, "density": 0.6},
                       {"weight": 0.2, "density": 0.5}] for d in (0.2, 0.5, 0.2)],
    }
    from mergebuild.methods.task_arithmetic import streamed as module

    for method, rows in cases.items():
        params = [TensorParams("t", {}, tuple(r)) for r in rows]
        seeds = [11, 12, 13]
        made: list[int] = []
        real = module._part_key

        def counting(p, _real=real):
            key = _real(p)
            made.append(key is not None)
            return key

        module._part_key = counting
        try:
            workspace = ChunkWorkspace(2, 2**16)
            outs = [torch.empty(N, dtype=torch.bfloat16) for _ in rows]
            METHODS[method].load_streamed_many()(xs, base, params, seeds, outs, workspace)
            workspace.close()
        finally:
            module._part_key = real
        assert any(made) == (method == "ties")
        for row, seed, out in zip(params, seeds, outs, strict=True):
            alone = torch.empty(N, dtype=torch.bfloat16)
            workspace = ChunkWorkspace(2, 2**16)
            METHODS[method].load_streamed()(xs, base, row, seed, alone, workspace)
            workspace.close()
            assert torch.equal(out.view(torch.int16), alone.view(torch.int16))
        if method == "ties":  # the first and last variants are the same recipe
            assert torch.equal(outs[0].view(torch.int16), outs[2].view(torch.int16))
