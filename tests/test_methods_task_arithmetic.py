"""Tests for mergebuild.methods.task_arithmetic.whole: TIES, DARE, breadcrumbs, DELLA and friends."""

import pytest
import torch
from torch.testing import assert_close

from mergebuild.methods.registry import METHODS, TensorParams
from mergebuild.methods.registry import rescale_mode

NAME = "model.layers.0.mlp.up_proj.weight"


def run(method, parents, base, per_parent, generator=None, **globals_):
    """Call a registered method on copies (methods may modify their inputs)."""
    params = TensorParams(NAME, globals_, tuple(per_parent))
    fn = METHODS[method].load()
    return fn([p.clone() for p in parents], base.clone(), params, generator)


def seeded(seed=1234):
    return torch.Generator().manual_seed(seed)


# --- task arithmetic ------------------------------------------------------------------


def test_task_arithmetic_by_hand():
    base = torch.ones(4)
    x1 = torch.tensor([2.0, 0.0, 1.0, 3.0])  # δ1 = [1, -1, 0, 2]
    x2 = torch.tensor([1.0, 3.0, 1.0, -1.0])  # δ2 = [0, 2, 0, -2]
    w = [{"weight": 1.0}, {"weight": 0.5}]
    assert_close(run("task_arithmetic", [x1, x2], base, w), torch.tensor([2.0, 1.0, 1.0, 2.0]))
    assert_close(
        run("task_arithmetic", [x1, x2], base, w, normalize=True),
        torch.tensor([1 + 1 / 1.5, 1.0, 1.0, 1 + 1 / 1.5]),
    )
    assert_close(
        run("task_arithmetic", [x1, x2], base, w, **{"lambda": 2.0}),
        torch.tensor([3.0, 1.0, 1.0, 3.0]),
    )


def test_weights_summing_to_one_keep_a_constant_model():
    g = seeded()
    base = torch.randn(5, 7, generator=g)
    same = torch.randn(5, 7, generator=g)
    w = [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}]
    for method in ("task_arithmetic", "ties"):
        assert_close(run(method, [same, same, same], base, w), same)


def test_zero_weight_sum_with_normalize_divides_by_one():
    base = torch.zeros(2)
    x1, x2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    out = run(
        "task_arithmetic", [x1, x2], base, [{"weight": 1.0}, {"weight": -1.0}], normalize=True
    )
    assert_close(out, torch.tensor([-2.0, -2.0]))


def test_parent_aliasing_the_base_is_not_corrupted():
    base = torch.tensor([1.0, 2.0])
    fn = METHODS["task_arithmetic"].load()
    out = fn(
        [base, torch.tensor([3.0, 2.0])],
        base,
        TensorParams(NAME, {}, ({"weight": 1.0}, {"weight": 1.0})),
        None,
    )
    assert_close(out, torch.tensor([3.0, 2.0]))


def test_missing_base_and_missing_weight_are_errors():
    with pytest.raises(ValueError, match="needs a base"):
        METHODS["ties"].load()([torch.ones(2)], None, TensorParams(NAME, {}, ({},)), None)
    with pytest.raises(ValueError, match="weight"):
        run("ties", [torch.ones(2)], torch.zeros(2), [{}])


# --- TIES ------------------------------------------------------------------------------


def test_ties_sign_consensus_by_hand():
    base = torch.zeros(4)
    x1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
    x2 = torch.tensor([-1.0, 2.0, 0.5, 1.0])
    w = [{"weight": 1.0}, {"weight": 1.0}]
    # S = [2, 1, 1, -1]; kept x1 = [3, 0, .5, -2], x2 = [0, 2, .5, 0]; divisor [1, 1, 2, 1]
    assert_close(run("ties", [x1, x2], base, w), torch.tensor([3.0, 2.0, 0.5, -2.0]))
    assert_close(
        run("ties", [x1, x2], base, w, normalize=False), torch.tensor([3.0, 2.0, 1.0, -2.0])
    )


