"""Refusal per category, pooled over the non-English languages, for a baseline run and trained runs
(e.g. a sweep's seeds), as Markdown: whether a refusal is right depends on the category (docs/study.md).

    python scripts/category_table.py BASELINE_RUN RUN [RUN ...]
    python scripts/category_table.py runs/study_0.5b_bf16_seeds/baseline/xsafety \
        runs/study_0.5b_bf16_seeds/points/refuse_hint_32steps/seed{0,1,2}/eval/xsafety
"""

import sys

from polyalign.eval.report import load_results, pooled_by_category, render_table

if len(sys.argv) < 3:
    sys.exit(__doc__)
base, *runs = (pooled_by_category(load_results(p)) for p in sys.argv[1:])
rows = [[c, f"{100 * base[c]:.1f}", " / ".join(f"{100 * r[c]:.1f}" for r in runs),
         f"{100 * (sum(r[c] for r in runs) / len(runs) - base[c]):+.1f}"] for c in base]
print(render_table(["category", "baseline", "runs", "mean change (pp)"], rows))
