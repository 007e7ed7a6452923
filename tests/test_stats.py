"""polyalign.eval.stats: Wilson, Newcombe paired, cluster bootstrap, paired tables, seeds."""

import math

import pytest
from scipy.stats import binomtest

from polyalign.eval.stats import (
    POOLED,
    aggregate_seeds,
    cluster_bootstrap_diff,
    newcombe_paired,
    paired_table,
    seed_spread,
    seeds_bootstrap_diff,
    share_ci,
    wilson,
)

Z = 1.959963984540054


def test_wilson_zero_of_ten_by_hand():
    """0/10: centre = (z^2/20) / (1 + z^2/10) = 0.19207 / 1.38415 = 0.13877;
    half = z / 1.38415 * sqrt(z^2 / 400) = 1.41600 * 0.09800 = 0.13877 -> [0, 0.2775]."""
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert 1 - wilson(10, 10)[0] == pytest.approx(hi)          # symmetric at n/n


def test_wilson_three_of_ten_by_hand():
    """3/10: centre = (0.3 + 0.19207) / 1.38415 = 0.35550; half = 1.41600 * sqrt(0.021 + 0.0096037)
    = 1.41600 * 0.17494 = 0.24771 -> [0.1078, 0.6032]."""
    lo, hi = wilson(3, 10)
    assert (lo, hi) == (pytest.approx(0.1078, abs=1e-4), pytest.approx(0.6032, abs=1e-4))


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (3, 10), (17, 40), (40, 40), (123, 1000)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(method="wilson")
    assert wilson(k, n) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))


def test_wilson_empty_and_bad_counts():
    assert all(math.isnan(x) for x in wilson(0, 0))
    with pytest.raises(ValueError, match="k <= n"):
        wilson(11, 10)
    s = share_ci([True, False, False, False])
    assert (s["k"], s["n"], s["share"]) == (1, 4, 0.25) and s["lo"] < 0.25 < s["hi"]


def test_newcombe_paired_by_hand_negative_correlation():
    """n = 10 pairs: a = 2 both, b = 1 before only, c = 5 after only, d = 2 neither.
    p1 = 0.3, p2 = 0.7, D = 0.4. Wilson: (l1, u1) = (0.10779, 0.60322), (l2, u2) = (0.39678, 0.89221).
    ad - bc = 4 - 5 = -1 < 0, so phi = -1 / sqrt(3*7*7*3) = -1/21.
    lo = 0.4 - sqrt(0.30322^2 + 2/21 * 0.30322 * 0.30322 + 0.30322^2) = 0.4 - sqrt(0.19264) = -0.0389
    hi = 0.4 + sqrt(0.19221^2 + 2/21 * 0.19221 * 0.19221 + 0.19221^2) = 0.4 + sqrt(0.077408) = 0.6782
    """
    before = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    after = [1, 1, 0, 1, 1, 1, 1, 1, 0, 0]
    r = newcombe_paired(before, after)
    assert r["discordant"] == (1, 5)
    assert (r["before"], r["after"], r["diff"]) == (pytest.approx(0.3), pytest.approx(0.7), pytest.approx(0.4))
    assert r["lo"] == pytest.approx(-0.0389, abs=2e-4) and r["hi"] == pytest.approx(0.6782, abs=2e-4)


def test_newcombe_paired_by_hand_positive_correlation_shrunk():
    """a = 5, b = 1, c = 1, d = 3: p1 = p2 = 0.6, Wilson (0.31267, 0.83182). ad - bc = 14 > n/2, so
    phi = (14 - 5) / sqrt(6*4*6*4) = 0.375. Half width = sqrt(0.28733^2 - 0.75 * 0.28733 * 0.23182
    + 0.23182^2) = sqrt(0.086343) = 0.2938, the same on both sides."""
    r = newcombe_paired([1] * 5 + [1, 0] + [0] * 3, [1] * 5 + [0, 1] + [0] * 3)
    assert r["diff"] == 0 and r["lo"] == pytest.approx(-0.2938, abs=2e-4) and r["hi"] == pytest.approx(0.2938, abs=2e-4)


def test_newcombe_no_change_still_has_width_and_bounds():
    r = newcombe_paired([True] * 4 + [False] * 4, [True] * 4 + [False] * 4)
    assert r["diff"] == 0 and r["lo"] < 0 < r["hi"]
    everything = newcombe_paired([False] * 8, [True] * 8)     # every pair flipped
    assert everything["diff"] == 1 and 0 < everything["lo"] < 1 and everything["hi"] == 1
    with pytest.raises(ValueError):
        newcombe_paired([True], [True, False])
    assert math.isnan(newcombe_paired([], [])["diff"])


