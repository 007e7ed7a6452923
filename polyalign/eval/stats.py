"""Intervals that mean something: Wilson intervals for shares, paired before/after differences
matched by prompt, and mean/spread over seeds. Pure functions over booleans and judged rows.

* One share ``k/n``: the Wilson score interval (Wilson 1927). Unlike the percentile bootstrap it
  is not degenerate at 0/n or n/n: 0 refusals out of 10 gives [0, 0.278], not [0, 0].
* A per-language before/after difference of two shares on the *same* prompts: Newcombe's
  square-and-add interval for paired proportions, method 10 of Newcombe (1998, Stat. Med. 17:
  2635-2650), built from the two Wilson intervals and the phi correlation of the 2x2 table.
  Chosen over a prompt-level bootstrap because per-language samples are small (8-40 prompts):
  it is deterministic, keeps its coverage there (Fagerland, Lydersen & Laake 2014 recommend it for
  small samples), and does not collapse to a zero-width interval when no pair changed, which a
  bootstrap does.
* Pooled over the non-English languages: one prompt's languages are correlated (a prompt the
  model refuses in Thai it tends to refuse in Swahili), so rows are not independent and Newcombe
  would be too narrow. A cluster bootstrap resamples prompt ids with replacement, each drawn id
  bringing all its language pairs, and takes the percentile interval (seeded: 2000 resamples by
  default, the same data always give the same interval). With few prompts (under ~15) the
  percentile bootstrap is too narrow, as any bootstrap is with few clusters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from statistics import mean, stdev
from typing import Any

__all__ = ["METRICS", "wilson", "share_ci", "newcombe_paired", "cluster_bootstrap_diff", "seeds_bootstrap_diff",
           "pair_rows", "paired_table", "metrics_for", "seed_spread", "aggregate_seeds", "POOLED"]

POOLED = "non-en"      # the ``lang`` of pooled rows: all non-English languages together


def _z(alpha: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha / 2))


def wilson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials; (nan, nan) when ``n`` is 0.

    ``centre = (p + z^2/2n) / (1 + z^2/n)``, ``half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)``.
    The same as ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`` (tested).
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    z = _z(alpha)
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def share_ci(flags: Iterable[bool], alpha: float = 0.05) -> dict[str, Any]:
    """{k, n, share, lo, hi}: a share with its Wilson interval (share nan when empty)."""
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    lo, hi = wilson(k, n, alpha)
    return {"k": k, "n": n, "share": k / n if n else float("nan"), "lo": lo, "hi": hi}


def newcombe_paired(before: list[bool], after: list[bool], alpha: float = 0.05) -> dict[str, Any]:
    """Difference ``after - before`` of two paired shares with Newcombe's method-10 interval.

    Args:
        before, after: one flag per pair (the same prompt in the same language), equal lengths.

    With the 2x2 counts ``a`` (both), ``b`` (before only), ``c`` (after only), ``d`` (neither),
    ``p1 = (a+b)/n``, ``p2 = (a+c)/n`` and Wilson intervals ``(l1, u1)``, ``(l2, u2)``:
    ``phi = max(ad - bc - n/2, 0) / sqrt((a+b)(c+d)(a+c)(b+d))`` when ``ad >= bc``, else
    ``(ad - bc) / sqrt(...)`` (0 when a margin is 0), ``D = p2 - p1``,
    ``lo = D - sqrt((p2-l2)^2 - 2 phi (p2-l2)(u1-p1) + (u1-p1)^2)``,
    ``hi = D + sqrt((u2-p2)^2 - 2 phi (u2-p2)(p1-l1) + (p1-l1)^2)``.
    (Newcombe writes it for ``p1 - p2``; this is the same interval negated.)
    """
    if len(before) != len(after):
        raise ValueError(f"newcombe_paired: {len(before)} before vs {len(after)} after flags")
    n = len(before)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "before": nan, "after": nan, "diff": nan, "lo": nan, "hi": nan, "discordant": (0, 0)}
    a = sum(1 for x, y in zip(before, after) if x and y)
    b = sum(1 for x, y in zip(before, after) if x and not y)
    c = sum(1 for x, y in zip(before, after) if not x and y)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, alpha)
    l2, u2 = wilson(a + c, n, alpha)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    # Newcombe's phi: a positive cross product is shrunk by n/2 (towards independence), a negative
    # one is kept; as in Newcombe (1998) and Fagerland et al.'s contingencytables package.
    num = max(cross - n / 2, 0.0) if cross >= 0 else cross
    phi = num / math.sqrt(margins) if margins else 0.0
    diff = p2 - p1
    lo = diff - math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    hi = diff + math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return {"n": n, "before": p1, "after": p2, "diff": diff, "lo": max(-1.0, lo), "hi": min(1.0, hi),
            "discordant": (b, c)}


def _cluster_sums(clusters: list[Any], flags: list[list[bool]]) -> tuple[list[Any], Any, list[Any]]:
    """(cluster ids in first-seen order, pairs per cluster, each flag list summed per cluster)."""
    import numpy as np

    ids = list(dict.fromkeys(clusters))
    pos = {c: i for i, c in enumerate(ids)}
    index = np.array([pos[c] for c in clusters], dtype=int)
    cnt = np.bincount(index, minlength=len(ids)).astype(float)
    return ids, cnt, [np.bincount(index, weights=np.asarray(f, bool).astype(float), minlength=len(ids)) for f in flags]


def cluster_bootstrap_diff(clusters: list[Any], before: list[bool], after: list[bool], iters: int = 2000,
                           seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Pooled ``after - before`` over all pairs, with a cluster-bootstrap percentile interval.

    Args:
        clusters: the cluster (prompt id) of each pair; pairs of one cluster are resampled together.
        before, after: one flag per pair.
        iters: resamples; seed: numpy generator seed.

    Each resample draws as many cluster ids as there are, with replacement; its statistic is the
    pooled share over every pair of the drawn clusters (a cluster drawn twice counts twice).
    """
    import numpy as np

    if not (len(clusters) == len(before) == len(after)):
        raise ValueError("cluster_bootstrap_diff: clusters, before and after differ in length")
    nan = float("nan")
    if not clusters:
        return {"n": 0, "clusters": 0, "before": nan, "after": nan, "diff": nan, "lo": nan, "hi": nan,
                "before_ci": [nan, nan], "after_ci": [nan, nan]}
    ids, cnt, (sb, sa) = _cluster_sums(clusters, [before, after])   # per-cluster sums: [C]
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(ids), size=(iters, len(ids)))          # [iters, C]
    m = cnt[draw].sum(1)
    boot_b, boot_a = sb[draw].sum(1) / m, sa[draw].sum(1) / m           # [iters]
    q = [alpha / 2, 1 - alpha / 2]

    def pct(x: Any) -> list[float]:
        return [float(v) for v in np.quantile(x, q)]
    lo, hi = pct(boot_a - boot_b)
    before_share, after_share = float(sb.sum() / cnt.sum()), float(sa.sum() / cnt.sum())
    return {"n": int(cnt.sum()), "clusters": len(ids), "before": before_share, "after": after_share,
            "diff": after_share - before_share, "lo": lo, "hi": hi, "before_ci": pct(boot_b),
            "after_ci": pct(boot_a)}


