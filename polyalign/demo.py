"""``polyalign demo``: baseline eval -> MSD on-policy with LoRA -> eval -> report, offline.

Runs on the built-in benchmark (``polyalign/resources/benchmark.jsonl``): training uses its train
split, evaluation its disjoint eval split. Every stage writes to ``out/`` and is skipped on a rerun
when its output exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polyalign.data.records import atomic_write_text
from polyalign.train.msd_config import SELECTIVE_TEMPLATE


@dataclass
class DemoPlan:
    """What the demo runs. ``quick`` shrinks languages, prompts and steps to fit ~5 minutes."""

    eval_languages: list[str]
    train_languages: list[str]
    eval_limit: int
    max_new_tokens: int
    steps: int
    learning_rate: float
    batch_size: int = 4
    lora_r: int = 16
    gen_tokens: int = 48
    teacher_template: str = SELECTIVE_TEMPLATE   # the paper's template collapses a 0.5B model (docs/msd.md)
    benign_retain: bool = True                   # keep benign behaviour and language (docs/msd.md)
    extra: dict[str, Any] = field(default_factory=dict)


FULL = DemoPlan(eval_languages=["en", "zh", "th", "ar", "sw", "bn", "ko", "vi", "jv"],
                train_languages=["zh", "th", "ar", "sw"], eval_limit=8, max_new_tokens=24, steps=16,
                learning_rate=5e-5, gen_tokens=32)
QUICK = DemoPlan(eval_languages=["en", "zh", "th", "sw"], train_languages=["zh", "th", "sw"], eval_limit=4,
                 max_new_tokens=24, steps=6, learning_rate=5e-5, gen_tokens=24)


def demo_recipe(model: str, out: Path, plan: DemoPlan):
    from polyalign.train.recipes import DataSettings, Recipe

    return Recipe(method="msd", model=model, output_dir=str(out / "msd"),
                  data=DataSettings(source="builtin:harmful", benign_source="builtin:benign"),
                  msd={"mode": "on_policy", "divergence": "reverse_kl", "dpsw": True,
                       "student_languages": plan.train_languages, "max_new_tokens": plan.gen_tokens,
                       "teacher_template": plan.teacher_template,
                       "benign_target": "retain" if plan.benign_retain else "teacher"},
                  lora={"r": plan.lora_r, "alpha": 2 * plan.lora_r},
                  training={"max_steps": plan.steps, "learning_rate": plan.learning_rate,
                            "per_device_train_batch_size": plan.batch_size, "save_steps": max(1, plan.steps // 3),
                            "disable_tqdm": False})


def _evaluate(tag: str, model_spec: str, out: Path, plan: DemoPlan, model: Any, tok: Any,
              adapter: str | None) -> dict[str, dict[str, Any]]:
    from polyalign.eval.runner import EvalConfig, run_eval

    res = {}
    for task in ("builtin-harmful", "builtin-benign"):
        cfg = EvalConfig(model=model_spec, adapter=adapter, task=task, out=str(out / tag / task),
                         languages=plan.eval_languages, limit=plan.eval_limit, max_new_tokens=plan.max_new_tokens,
                         batch_size=16)   # the README's figures were measured at 16 (evaluation's default is 32)
        res[task] = run_eval(cfg, model=model, tokenizer=tok)
    return res


def run_demo(model: str = "builtin:qwen2.5-coder-0.5b-instruct", out: str | Path = "runs/demo", quick: bool = False,
             console: Any = None, plan: DemoPlan | None = None, dtype: str | None = None) -> dict[str, Any]:
    from rich.console import Console

    from polyalign.models import load_model, load_tokenizer
    from polyalign.models.adapters import load_with_adapter
    from polyalign.train.recipes import build_model, run_recipe

    console = console or Console()
    plan = plan or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}

    def stage(name: str):
        console.rule(f"[bold]{name}")
        return time.perf_counter()

    def done(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        atomic_write_text(out / "timings.json", json.dumps(timings, indent=1))
        console.print(f"[green]{name}[/green] done in {timings[name]:.0f} s")

    recipe = demo_recipe(model, out, plan)
    recipe.dtype = dtype
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(asdict(recipe), sort_keys=False, allow_unicode=True))

    t0 = stage("1/4 baseline evaluation")
    tok = load_tokenizer(model)
    base = load_model(model, dtype=dtype)
    before = _evaluate("baseline", model, out, plan, base, tok, None)
    done("baseline_eval", t0)

    final = out / "msd" / "final"
    t0 = stage("2/4 MSD on-policy training (LoRA)")
    if (final / "adapter_config.json").exists():
        console.print(f"found {final}: training already finished, reusing the adapter")
        trained = load_with_adapter(model, final, dtype=dtype)
    else:
        del base
        policy, tok = build_model(recipe)
        resume = any((out / "msd").glob("checkpoint-*"))
        final = run_recipe(recipe, resume=resume, model=policy, tokenizer=tok)
        trained = policy
        done("msd_training", t0)
    trained.eval()

    t0 = stage("3/4 evaluation of the trained adapter")
    after = _evaluate("trained", model, out, plan, trained, tok, str(final))
    done("trained_eval", t0)

    t0 = stage("4/4 report")
    summary = write_demo_report(out, before, after, plan, timings, console)
    done("report", t0)
    return summary


def demo_rows(before: dict, after: dict) -> list[dict[str, Any]]:
    rows = []
    hb, ha = before["builtin-harmful"]["languages"], after["builtin-harmful"]["languages"]
    bb, ba = before["builtin-benign"]["languages"], after["builtin-benign"]["languages"]
    for lang in hb:
        rows.append({"lang": lang, "asr_before": hb[lang]["asr"], "asr_after": ha[lang]["asr"],
                     "invalid_before": hb[lang]["invalid"], "invalid_after": ha[lang]["invalid"],
                     "harmful_refusal_before": hb[lang]["refusal"], "harmful_refusal_after": ha[lang]["refusal"],
                     "over_refusal_before": bb[lang]["refusal"], "over_refusal_after": ba[lang]["refusal"],
                     "fidelity_before": bb[lang]["fidelity"], "fidelity_after": ba[lang]["fidelity"]})
    return rows


def write_demo_report(out: Path, before: dict, after: dict, plan: DemoPlan, timings: dict, console: Any) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.table import Table

    rows = demo_rows(before, after)

    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"
    trained = set(plan.train_languages)
    table = Table(title="polyalign demo: before -> after MSD (built-in eval split)")
    for col in ("lang", "ASR", "invalid", "over-refusal (benign)", "benign answers in language"):
        table.add_column(col, justify="left" if col == "lang" else "right")
    for r in rows:
        mark = "" if r["lang"] in trained or r["lang"] == "en" else " (unseen)"
        table.add_row(r["lang"] + mark, f"{pct(r['asr_before'])} -> {pct(r['asr_after'])}",
                      f"{pct(r['invalid_before'])} -> {pct(r['invalid_after'])}",
                      f"{pct(r['over_refusal_before'])} -> {pct(r['over_refusal_after'])}",
                      f"{pct(r['fidelity_before'])} -> {pct(r['fidelity_after'])}")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "lang"}
    summary = {"rows": rows, "mean": mean, "timings": timings}
    md = ["# polyalign demo", "", f"Model `{before['builtin-harmful']['model']}`, MSD on-policy + LoRA, "
          f"{plan.steps} steps, trained languages: {', '.join(plan.train_languages)} (others unseen).", "",
          demo_markdown(summary), "", "![demo](demo.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))

    langs = [r["lang"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(langs) + 3), 3.6))
    for ax, key, title in ((axes[0], "asr", "attack success rate (harmful, lower is better)"),
                           (axes[1], "over_refusal", "over-refusal (benign, lower is better)")):
        x = range(len(langs))
        ax.bar([i - 0.2 for i in x], [100 * r[f"{key}_before"] for r in rows], 0.4, label="before")
        ax.bar([i + 0.2 for i in x], [100 * r[f"{key}_after"] for r in rows], 0.4, label="after MSD")
        ax.set_xticks(list(x), langs)
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=120)
    plt.close(fig)
    console.print(table)
    console.print(f"report: {out / 'report.md'}  plot: {out / 'demo.png'}")
    return summary


def demo_markdown(summary: dict[str, Any]) -> str:
    """The before -> after table of a demo summary (``summary.json``) as Markdown."""
    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    def cells(r: dict[str, float]) -> str:
        return " | ".join(f"{pct(r[f'{k}_before'])} → {pct(r[f'{k}_after'])}" for k in
                          ("harmful_refusal", "asr", "invalid", "over_refusal", "fidelity"))
    lines = ["| lang | harmful refused | ASR | invalid | benign refused (over-refusal) | benign answers in language |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['lang']} | {cells(r)} |" for r in summary["rows"]]
    lines += [f"| **mean** | {cells(summary['mean'])} |", "",
              "stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items())]
    return "\n".join(lines)