def test_cluster_bootstrap_is_seeded_and_wider_for_correlated_languages():
    # 20 prompts x 3 languages; a prompt flips in all its languages or in none (fully correlated).
    clusters = [p for p in range(20) for _ in range(3)]
    before = [False] * 60
    after = [p < 8 for p in clusters]
    a = cluster_bootstrap_diff(clusters, before, after, iters=2000, seed=0)
    assert a == cluster_bootstrap_diff(clusters, before, after, iters=2000, seed=0)
    assert (a["n"], a["clusters"], a["diff"]) == (60, 20, pytest.approx(0.4))
    assert a["lo"] < 0.4 < a["hi"]
    naive = cluster_bootstrap_diff(list(range(60)), before, after, iters=2000, seed=0)  # rows as if independent
    assert (a["hi"] - a["lo"]) > 1.4 * (naive["hi"] - naive["lo"])     # ~sqrt(3) wider
    same = cluster_bootstrap_diff(clusters, after, after)
    assert same["lo"] == same["hi"] == 0


def _seeds_reference(clusters, before, after, iters, seed, alpha=0.05):
    """seeds_bootstrap_diff by explicit loops in float64, replaying the same generator draws."""
    import numpy as np

    ids = list(dict.fromkeys(clusters))
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(ids), size=(iters, len(ids)))
    pick = rng.integers(0, len(after), size=(iters, len(after)))
    stats = []
    for i in range(iters):
        rows = [j for c in draw[i] for j, cl in enumerate(clusters) if cl == ids[c]]
        base = sum(before[j] for j in rows) / len(rows)
        stats.append(sum(sum(after[s][j] for j in rows) / len(rows) for s in pick[i]) / len(after) - base)
    stats.sort()
    diffs = [sum(a) / len(a) - sum(before) / len(before) for a in after]
    return sum(diffs) / len(diffs), float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


def test_seeds_bootstrap_matches_loops_and_one_seed_is_the_cluster_bootstrap():
    import random

    r = random.Random(3)
    clusters = [p for p in range(12) for _ in range(2)]
    before = [r.random() < 0.3 for _ in clusters]
    after = [[r.random() < q for _ in clusters] for q in (0.4, 0.6, 0.5)]
    got = seeds_bootstrap_diff(clusters, before, after, iters=300, seed=5)
    want = _seeds_reference(clusters, before, after, iters=300, seed=5)
    assert (got["diff"], got["lo"], got["hi"]) == pytest.approx(want, abs=1e-12)
    assert got["seeds"] == 3 and len(got["per_seed"]) == 3 and got["n"] == 24 and got["clusters"] == 12
    one = seeds_bootstrap_diff(clusters, before, after[:1], iters=500, seed=1)
    ref = cluster_bootstrap_diff(clusters, before, after[0], iters=500, seed=1)
    assert (one["diff"], one["lo"], one["hi"]) == pytest.approx((ref["diff"], ref["lo"], ref["hi"]), abs=1e-12)


def test_seeds_bootstrap_widens_with_seed_spread():
    clusters = list(range(40))
    before = [False] * 40
    agree = [[p < 12 for p in clusters]] * 2                          # both seeds +30
    split = [[p < 4 for p in clusters], [p < 20 for p in clusters]]  # +10 and +50: the same mean
    a, b = (seeds_bootstrap_diff(clusters, before, x, iters=2000, seed=0) for x in (agree, split))
    assert a["diff"] == pytest.approx(0.3) and b["diff"] == pytest.approx(0.3)
    assert (b["hi"] - b["lo"]) > 1.5 * (a["hi"] - a["lo"])
    with pytest.raises(ValueError, match="one flag per pair"):
        seeds_bootstrap_diff(clusters, before, [[True]])


def _rows(flags: dict[tuple[str, str], bool], key: str = "refused") -> list[dict]:
    return [{"prompt_id": p, "lang": lang, "label": "safe" if v else "unsafe", "refused": v, "in_language": True}
            for (p, lang), v in flags.items()]


def test_paired_table_matches_by_prompt_and_language():
    langs = ("en", "th", "sw")
    before = _rows({(f"p{i}", lang): i < 2 for i in range(6) for lang in langs})
    after = _rows({(f"p{i}", lang): i < 4 or lang == "en" for i in range(6) for lang in langs})
    after = after[::-1] + [{"prompt_id": "extra", "lang": "th", "label": "safe", "refused": True, "in_language": True}]
    table = paired_table(before, after, "safety", iters=500)
    assert {r["metric"] for r in table} == {"harmful_refusal", "unsafe", "invalid", "in_language"}
    by = {(r["metric"], r["lang"]): r for r in table}
    th = by["harmful_refusal", "th"]
    assert th["n"] == 6 and th["discordant"] == [0, 2] and th["diff"] == pytest.approx(2 / 6)
    assert th["method"] == "newcombe" and th["before_ci"] == list(wilson(2, 6))
    en = by["harmful_refusal", "en"]
    assert en["diff"] == pytest.approx(4 / 6)
    pooled = by["harmful_refusal", POOLED]
    assert (pooled["n"], pooled["clusters"]) == (12, 6) and pooled["diff"] == pytest.approx(4 / 12)
    assert pooled["method"].startswith("cluster-bootstrap")
    assert by["unsafe", "th"]["diff"] == pytest.approx(-2 / 6)
    benign = paired_table(before, after, "benign", iters=100)
    assert {r["metric"] for r in benign} == {"benign_refusal", "invalid", "in_language"}