def test_ties_trim_with_tie_at_threshold_keeps_lowest_index():
    base = torch.zeros(4)
    x1 = torch.tensor([3.0, -1.0, 0.5, -2.0])  # top 2: [3, 0, 0, -2]
    x2 = torch.tensor([-1.0, 2.0, 0.5, 1.0])  # top 2: 2, then |−1| at index 0 beats index 3
    w = [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    # S = [2, 2, 0, -2] → signs [+, +, +, -]; x2's −1 disagrees; divisor 0 → 1
    assert_close(run("ties", [x1, x2], base, w), torch.tensor([3.0, 2.0, 0.0, -2.0]))


def test_ties_count_consensus_differs_from_sum():
    base = torch.zeros(1)
    xs = [torch.tensor([3.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    w = [{"weight": 1.0}] * 3
    assert_close(run("ties", xs, base, w), torch.tensor([3.0]))
    assert_close(run("ties", xs, base, w, consensus="count"), torch.tensor([-1.0]))


def test_ties_density_zero_gives_base_and_tiny_density_keeps_one():
    base = torch.ones(4)
    x = torch.tensor([2.0, 5.0, -1.0, 1.5])
    assert_close(run("ties", [x], base, [{"weight": 1.0, "density": 0.0}]), base)
    assert_close(
        run("ties", [x], base, [{"weight": 1.0, "density": 0.01}]),
        torch.tensor([1.0, 5.0, 1.0, 1.0]),
    )


def test_density_one_ties_with_agreeing_signs_equals_task_arithmetic():
    g = seeded()
    base = torch.randn(6, 9, generator=g)
    xs = [base + torch.rand(6, 9, generator=g) + 0.01 for _ in range(3)]
    w = [{"weight": 0.7}, {"weight": 0.2}, {"weight": 1.3}]
    assert_close(run("ties", xs, base, w), run("task_arithmetic", xs, base, w, normalize=True))


def test_ties_l1_rescale_restores_norm():
    base = torch.zeros(4)
    x = torch.tensor([4.0, -1.0, 2.0, 1.0])  # keep 4, 2 → × 8/6
    out = run("ties", [x], base, [{"weight": 1.0, "density": 0.5}], rescale=True)
    assert_close(out, torch.tensor([16 / 3, 0.0, 8 / 3, 0.0]))


# --- DARE ------------------------------------------------------------------------------


def test_dare_mask_is_sfc64_uniform_below_density_per_parent_and_block():
    import numpy as np

    g = seeded(7)
    base = torch.zeros(3, 5)
    xs = [torch.randn(3, 5, generator=g) for _ in range(2)]
    w = [{"weight": 1.0, "density": 0.4}, {"weight": 1.0, "density": 0.4}]
    outs = [
        run("dare_linear", [x], base, w[:1], seeded(99), rescale="none") for x in xs
    ]
    words = np.random.SFC64(np.random.SeedSequence([99, 0, 0])).random_raw(8)
    keep = torch.from_numpy(words.view("<u4")[:15] < np.uint32(int(0.4 * 2**32) + 1))
    assert_close(outs[0], xs[0] * keep.view(3, 5))
    assert_close(outs[1], xs[1] * keep.view(3, 5))  # parent 0 in both calls: same mask
    both = run("dare_linear", xs, base, w, seeded(99), rescale="none", normalize=False)
    words = np.random.SFC64(np.random.SeedSequence([99, 1, 0])).random_raw(8)
    keep1 = torch.from_numpy(words.view("<u4")[:15] < np.uint32(int(0.4 * 2**32) + 1))
    assert_close(both, xs[0] * keep.view(3, 5) + xs[1] * keep1.view(3, 5))


def test_dare_same_seed_deterministic_and_call_order_independent():
    g = seeded(3)
    base_a, base_b = torch.randn(64, 32, generator=g), torch.randn(16, generator=g)
    xs_a = [base_a + torch.randn(64, 32, generator=g) for _ in range(2)]
    xs_b = [base_b + torch.randn(16, generator=g) for _ in range(2)]
    w = [{"weight": 0.5, "density": 0.3}, {"weight": 0.5, "density": 0.6}]
    first_a = run("dare_ties", xs_a, base_a, w, seeded(11))
    first_b = run("dare_ties", xs_b, base_b, w, seeded(22))
    torch.manual_seed(0)  # the global RNG must play no part
    torch.rand(1000)
    second_b = run("dare_ties", xs_b, base_b, w, seeded(22))
    second_a = run("dare_ties", xs_a, base_a, w, seeded(11))
    assert torch.equal(first_a, second_a) and torch.equal(first_b, second_b)
    assert not torch.equal(first_a, run("dare_ties", xs_a, base_a, w, seeded(12)))


def test_dare_keep_fraction_and_rescale_modes():
    g = seeded(5)
    base = torch.zeros(200_000)
    x = torch.randn(200_000, generator=g)
    w = [{"weight": 1.0, "density": 0.3}]
    plain = run("dare_linear", [x], base, w, seeded(), rescale="none")
    kept = plain != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    assert_close(plain[kept], x[kept])
    inverse = run("dare_linear", [x], base, w, seeded(), rescale="inverse_density")
    assert_close(inverse, plain / 0.3)
    l1 = run("dare_linear", [x], base, w, seeded())  # default: mergekit's l1
    assert_close(l1, plain * (x.abs().sum() / plain.abs().sum()))
    assert torch.equal(l1, run("dare_linear", [x], base, w, seeded(), rescale=True))
    assert torch.equal(plain, run("dare_linear", [x], base, w, seeded(), rescale=False))


def test_dare_density_one_is_task_arithmetic_and_needs_no_draws():
    g = seeded()
    base = torch.randn(8, generator=g)
    xs = [torch.randn(8, generator=g) for _ in range(2)]
    w = [{"weight": 0.4}, {"weight": 0.9}]
    assert_close(run("dare_linear", xs, base, w, seeded()), run("task_arithmetic", xs, base, w))


def test_randomized_without_generator_is_an_engine_error():
    with pytest.raises(RuntimeError, match="generator"):
        run("dare_linear", [torch.ones(4)], torch.zeros(4), [{"weight": 1.0, "density": 0.5}])


def test_rescale_mode_names():
    assert [rescale_mode(v) for v in (True, False, "l1", "inverse_density", "none")] == [
        "l1",
        "none",
        "l1",
        "inverse_density",
        "none",
    ]
    with pytest.raises(ValueError, match="rescale must be"):
        rescale_mode("l2")


# --- breadcrumbs -----------------------------------------------------------------------


def _distinct_magnitudes(n=100):
    perm = torch.randperm(n, generator=seeded(8)).float() + 1  # magnitudes 1..n shuffled
    signs = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    return perm * signs


def test_breadcrumbs_drops_top_gamma_and_keeps_density():
    x = _distinct_magnitudes()
    out = run("breadcrumbs", [x], torch.zeros(100), [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    keep = (x.abs() > 40) & (x.abs() <= 90)  # ranks 10..59 from the top
    assert_close(out, x * keep)


def test_breadcrumbs_shrinks_outlier_cut_to_keep_density():
    x = _distinct_magnitudes()
    out = run("breadcrumbs", [x], torch.zeros(100), [{"weight": 1.0, "density": 0.8, "gamma": 0.3}])
    assert_close(out, x * (x.abs() <= 80))


def test_breadcrumbs_density_one_ignores_gamma_and_default_gamma():
    x = _distinct_magnitudes()
    assert_close(run("breadcrumbs", [x], torch.zeros(100), [{"weight": 1.0, "gamma": 0.2}]), x)
    out = run("breadcrumbs", [x], torch.zeros(100), [{"weight": 1.0, "density": 0.9}])
    # gamma 0.01 of 100 drops the single largest; the next 90 are kept
    assert_close(out, x * ((x.abs() >= 10) & (x.abs() <= 99)))


def test_breadcrumbs_ties_combines_sparsify_and_consensus():
    base = torch.zeros(4)
    x1 = torch.tensor([9.0, 3.0, -2.0, 1.0])  # drop top 1 (9), keep next 2: [0, 3, -2, 0]
    x2 = torch.tensor([-1.0, -9.0, 4.0, 2.0])  # drop 9, keep 4, 2: [0, 0, 4, 2]
    w = [{"weight": 1.0, "density": 0.5, "gamma": 0.25}] * 2
    # S = [0, 3, 2, 2] → all +; x1's −2 is dropped
    assert_close(run("breadcrumbs_ties", [x1, x2], base, w), torch.tensor([0.0, 3.0, 4.0, 2.0]))
    assert_close(
        run("breadcrumbs_ties", [x1, x2], base, w, normalize=True),
        torch.tensor([0.0, 3.0, 4.0, 2.0]),
    )


# --- DELLA -----------------------------------------------------------------------------


def della_probabilities(delta, density, epsilon):
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)
    m = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m).expand_as(order))
    return (density - epsilon + 2 * epsilon * ranks.float() / (m - 1)).view(delta.shape)


def test_della_mask_uses_per_row_rank_probabilities():
    x = torch.randn(3, 5, generator=seeded(4))
    out = run(
        "della_linear",
        [x],
        torch.zeros(3, 5),
        [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}],
        seeded(31),
        rescale="none",
    )
    p = della_probabilities(x, 0.5, 0.2)
    keep = torch.rand(3, 5, generator=seeded(31)) < p
    assert_close(out, x * keep)
    assert p.min().item() == pytest.approx(0.3) and p.max().item() == pytest.approx(0.7)


def test_della_keep_rate_follows_rank_in_each_row():
    # Every row ranks its columns the same way, so column j is kept with p_j in every row.
    rows = 4000
    x = torch.tensor([1.0, -5.0, 3.0, -2.0, 4.0]).repeat(rows, 1)
    out = run(
        "della_linear",
        [x],
        torch.zeros_like(x),
        [{"weight": 1.0, "density": 0.4, "epsilon": 0.1}],
        seeded(2),
        rescale="none",
    )
    rate = (out != 0).float().mean(dim=0)
    expected = torch.tensor([0.3, 0.5, 0.4, 0.35, 0.45])
    assert_close(rate, expected, atol=0.03, rtol=0)


def test_della_inverse_density_divides_by_own_probability():
    x = torch.randn(4, 6, generator=seeded(6))
    w = [{"weight": 1.0, "density": 0.5, "epsilon": 0.15}]
    plain = run("della_linear", [x], torch.zeros(4, 6), w, seeded(3), rescale="none")
    inverse = run("della_linear", [x], torch.zeros(4, 6), w, seeded(3), rescale="inverse_density")
    assert_close(inverse, plain / della_probabilities(x, 0.5, 0.15))


def test_della_epsilon_out_of_range_is_a_user_error():
    with pytest.raises(ValueError, match="density ± epsilon"):
        run(
            "della",
            [torch.ones(2, 3)],
            torch.zeros(2, 3),
            [{"weight": 1.0, "density": 0.9, "epsilon": 0.15}],
            seeded(),
        )


def test_della_single_column_rows_keep_with_density():
    x = torch.ones(4000, 1)
    out = run(
        "della_linear",
        [x],
        torch.zeros_like(x),
        [{"weight": 1.0, "density": 0.3, "epsilon": 0.1}],
        seeded(),
        rescale="none",
    )
    assert abs((out != 0).float().mean().item() - 0.3) < 0.03


def test_della_defaults_rescale_and_consensus():
    g = seeded(9)
    base = torch.randn(8, 16, generator=g)
    xs = [base + torch.randn(8, 16, generator=g) for _ in range(2)]
    w = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.6}]
    out = run("della", xs, base, w, seeded(1))
    assert torch.equal(
        out,
        run(
            "della",
            xs,
            base,
            w,
            seeded(1),
            rescale="l1",
            consensus="sum",
            normalize=True,
            epsilon=0.15,
        ),
    )


