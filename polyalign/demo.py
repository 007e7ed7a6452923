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


@dataclass
class DemoPlan:
    """What the demo runs: a shipped recipe (plain data) with overrides, and the evaluation's size.
    ``quick`` shrinks languages, prompts and steps (a smoke run of the real model)."""

    eval_languages: list[str]
    eval_limit: int                       # prompts per language and task (harmful, benign)
    max_new_tokens: int
    recipe: str = "msd_selective"         # the study's finalist (docs/study.md)
    overrides: list[str] = field(default_factory=list)
    # Rows per generate call. Decoding on a CPU reads every weight once per token whatever the rows, so
    # 128 rows (each task's 144 prompts in two calls) took 41.5 s where 32 took 52.5 s (bf16, an Intel
    # Xeon with AMX, 2026-12-06, benchmarks/eval_batch_size.py). The study's sweeps generate 32 at a
    # time; in bf16 the batch moves some greedy tokens (the same refusal verdict for 282 of 288
    # baseline prompts), so the demo's baseline is the study's only up to that.
    eval_batch_size: int = 128


FULL = DemoPlan(eval_languages=["en", "zh", "th", "ar", "sw", "bn", "ko", "vi", "jv"], eval_limit=16,
                max_new_tokens=40)
QUICK = DemoPlan(eval_languages=["en", "zh", "th", "sw"], eval_limit=4, max_new_tokens=24,
                 overrides=["max_steps=6", "per_device_train_batch_size=4", "save_steps=2", "data.limit=8",
                            "data.benign_limit=8", "msd.max_new_tokens=24", "msd.student_languages=[zh, th, sw]",
                            "msd.benign_languages=[zh, th, sw]", "msd.language_hint=[zh, th]",
                            "msd.retain_languages=[sw]"])
# the demo before commit e0983df, 2026-12-03 (docs/msd.md runs 1-8): its recipe, 8 prompts per language, 24 tokens, batch 16
V1 = DemoPlan(eval_languages=FULL.eval_languages, eval_limit=8, max_new_tokens=24, recipe="msd_demo_v1",
              eval_batch_size=16)


def demo_recipe(model: str, out: Path, plan: DemoPlan, dtype: str | None = None):
    from polyalign.train.recipes import load_recipe

    recipe = load_recipe(plan.recipe, [f"model={model}", f"output_dir={out / 'msd'}", *plan.overrides])
    recipe.dtype = dtype
    recipe.training["disable_tqdm"] = False
    return recipe


def _evaluate(tag: str, model_spec: str, out: Path, plan: DemoPlan, model: Any, tok: Any,
              adapter: str | None) -> dict[str, dict[str, Any]]:
    from polyalign.eval.runner import EvalConfig, run_eval

    res = {}
    for task in ("builtin-harmful", "builtin-benign"):
        cfg = EvalConfig(model=model_spec, adapter=adapter, task=task, out=str(out / tag / task),
                         languages=plan.eval_languages, limit=plan.eval_limit, max_new_tokens=plan.max_new_tokens,
                         batch_size=plan.eval_batch_size)
        res[task] = run_eval(cfg, model=model, tokenizer=tok)
    return res


def run_demo(model: str = "builtin:qwen2.5-coder-0.5b-instruct", out: str | Path = "runs/demo", quick: bool = False,
             console: Any = None, plan: DemoPlan | None = None, dtype: str | None = None) -> dict[str, Any]:
    from rich.console import Console

    from polyalign.models import load_model, load_tokenizer
    from polyalign.models.adapters import load_with_adapter
    from polyalign.models.loading import model_dtype
    from polyalign.train.recipes import build_model, model_options, precision, run_recipe

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

    recipe = demo_recipe(model, out, plan, dtype)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(asdict(recipe), sort_keys=False, allow_unicode=True))

    t0 = stage("1/4 baseline evaluation")
    tok = load_tokenizer(model)
    base = load_model(model, dtype=dtype, **model_options(recipe))
    before = _evaluate("baseline", model, out, plan, base, tok, None)
    done("baseline_eval", t0)

    final = out / "msd" / "final"
    t0 = stage("2/4 MSD on-policy training (LoRA)")
    if (final / "adapter_config.json").exists():
        console.print(f"found {final}: training already finished, reusing the adapter")
        trained = load_with_adapter(model, final, dtype=dtype)
    else:
        # the base just evaluated, in the recipe's dtype and unwritten, becomes the policy (no second load)
        same = model_dtype(base) == precision(recipe)[0]
        if not same:
            del base
        policy, tok = build_model(recipe, base=base if same else None)
        resume = any((out / "msd").glob("checkpoint-*"))
        final = run_recipe(recipe, resume=resume, model=policy, tokenizer=tok)
        trained = policy
        done("msd_training", t0)
    trained.eval()

    t0 = stage("3/4 evaluation of the trained adapter")
    after = _evaluate("trained", model, out, plan, trained, tok, str(final))
    done("trained_eval", t0)

    t0 = stage("4/4 report")
    summary = write_demo_report(out, before, after, recipe, timings, console)
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


def write_demo_report(out: Path, before: dict, after: dict, recipe: Any, timings: dict, console: Any) -> dict:
    from polyalign.eval.report import bar_chart, render_table

    rows = demo_rows(before, after)
    trained = set(recipe.msd["student_languages"])
    header = ["lang", "ASR", "invalid", "over-refusal (benign)", "benign answers in language"]
    cells = [[r["lang"] + ("" if r["lang"] in trained or r["lang"] == "en" else " (unseen)"),
              *[_change(r, k) for k in ("asr", "invalid", "over_refusal", "fidelity")]] for r in rows]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "lang"}
    summary = {"rows": rows, "mean": mean, "timings": timings}
    md = ["# polyalign demo", "", f"Model `{before['builtin-harmful']['model']}`, MSD on-policy + LoRA "
          f"(`recipe.yaml`), {recipe.training['max_steps']} steps of {recipe.training['per_device_train_batch_size']}, "
          f"trained languages: {', '.join(sorted(trained))} (others unseen).", "",
          demo_markdown(summary), "", "![demo](demo.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))

    def series(key: str) -> dict[str, dict[str, float]]:
        return {"before": {r["lang"]: 100 * r[f"{key}_before"] for r in rows},
                "after MSD": {r["lang"]: 100 * r[f"{key}_after"] for r in rows}}
    bar_chart(out / "demo.png", [("attack success rate (harmful, lower is better)", series("asr")),
                                 ("over-refusal (benign, lower is better)", series("over_refusal"))])
    console.print(render_table(header, cells, "polyalign demo: before -> after MSD (built-in eval split)", "rich"))
    console.print(f"report: {out / 'report.md'}  plot: {out / 'demo.png'}")
    return summary


def _change(r: dict[str, float], key: str, arrow: str = "->") -> str:
    return f"{100 * r[f'{key}_before']:.0f}% {arrow} {100 * r[f'{key}_after']:.0f}%"


def demo_markdown(summary: dict[str, Any]) -> str:
    """The before -> after table of a demo summary (``summary.json``) as Markdown."""
    from polyalign.eval.report import render_table

    keys = ("harmful_refusal", "asr", "invalid", "over_refusal", "fidelity")
    header = ["lang", "harmful refused", "ASR", "invalid", "benign refused (over-refusal)", "benign answers in language"]
    rows = [[r["lang"], *[_change(r, k, "→") for k in keys]] for r in summary["rows"]]
    rows.append(["**mean**", *[_change(summary["mean"], k, "→") for k in keys]])
    return "\n".join([render_table(header, rows), "",
                      "stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items())])
