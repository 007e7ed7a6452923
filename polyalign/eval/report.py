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


def markdown_table(results: dict[str, Any]) -> str:
    cols = COLUMNS[results["task_kind"]]
    lines = ["| language | " + " | ".join(label for _, label in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for lang, s in results["languages"].items():
        lines.append(f"| {lang} | " + " | ".join(_fmt(s.get(c)) for c, _ in cols) + " |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> None:
    summary = ", ".join(f"{k} {_fmt(v) if 'variance' not in k else f'{v:.4f}'}" for k, v in results["summary"].items())
    md = [f"# {results['task']} — {results['model']}" + (f" + {results['adapter']}" if results.get("adapter") else ""),
          "", f"judge: {results.get('judge')}; generated {results['generated']}, cached {results['cached']}", "",
          markdown_table(results), "", f"**summary**: {summary}", "", "![per-language](plot.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    plot_languages({"": results}, MAIN_METRIC[results["task_kind"]], out / "plot.png", results["task"])


def plot_languages(runs: dict[str, dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """Grouped bars: one group per language, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(dict.fromkeys(lang for r in runs.values() for lang in r["languages"]))
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(langs) + 2), 3.6))
    for i, (name, r) in enumerate(runs.items()):
        vals = [100 * r["languages"].get(lang, {}).get(metric, float("nan")) for lang in langs]
        ax.bar([x + i * width for x in range(len(langs))], vals, width, label=name or None)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(langs))], langs)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    if len(runs) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_results(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    cols = COLUMNS[results["task_kind"]]
    t = Table(title=f"{results['task']} — {results['model']}" + (" + adapter" if results.get("adapter") else ""))
    t.add_column("language")
    for _, label in cols:
        t.add_column(label, justify="right")
    for lang, s in results["languages"].items():
        t.add_row(lang, *[_fmt(s.get(c)) for c, _ in cols])
    console.print(t)
    console.print("summary: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in results["summary"].items()))
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
    from rich.table import Table

    a, b = load_results(run_a), load_results(run_b)
    if a["task_kind"] != b["task_kind"]:
        raise PolyalignError(f"cannot compare a {a['task_kind']} run with a {b['task_kind']} run")
    rows = comparison_rows(a, b)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {a['task']}: {run_a} vs {run_b}", "", "| language | metric | before | after | delta |", "|---|---|---|---|---|"]
    md += [f"| {lang} | {m} | {_fmt(x)} | {_fmt(y)} | {100 * d:+.1f} |" for lang, m, x, y, d in rows]
    md += ["", "![comparison](compare.png)", ""]
    paired = _paired(run_a, run_b, a["task_kind"])
    if paired:
        from polyalign.eval.paired import paired_markdown

        md += ["## Paired by prompt (95% intervals)", "", paired_markdown(paired), ""]
        atomic_write_text(out / "paired.json", json.dumps(paired, indent=1))
    atomic_write_text(out / "report.md", "\n".join(md))
    plot_languages({"before": a, "after": b}, MAIN_METRIC[a["task_kind"]], out / "compare.png", a["task"])
    if console is not None:
        t = Table(title=f"{a['task']}: before vs after")
        for col in ("language", "metric", "before", "after", "delta"):
            t.add_column(col, justify="left" if col in ("language", "metric") else "right")
        for lang, m, x, y, d in rows:
            color = "green" if (d < 0) == (m in ("asr", "unsafe", "invalid") or (m == "refusal" and a["task_kind"] != "safety")) else "red"
            t.add_row(lang, m, _fmt(x), _fmt(y), f"[{color}]{100 * d:+.1f}[/{color}]" if d else "0.0")
        console.print(t)
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