# --- agreement with mergekit -----------------------------------------------------------


@pytest.fixture(scope="module")
def mergekit_methods():
    pytest.importorskip(
        "mergekit.merge_methods.registry",
        reason="mergekit is not installed: agreement with mergekit 0.1.5 not checked",
    )
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    def merge(name, base, xs, globals_, per_parent):
        parameters = dict(globals_)
        for key in per_parent[0]:
            parameters[key] = [p[key] for p in per_parent]
        group = TensorGroup.from_tensors([base, *xs], base_index=0)
        return registry.get(name)([group], parameters=parameters)[0]

    return merge


@pytest.mark.parametrize(
    "method, globals_, per_parent",
    [
        ("task_arithmetic", {}, [{"weight": 0.5}, {"weight": 0.8}, {"weight": -0.3}]),
        (
            "task_arithmetic",
            {"normalize": True, "lambda": 1.5},
            [{"weight": 0.5}, {"weight": 0.8}, {"weight": -0.3}],
        ),
        (
            "ties",
            {},
            [
                {"weight": 0.5, "density": 0.3},
                {"weight": 0.8, "density": 0.6},
                {"weight": 0.3, "density": 0.9},
            ],
        ),
        (
            "ties",
            {"rescale": True, "normalize": False},
            [{"weight": 0.5, "density": 0.3}, {"weight": -0.8, "density": 0.6}],
        ),
        (
            "breadcrumbs",
            {},
            [
                {"weight": 0.5, "density": 0.3, "gamma": 0.05},
                {"weight": 0.8, "density": 0.6, "gamma": 0.1},
            ],
        ),
        (
            "breadcrumbs_ties",
            {"normalize": True},
            [
                {"weight": 0.5, "density": 0.3, "gamma": 0.05},
                {"weight": 0.8, "density": 0.6, "gamma": 0.1},
            ],
        ),
    ],
)
def test_deterministic_methods_match_mergekit(mergekit_methods, method, globals_, per_parent):
    g = seeded(42)
    base = torch.randn(64, 48, generator=g)  # continuous values: no magnitude ties
    xs = [base + 0.1 * torch.randn(64, 48, generator=g) for _ in per_parent]
    expected = mergekit_methods(method, base, xs, globals_, per_parent)
    assert_close(run(method, xs, base, per_parent, **globals_), expected)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_l1_rescale_matches_mergekit(mergekit_methods, method):
    """Same mask (ours, read back with rescale off); mergekit's rescale and combine."""
    from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor

    g = seeded(13)
    base = torch.randn(32, 16, generator=g)
    xs = [base + torch.randn(32, 16, generator=g) for _ in range(2)]
    densities = [0.3, 0.7]
    masks = [
        run("dare_linear", [x], base, [{"weight": 1.0, "density": d}], seeded(i), rescale="none")
        != base
        for i, (x, d) in enumerate(zip(xs, densities))
    ]
    rescaled = [
        base + rescaled_masked_tensor(x - base, m, RescaleNorm.l1) for x, m in zip(xs, masks)
    ]
    per_parent = [{"weight": 0.6}, {"weight": 0.9}]
    expected = mergekit_methods(
        method.replace("dare_", "").replace("linear", "task_arithmetic"),
        base,
        rescaled,
        {},
        per_parent,
    )
    ours = []
    for i, (x, d) in enumerate(zip(xs, densities)):
        ours.append(run("dare_linear", [x], base, [{"weight": 1.0, "density": d}], seeded(i)))
    assert_close(ours[0], rescaled[0])
    assert_close(ours[1], rescaled[1])
    combined = run(
        method.replace("dare_", "").replace("linear", "task_arithmetic"), ours, base, per_parent
    )
    assert_close(combined, expected)


