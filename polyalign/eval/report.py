"""Reports a person wants to look at: terminal tables, report.md and per-language bar charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from polyalign.data.records import atomic_write_text
from polyalign.errors import PolyalignError

COLUMNS = {  # task kind -> (column, label) shown per language
    "safety": [("n", "n"), ("asr", "ASR"), ("unsafe", "unsafe"), ("invalid", "invalid"), ("refusal", "refused"),
               ("fidelity", "in language")],
    "benign": [("n", "n"), ("refusal", "over-refusal"), ("invalid", "invalid"), ("fidelity", "in language")],
    "mgsm": [("n", "n"), ("accuracy", "accuracy"), ("refusal", "refused"), ("fidelity", "in language")],
    "mmlu": [("n", "n"), ("accuracy", "accuracy")],
}
MAIN_METRIC = {"safety": "asr", "benign": "refusal", "mgsm": "accuracy", "mmlu": "accuracy"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{100 * v:.1f}%"
    return str(v)


def load_results(run: str | Path) -> dict[str, Any]:
    f = Path(run) / "results.json"
    if not f.exists():
        raise PolyalignError(f"{run}: no results.json (not an evaluation run folder)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise PolyalignError(f"{f}: invalid JSON ({e.msg})") from None


def language_rows(languages: dict[str, dict[str, Any]], columns: list[tuple[str, str]]) -> list[list[str]]:
    """One row of formatted cells per language: ``[lang, cell, ...]`` for the given (key, label) columns."""
    return [[lang, *[_fmt(s.get(c)) for c, _ in columns]] for lang, s in languages.items()]


def render_table(header: list[str], rows: list[list[str]], title: str | None = None, style: str = "markdown") -> Any:
    """The one table renderer: Markdown text (``style="markdown"``) or a rich ``Table`` (``"rich"``).

    Every per-language table (report.md, the terminal, the model card, the demo) goes through here,
    so a column change shows up the same way everywhere.
    """
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    from rich.table import Table

    t = Table(title=title)
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    return t


def results_table(results: dict[str, Any], style: str = "markdown") -> Any:
    """Per-language table of one evaluation's results, with the task kind's columns."""
    cols = COLUMNS[results["task_kind"]]
    title = f"{results['task']} — {results['model']}" + (" + adapter" if results.get("adapter") else "")
    return render_table(["language", *[label for _, label in cols]], language_rows(results["languages"], cols),
                        title, style)


def category_table(results: dict[str, Any], metric: str = "refusal", style: str = "markdown") -> Any:
    """``metric`` per category (rows) and language (columns), with the count per cell; None when the
    run has a single category. Whether refusing is right depends on the category (docs/study.md)."""
    cats = results.get("categories") or {}
    if not cats:
        return None
    langs = list(results["languages"])
    rows = [[c, *[f"{_fmt(per[lang][metric])} ({per[lang]['n']})" if lang in per else "" for lang in langs]]
            for c, per in cats.items()]
    return render_table(["category", *langs], rows, f"{results['task']}: {metric} by category", style)


def pooled_by_category(results: dict[str, Any], metric: str = "refusal", english: bool = False) -> dict[str, float]:
    """Per category, ``metric`` averaged over the languages (English left out unless ``english``)."""
    out = {}
    for c, per in (results.get("categories") or {}).items():
        vals = [s[metric] for lang, s in per.items() if (english or lang != "en") and isinstance(s.get(metric), float)]
        if vals:
            out[c] = sum(vals) / len(vals)
    return out


def write_report(results: dict[str, Any], out: Path) -> None:
    summary = ", ".join(f"{k} {_fmt(v) if 'variance' not in k else f'{v:.4f}'}" for k, v in results["summary"].items())
    md = [f"# {results['task']} — {results['model']}" + (f" + {results['adapter']}" if results.get("adapter") else ""),
          "", f"judge: {results.get('judge')}; generated {results['generated']}, cached {results['cached']}", "",
          results_table(results), "", f"**summary**: {summary}", "", "![per-language](plot.png)", ""]
    by_cat = category_table(results)
    if by_cat is not None:
        md += ["## Refused, by category (n per cell)", "", by_cat, ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    plot_languages({"": results}, MAIN_METRIC[results["task_kind"]], out / "plot.png", results["task"])


def bar_chart(path: Path, panels: list[tuple[str, dict[str, dict[str, float]]]], ylabel: str = "%") -> None:
    """The one bar-chart renderer: side-by-side panels of grouped bars, saved as a PNG.

    Args:
        panels: (title, {series name: {language: value in percent}}) per panel; one group of bars
            per language, one bar per series (an unnamed single series gets no legend).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(dict.fromkeys(lang for _, series in panels for s in series.values() for lang in s))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5, 0.8 * len(langs) + 2) * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        width = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            ax.bar([x + i * width for x in range(len(langs))], [values.get(lang, float("nan")) for lang in langs],
                   width, label=name or None)
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(langs))], langs)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 100)
        ax.set_title(title, fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_languages(runs: dict[str, dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """Grouped bars of ``metric`` (%): one group per language, one bar per run."""
    series = {name: {lang: 100 * s.get(metric, float("nan")) for lang, s in r["languages"].items()}
              for name, r in runs.items()}
    bar_chart(path, [(title, series)], ylabel=f"{metric} (%)")


def print_results(results: dict[str, Any], console: Any) -> None:
    console.print(results_table(results, style="rich"))
    console.print("summary: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in results["summary"].items()))
    by_cat = category_table(results, style="rich")
    if by_cat is not None:
        console.print(by_cat)
    console.print(f"generated {results['generated']}, cached {results['cached']}")


def comparison_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, float, float, float]]:
    """(language, metric, before, after, delta) for the columns both runs share."""
    rows = []
    for lang in dict.fromkeys([*a["languages"], *b["languages"]]):
        sa, sb = a["languages"].get(lang, {}), b["languages"].get(lang, {})
        for c, _ in COLUMNS[a["task_kind"]]:
            if c != "n" and isinstance(sa.get(c), float) and isinstance(sb.get(c), float):
                rows.append((lang, c, sa[c], sb[c], sb[c] - sa[c]))
    return rows


def compare_runs(run_a: str | Path, run_b: str | Path, out: str | Path, console: Any = None) -> Path:
    a, b = load_results(run_a), load_results(run_b)
    if a["task_kind"] != b["task_kind"]:
        raise PolyalignError(f"cannot compare a {a['task_kind']} run with a {b['task_kind']} run")
    rows = comparison_rows(a, b)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = ["language", "metric", "before", "after", "delta"]
    md = [f"# {a['task']}: {run_a} vs {run_b}", "",
          render_table(header, [[lang, m, _fmt(x), _fmt(y), f"{100 * d:+.1f}"] for lang, m, x, y, d in rows]),
          "", "![comparison](compare.png)", ""]
    before, after = pooled_by_category(a), pooled_by_category(b)
    if before and after:
        md += ["## Refused, by category (mean over non-English languages)", "",
               render_table(["category", "before", "after", "delta"],
                            [[c, _fmt(before[c]), _fmt(after[c]), f"{100 * (after[c] - before[c]):+.1f}"]
                             for c in before if c in after]), ""]
    paired = _paired(run_a, run_b, a["task_kind"])
    if paired:
        from polyalign.eval.paired import paired_markdown

        md += ["## Paired by prompt (95% intervals)", "", paired_markdown(paired), ""]
        atomic_write_text(out / "paired.json", json.dumps(paired, indent=1))
    atomic_write_text(out / "report.md", "\n".join(md))
    plot_languages({"before": a, "after": b}, MAIN_METRIC[a["task_kind"]], out / "compare.png", a["task"])
    if console is not None:
        def delta(m: str, d: float) -> str:
            lower_better = m in ("asr", "unsafe", "invalid") or (m == "refusal" and a["task_kind"] != "safety")
            color = "green" if (d < 0) == lower_better else "red"
            return f"[{color}]{100 * d:+.1f}[/{color}]" if d else "0.0"
        console.print(render_table(header, [[lang, m, _fmt(x), _fmt(y), delta(m, d)] for lang, m, x, y, d in rows],
                                   f"{a['task']}: before vs after", style="rich"))
        if paired:
            from polyalign.eval.paired import paired_console

            paired_console(paired, console, f"{a['task']}: paired by prompt, after - before")
        console.print(f"written to {out}/report.md")
    return out


def _paired(run_a: str | Path, run_b: str | Path, kind: str) -> list[dict[str, Any]]:
    """The paired table when both runs kept their judged rows (runs of judged tasks do)."""
    if not ((Path(run_a) / "judged.jsonl").exists() and (Path(run_b) / "judged.jsonl").exists()):
        return []
    from polyalign.eval.paired import paired_runs

    return paired_runs(run_a, run_b, kind)