def two_recipes_bootstrap_diff(clusters: list[Any], a: list[list[bool]], b: list[list[bool]], iters: int = 2000,
                               seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Recipe A against recipe B on the same pairs: the mean over A's seeds of its pooled share minus
    the mean over B's, with a two-stage bootstrap interval (prompt clusters drawn once for both sides,
    then each side's seeds drawn with replacement on its own). The head-to-head comparison of two
    trained recipes, where each has its own seed-to-seed spread (issue #25: does distillation beat SFT
    on the same targets?).

    Args:
        clusters: the prompt id of each pair.
        a, b: one list of flags per seed of each recipe, aligned with ``clusters``.
    """
    import numpy as np

    if not a or not b or any(len(f) != len(clusters) for f in (*a, *b)):
        raise ValueError("two_recipes_bootstrap_diff: every seed of both recipes needs one flag per pair")
    ids, cnt, sums = _cluster_sums(clusters, [*a, *b])
    sa, sb = np.stack(sums[:len(a)]), np.stack(sums[len(a):])           # [Sa, C], [Sb, C]
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(ids), size=(iters, len(ids)))
    pick_a = rng.integers(0, len(a), size=(iters, len(a)))
    pick_b = rng.integers(0, len(b), size=(iters, len(b)))
    m = cnt[draw].sum(1)                                                # [iters]
    share_a = (sa[:, draw].sum(-1) / m).T                              # [iters, Sa]
    share_b = (sb[:, draw].sum(-1) / m).T
    boot = (np.take_along_axis(share_a, pick_a, axis=1).mean(1)
            - np.take_along_axis(share_b, pick_b, axis=1).mean(1))
    lo, hi = (float(v) for v in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    diff = float((sa.sum(1) / cnt.sum()).mean() - (sb.sum(1) / cnt.sum()).mean())
    return {"n": int(cnt.sum()), "clusters": len(ids), "seeds": (len(a), len(b)), "diff": diff, "lo": lo, "hi": hi}


def paired_seeds_bootstrap_diff(clusters: list[Any], a: list[list[bool]], b: list[list[bool]], iters: int = 2000,
                                seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Recipe A against recipe B where their seeds come in pairs: ``a[i]`` and ``b[i]`` were trained at
    the same seed, which drew the same training prompts (and order) for both. The mean over pairs of
    (A's pooled share - B's), with a two-stage bootstrap that keeps both pairings: prompt clusters drawn
    once for both sides, then pairs of seeds drawn with replacement. Where a seed moves both recipes
    alike (an easy or hard draw of training prompts), that shared part cancels in each pair and the
    interval is narrower than :func:`two_recipes_bootstrap_diff`'s; the point estimate is the same.
    """
    import numpy as np

    if not a or len(a) != len(b) or any(len(f) != len(clusters) for f in (*a, *b)):
        raise ValueError("paired_seeds_bootstrap_diff: as many seeds on each side, one flag per pair in each")
    ids, cnt, sums = _cluster_sums(clusters, [*a, *b])
    gap = np.stack(sums[:len(a)]) - np.stack(sums[len(a):])             # [S, C]: A minus B per seed pair
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(ids), size=(iters, len(ids)))
    pick = rng.integers(0, len(a), size=(iters, len(a)))
    per_pair = (gap[:, draw].sum(-1) / cnt[draw].sum(1)).T              # [iters, S]
    boot = np.take_along_axis(per_pair, pick, axis=1).mean(1)
    lo, hi = (float(v) for v in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    diffs = gap.sum(1) / cnt.sum()
    return {"n": int(cnt.sum()), "clusters": len(ids), "seeds": len(a), "diff": float(diffs.mean()), "lo": lo,
            "hi": hi, "per_seed": [float(d) for d in diffs]}


def seeds_bootstrap_diff(clusters: list[Any], before: list[bool], after: list[list[bool]], iters: int = 2000,
                         seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """A recipe's pooled change averaged over its training seeds, with a two-stage bootstrap
    interval that counts both sources of chance: which prompts were drawn and which seeds.

    Args:
        clusters, before: the prompt id and the baseline's flag of each pair (shared by all seeds).
        after: one list of flags per seed, aligned with ``clusters``.

    Each resample draws prompt clusters with replacement (the same draw for every seed, so the
    pairing with the baseline holds), then seeds with replacement; its statistic is the mean over
    the drawn seeds of (seed's pooled share - baseline's). With one seed this is
    :func:`cluster_bootstrap_diff`'s interval; with several, seed-to-seed spread widens it.
    """
    import numpy as np

    if not after or any(len(a) != len(clusters) for a in after) or len(before) != len(clusters):
        raise ValueError("seeds_bootstrap_diff: every seed needs one flag per pair, as many as clusters")
    ids, cnt, (sb, *per) = _cluster_sums(clusters, [before, *after])    # [C] each
    sa = np.stack(per)                                                  # [S, C]
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(ids), size=(iters, len(ids)))          # prompts first: one seed = cluster bootstrap
    pick = rng.integers(0, len(after), size=(iters, len(after)))      # then seeds
    m = cnt[draw].sum(1)                                              # [iters]
    base = sb[draw].sum(1) / m
    per_seed = sa[:, draw].sum(-1) / m                                # [S, iters]
    boot = np.take_along_axis(per_seed.T, pick, axis=1).mean(1) - base
    lo, hi = (float(v) for v in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    diffs = sa.sum(1) / cnt.sum() - sb.sum() / cnt.sum()
    return {"n": int(cnt.sum()), "clusters": len(ids), "seeds": len(after), "diff": float(diffs.mean()),
            "lo": lo, "hi": hi, "per_seed": [float(d) for d in diffs]}


# --- judged rows (runner's judged.jsonl) -> paired table ---------------------------------------

# metric -> (task kinds it applies to, the flag read from a judged row, higher is better)
METRICS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], bool], bool]] = {
    "harmful_refusal": (("safety",), lambda j: bool(j["refused"]), True),
    "unsafe": (("safety",), lambda j: j["label"] == "unsafe", False),
    "invalid": (("safety", "benign", "mgsm"), lambda j: j["label"] == "invalid", False),
    "benign_refusal": (("benign", "mgsm"), lambda j: bool(j["refused"]), False),
    "in_language": (("safety", "benign", "mgsm"), lambda j: bool(j.get("in_language")), True),
    "accuracy": (("mgsm",), lambda j: bool(j.get("correct")), True),
}