def test_seed_spread_and_aggregate():
    s = seed_spread([0.1, 0.3])
    assert s["mean"] == pytest.approx(0.2) and s["sd"] == pytest.approx(0.1414214) and s["n"] == 2
    one = seed_spread([0.5, float("nan")])
    assert one["n"] == 1 and math.isnan(one["sd"]) and one["mean"] == 0.5
    agg = aggregate_seeds([{"x": 1.0, "y": 2.0}, {"x": 3.0}])
    assert agg["x"]["mean"] == 2.0 and agg["y"]["n"] == 1


def test_two_recipes_bootstrap_matches_loops():
    """two_recipes_bootstrap_diff by explicit loops in float64, replaying the same generator draws;
    a recipe against itself is 0 with a zero-width interval when each side has one seed."""
    import random

    import numpy as np

    from polyalign.eval.stats import two_recipes_bootstrap_diff

    r = random.Random(4)
    clusters = [p for p in range(10) for _ in range(3)]
    a = [[r.random() < q for _ in clusters] for q in (0.5, 0.7, 0.4)]
    b = [[r.random() < q for _ in clusters] for q in (0.3, 0.35)]
    got = two_recipes_bootstrap_diff(clusters, a, b, iters=200, seed=7)
    ids = list(dict.fromkeys(clusters))
    rng = np.random.default_rng(7)
    draw = rng.integers(0, len(ids), size=(200, len(ids)))
    pick_a = rng.integers(0, 3, size=(200, 3))
    pick_b = rng.integers(0, 2, size=(200, 2))
    stats = []
    for i in range(200):
        rows = [j for c in draw[i] for j, cl in enumerate(clusters) if cl == ids[c]]
        mean_a = sum(sum(a[s][j] for j in rows) / len(rows) for s in pick_a[i]) / 3
        mean_b = sum(sum(b[s][j] for j in rows) / len(rows) for s in pick_b[i]) / 2
        stats.append(mean_a - mean_b)
    diff = sum(sum(f) / len(f) for f in a) / 3 - sum(sum(f) / len(f) for f in b) / 2
    want = (diff, float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975)))
    assert (got["diff"], got["lo"], got["hi"]) == pytest.approx(want, abs=1e-12)
    assert got["seeds"] == (3, 2) and got["n"] == 30 and got["clusters"] == 10
    same = two_recipes_bootstrap_diff(clusters, a[:1], a[:1])
    assert same["diff"] == same["lo"] == same["hi"] == 0


def test_paired_seeds_bootstrap_matches_loops_and_cancels_what_a_seed_moves_alike():
    """paired_seeds_bootstrap_diff by explicit loops in float64, replaying the same generator draws;
    where each seed moves both recipes by the same amount, the pairs cancel it and the interval is
    narrower than the unpaired one around the same estimate."""
    import random

    import numpy as np

    from polyalign.eval.stats import paired_seeds_bootstrap_diff, two_recipes_bootstrap_diff

    r = random.Random(5)
    clusters = [p for p in range(12) for _ in range(3)]
    a = [[r.random() < q for _ in clusters] for q in (0.5, 0.7, 0.4)]
    b = [[r.random() < q for _ in clusters] for q in (0.3, 0.6, 0.35)]
    got = paired_seeds_bootstrap_diff(clusters, a, b, iters=200, seed=7)
    ids = list(dict.fromkeys(clusters))
    rng = np.random.default_rng(7)
    draw = rng.integers(0, len(ids), size=(200, len(ids)))
    pick = rng.integers(0, 3, size=(200, 3))
    stats = []
    for i in range(200):
        rows = [j for c in draw[i] for j, cl in enumerate(clusters) if cl == ids[c]]
        stats.append(sum(sum(a[s][j] for j in rows) / len(rows) - sum(b[s][j] for j in rows) / len(rows)
                         for s in pick[i]) / 3)
    diffs = [sum(a[s]) / len(clusters) - sum(b[s]) / len(clusters) for s in range(3)]
    want = (sum(diffs) / 3, float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975)))
    assert (got["diff"], got["lo"], got["hi"]) == pytest.approx(want, abs=1e-12)
    assert got["per_seed"] == pytest.approx(diffs) and got["seeds"] == 3 and got["n"] == 36
    # seeds that move both sides alike: B is A with the same 6 prompts' flags turned off in every seed
    levels = [[r.random() < q for _ in clusters] for q in (0.9, 0.5, 0.1)]
    off = set(r.sample(range(len(clusters)), 6))
    lowered = [[f and j not in off for j, f in enumerate(seed_flags)] for seed_flags in levels]
    paired = paired_seeds_bootstrap_diff(clusters, levels, lowered, iters=500)
    unpaired = two_recipes_bootstrap_diff(clusters, levels, lowered, iters=500)
    assert paired["diff"] == pytest.approx(unpaired["diff"]) and paired["diff"] > 0
    assert paired["hi"] - paired["lo"] < 0.5 * (unpaired["hi"] - unpaired["lo"])
    with pytest.raises(ValueError, match="as many seeds"):
        paired_seeds_bootstrap_diff(clusters, a, b[:2])