def test_della_keep_probabilities_match_mergekit(mergekit_methods):
    """mergekit draws from the global RNG, so compare keep rates over many draws."""
    from mergekit.sparsify import SparsificationMethod, sparsify

    x = torch.tensor([[0.5, -4.0, 2.0, 1.0, -3.0], [6.0, 0.1, -0.2, 0.3, 0.4]])
    torch.manual_seed(0)
    runs = 3000
    rate = (
        sum(
            (sparsify(x, 0.5, SparsificationMethod.della_magprune, epsilon=0.2) != 0).float()
            for _ in range(runs)
        )
        / runs
    )
    assert_close(rate, della_probabilities(x, 0.5, 0.2), atol=0.04, rtol=0)


FAMILY = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
          "breadcrumbs_ties", "della", "della_linear"]


@pytest.mark.parametrize("name", FAMILY)
def test_the_family_bound_covers_every_value_the_kernel_computes(name):
    """Against the whole-tensor kernel, on parents of very different magnitudes, with the
    member's rescales, normalisation, λ and negative weights; where the bound gives up it
    says so (None) instead of a number that could be exceeded."""
    from mergebuild.methods.task_arithmetic.whole import bound

    method = METHODS[name]
    g = torch.Generator().manual_seed(7)
    base = torch.randn(64, 96, generator=g)
    sparse = method.settings.sparsifier is not None
    settings = [({}, [0.7, 0.5, 0.3]), ({"lambda": 1.7}, [0.2, 0.9, 0.4]),
                ({"normalize": True}, [1.0, -0.4, 0.6]), ({"normalize": False}, [0.5, 0.5, 2.0])]
    if sparse:
        settings += [({"rescale": "inverse_density"}, [0.6, 0.3, 0.1]),
                     ({"rescale": "none", "normalize": True}, [0.3, 0.3, 0.3]),
                     ({"rescale": "l1"}, [0.5, 0.5, 0.5])]
    proven = 0
    for trial, (globals_, weights) in enumerate(settings):
        parents = [base + torch.randn(64, 96, generator=g) * 10.0 ** k for k in (-2, 0, 1)]
        per_parent = [{"weight": w, **({"density": d} if sparse else {})}
                      for w, d in zip(weights, (0.3, 0.6, 0.8), strict=True)]
        params = TensorParams("w", globals_, tuple(per_parent))
        limit = bound([float(p.abs().max()) for p in parents], float(base.abs().max()), params,
                      method=method)
        out = method.load()([p.clone() for p in parents], base.clone(), params,
                            seeded(trial))
        if limit is None:
            assert globals_.get("rescale", method.value(globals_, "rescale")
                                if sparse else "none") in ("l1", True) or min(weights) < 0
            continue
        proven += 1
        assert float(out.abs().max()) <= limit, (globals_, weights)
    assert proven >= 2  # members rescaling by l1 by default (DARE's, DELLA) prove less
    with pytest.raises(ValueError, match="needs a base model"):
        bound([1.0], None, TensorParams("w", {}, ({"weight": 1.0},)), method=method)