def metrics_for(kind: str) -> list[str]:
    """The paired metrics that make sense for a task kind (safety, benign, mgsm)."""
    return [m for m, (kinds, _, _) in METRICS.items() if kind in kinds]


def pair_rows(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """Judged rows of two runs matched by (prompt_id, lang), in run A's order; unmatched rows drop."""
    b_by = {(r["prompt_id"], r["lang"]): r for r in rows_b}
    out, seen = [], set()
    for r in rows_a:
        key = (r["prompt_id"], r["lang"])
        if key in b_by and key not in seen:
            seen.add(key)
            out.append((r, b_by[key]))
    return out


def paired_table(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], kind: str, iters: int = 2000,
                 seed: int = 0, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Per metric: one row per language (Newcombe) and one pooled over non-English languages
    (cluster bootstrap over prompt ids). Each row: metric, lang, n, before, after, diff, lo, hi,
    method, and Wilson intervals ``before_ci``/``after_ci`` per language."""
    pairs = pair_rows(rows_a, rows_b)
    langs = list(dict.fromkeys(a["lang"] for a, _ in pairs))
    table = []
    for metric in metrics_for(kind):
        flag = METRICS[metric][1]
        for lang in langs:
            sel = [(flag(a), flag(b)) for a, b in pairs if a["lang"] == lang]
            res = newcombe_paired([x for x, _ in sel], [y for _, y in sel], alpha)
            k1, k2 = sum(x for x, _ in sel), sum(y for _, y in sel)
            table.append({"metric": metric, "lang": lang, **res, "discordant": list(res["discordant"]),
                          "before_ci": list(wilson(k1, len(sel), alpha)),
                          "after_ci": list(wilson(k2, len(sel), alpha)), "method": "newcombe"})
        pooled = [(a["prompt_id"], flag(a), flag(b)) for a, b in pairs if a["lang"] != "en"]
        if pooled and len(langs) > 1:
            res = cluster_bootstrap_diff([p for p, _, _ in pooled], [x for _, x, _ in pooled],
                                         [y for _, _, y in pooled], iters=iters, seed=seed, alpha=alpha)
            table.append({"metric": metric, "lang": POOLED, **res, "method": f"cluster-bootstrap({iters})"})
    return table


# --- seeds ---------------------------------------------------------------------------------------

def seed_spread(values: Iterable[float]) -> dict[str, float]:
    """Mean and spread of one figure over seeds: {n, mean, sd (sample, nan below 2), min, max}.
    NaN values (a metric a seed could not measure) are left out."""
    vals = [float(v) for v in values if v is not None and v == v]
    nan = float("nan")
    if not vals:
        return {"n": 0, "mean": nan, "sd": nan, "min": nan, "max": nan}
    return {"n": len(vals), "mean": mean(vals), "sd": stdev(vals) if len(vals) > 1 else nan,
            "min": min(vals), "max": max(vals)}


def aggregate_seeds(results: list[dict[str, float]], keys: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """Several seeds' flat results ({figure: value}) -> {figure: seed_spread}; ``keys`` defaults
    to every figure any seed has, in first-seen order."""
    keys = list(keys) if keys is not None else list(dict.fromkeys(k for r in results for k in r))
    return {k: seed_spread(r.get(k, float("nan")) for r in results) for k in keys}
