"""``polyalign`` command line: parse, build config, call library code. No logic lives here."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from polyalign.errors import PolyalignError

app = typer.Typer(help="Make a model that is safe in English safe in every language.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Inspect, convert, translate and build multilingual data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

Languages = Annotated[str | None, typer.Option(help="Comma-separated ISO 639-1 codes, e.g. 'th,sw,jv'.")]
Dtype = Annotated[str | None, typer.Option(
    help="auto | float32 | bfloat16 | float16. auto: bf16 on CUDA with bf16 or a CPU with AVX512-BF16/AMX, else fp32.")]
Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N. auto: CUDA when present.")]
Columns = Annotated[str | None, typer.Option(help="Your own CSV/JSONL: language=column pairs, e.g. "
                                                  "'en=question,th=q_th' (implies --format generic).")]


@data_app.command("inspect")
def data_inspect(path: Annotated[str, typer.Argument(help="Data file or folder (XSafety, MultiJail, MLC PKU, ...).")],
                 fmt: Annotated[str | None, typer.Option("--format", help="Loader name; default: detected.")] = None,
                 columns: Columns = None):
    """Print a languages x count table (and categories) for any supported source."""
    from rich.table import Table

    from polyalign.data import detect_format, load_source
    from polyalign.data.checks import breakdown, language_checks
    from polyalign.data.form import form_accuracy, split_counts
    from polyalign.text.languages import get_language

    fmt = "generic" if columns else fmt or detect_format(path)
    records = load_source(path, fmt, columns)
    checks = language_checks(records)
    # The summary is its own line: a table title wraps to the table's width, splitting long paths.
    console.print(f"{path}  ({fmt}: {len(records)} prompts)", soft_wrap=True)
    table = Table()
    for col in ("language", "name", "script", "tier", "prompts", "in script", "lang-ID agrees"):
        table.add_column(col, justify="left" if col in ("language", "name", "script", "tier") else "right")
    for lang, c in checks.items():
        info = get_language(lang)
        table.add_row(lang, info.name, info.script, info.tier, str(c["n"]), str(c["in_script"]),
                      f"{c['langid_agrees']}/{c['langid_confident']}")
    console.print(table)
    console.print("lang-ID agrees: of the texts the language-ID model is confident about (p >= 0.9)")
    for name, counts in breakdown(records).items():
        console.print(f"{name}: " + ", ".join(f"{k} ({n})" for k, n in counts.items()), soft_wrap=True)
    if any("split" in r.meta for r in records):
        console.print("split x category: " + "; ".join(
            f"{s} " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
            for s, counts in sorted(split_counts(records).items())), soft_wrap=True)
    form = form_accuracy(records)   # does form alone (first word, final mark, length) give the class away?
    if form:
        test = split_counts(records)["test"]
        console.print(f"form-only classifier (first word, final punctuation, length bucket; naive Bayes, "
                      f"English train -> English test): {form[0]:.1%} accurate on {form[1]} "
                      f"(majority class: {max(test.values()) / sum(test.values()):.1%})", soft_wrap=True)


@data_app.command("convert")
def data_convert(path: Annotated[str, typer.Argument(help="Source file or folder.")],
                 out: Annotated[Path, typer.Option(help="Canonical JSONL to write.")],
                 fmt: Annotated[str | None, typer.Option("--format", help="Loader name; default: detected.")] = None,
                 languages: Languages = None,
                 split: Annotated[str | None, typer.Option(help="Keep only train, dev or test (by prompt id).")] = None,
                 seed: int = 0, columns: Columns = None):
    """Write canonical parallel JSONL ({id, category, texts: {lang: text}, meta})."""
    from polyalign.data import (
        load_source,
        parse_language_list,
        select_languages,
        split_records,
        write_records,
    )

    records = select_languages(load_source(path, fmt, columns), parse_language_list(languages))
    if split:
        if split not in ("train", "dev", "test"):
            raise PolyalignError(f"--split must be train, dev or test, got {split!r}")
        records = split_records(records, seed=seed)[split]
    n = write_records(out, records)
    console.print(f"wrote {n} records to {out}")


@data_app.command("make-responses")
def data_make_responses(
    path: Annotated[str, typer.Argument(help="Parallel prompt source with English texts.")],
    out: Annotated[Path, typer.Option(help="JSONL to write (MLC SFT format: instruction, output, prompt_<lang>).")],
    model: Annotated[str, typer.Option(help="Model spec that writes the English responses.")] = "builtin:qwen2.5-coder-0.5b-instruct",
    fmt: Annotated[str | None, typer.Option("--format")] = None,
    languages: Languages = None,
    limit: Annotated[int | None, typer.Option(help="Use the first N prompts.")] = None,
    max_new_tokens: int = 128,
    batch_size: int = 32,
):
    """Generate English responses with the model itself (its English safety is already good), turning
    a parallel prompt set into SFT+MLC data with no external API. Resumable."""
    from polyalign.errors import require_positive
    from polyalign.train.make_responses import make_responses

    require_positive(limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size)
    n = make_responses(path, out, model, fmt=fmt, languages=languages, limit=limit,
                       max_new_tokens=max_new_tokens, batch_size=batch_size)
    console.print(f"{out}: {n} rows")


@data_app.command("translate")
def data_translate(
    path: Annotated[str, typer.Argument(help="English prompt set in any format the data layer reads.")],
    to: Annotated[str, typer.Option("--to", help="Target languages, e.g. th,sw,jv.")],
    translator: Annotated[str, typer.Option(help="openai:MODEL@BASE_URL | seq2seq:SPEC (NLLB/M2M) | chat:SPEC.")],
    out: Annotated[Path, typer.Option(help="Canonical parallel JSONL to write (resumable).")],
    back_translator: Annotated[str | None, typer.Option(help="Translator for round-trip similarity.")] = None,
    fmt: Annotated[str | None, typer.Option("--format")] = None,
    limit: Annotated[int | None, typer.Option(help="First N prompts.")] = None,
):
    """Translate English prompts into other languages; flags refusals, empty, untranslated and
    wrong-language outputs; prints a per-language quality report."""
    from rich.table import Table

    from polyalign.data import load_source
    from polyalign.data.translate import build_translator, translate_records
    from polyalign.errors import require_positive

    require_positive(limit=limit)
    records = load_source(path, fmt)[: limit or None]
    report = translate_records(records, to, build_translator(translator), out,
                               build_translator(back_translator) if back_translator else None)
    table = Table(title=f"translation quality -> {out}")
    for col in ("language", "n", "flagged", "flags", "length ratio", "round-trip chrF"):
        table.add_column(col)
    for lang, s in report.languages.items():
        table.add_row(lang, str(s["n"]), f"{100 * s['flagged']:.1f}%", json.dumps(s["flags"]),
                      "-" if s["length_ratio"] is None else f"{s['length_ratio']:.2f}",
                      "-" if s["roundtrip_chrf"] is None else f"{s['roundtrip_chrf']:.3f}")
    console.print(table)


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context,
          recipe: Annotated[str, typer.Argument(help="YAML recipe path, or a shipped recipe's name: msd_onpolicy, mlc_dpo, ...")],
          model: Annotated[str | None, typer.Option(help="Override the recipe's model spec.")] = None,
          output_dir: Annotated[Path | None, typer.Option(help="Override the recipe's output folder.")] = None,
          resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in the output folder.")] = False,
          dtype: Dtype = None):
    """Run a training recipe. Extra ``key=value`` arguments override recipe keys (dots for nesting)."""
    from polyalign.train.recipes import load_recipe, run_recipe

    overrides = list(ctx.args)
    if dtype:
        overrides.append(f"dtype={dtype}")
    if model:
        overrides.append(f"model={model}")
    if output_dir:
        overrides.append(f"output_dir={output_dir}")
    cfg = load_recipe(recipe, overrides)
    out = run_recipe(cfg, resume=resume)
    console.print(f"[green]done[/green]: {out}")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="Model spec: builtin:NAME, folder, .gguf or hub id.")],
    task: Annotated[str, typer.Option(help="Task name (`polyalign tasks` lists them).")] = "builtin-harmful",
    out: Annotated[Path, typer.Option(help="Run folder: results.json, generations.jsonl, report.md, plot.")] = Path("runs/eval"),
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter folder trained by polyalign.")] = None,
    data: Annotated[str | None, typer.Option(help="Path: point the task at a local file or the folder a data set ships as.")] = None,
    split: Annotated[str | None, typer.Option(help="train | dev | test | all (default dev; eval = dev): a record's meta.split, "
                                                   "else a hash of its prompt id.")] = None,
    columns: Columns = None,
    judge: Annotated[str, typer.Option(help="lexicon | llm:SPEC | guard:SPEC.")] = "lexicon",
    languages: Languages = None,
    limit: Annotated[int | None, typer.Option(help="At most N prompts per language.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: the task's own (mgsm 384, others 64).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generate call; default 32 on a CPU, "
                                                        "128 on a GPU, 512 with vllm.")] = None,
    backend: Annotated[str, typer.Option(help="hf | vllm")] = "hf",
    dtype: Dtype = None,
    device: Device = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (vLLM's engine seed too).")] = 0,
    vllm_tensor_parallel: Annotated[int, typer.Option(help="vllm: GPUs per engine; under accelerate launch the "
                                                           "ranks / this many engines split the prompts.")] = 1,
    vllm_gpu_memory_utilization: Annotated[float, typer.Option(help="vllm: share of each GPU the engine takes.")] = 0.9,
    vllm_max_lora_rank: Annotated[int | None, typer.Option(help="vllm: default the adapter's rank, rounded up.")] = None,
    vllm_max_model_len: Annotated[int | None, typer.Option(help="vllm: default the model's context length.")] = None,
):
    """Generate (resumable cache), judge, and write results.json, report.md and a per-language plot.

    Under ``accelerate launch`` the ranks split the prompts and the main process writes the files."""
    from polyalign.eval.runner import EvalConfig, run_eval

    cfg = EvalConfig(model=model, adapter=str(adapter) if adapter else None, task=task, data=data, split=split,
                     columns=columns, judge=judge,
                     languages=languages, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     backend=backend, out=str(out), dtype=dtype, device=device, seed=seed,
                     vllm_tensor_parallel=vllm_tensor_parallel, vllm_gpu_memory_utilization=vllm_gpu_memory_utilization,
                     vllm_max_lora_rank=vllm_max_lora_rank, vllm_max_model_len=vllm_max_model_len)
    results = run_eval(cfg)
    from polyalign.eval.report import print_results
    from polyalign.eval.runner import process_state

    state = process_state(cfg.device)
    if state.is_main_process:                        # one table, not one per rank
        print_results(results, console)
    state.wait_for_everyone()
    state.destroy_process_group()     # a launched rank that exits with gloo's threads alive can abort


@app.command("tasks")
def list_tasks():
    """List evaluation tasks and judges."""
    from polyalign.eval.judges import JUDGES
    from polyalign.eval.tasks import TASKS

    for name in TASKS.names():
        t = TASKS.get(name)
        console.print(f"{name:18s} {t.kind:7s} max_new_tokens {t.max_new_tokens:<4d} {t.description}", highlight=False)
    console.print("judges: " + ", ".join(JUDGES.names()))


@app.command("report")
def report(run_a: Annotated[Path, typer.Argument(help="Evaluation run folder (before).")],
           run_b: Annotated[Path | None, typer.Argument(help="Second run (after) to compare with.")] = None,
           out: Annotated[Path | None, typer.Option(help="Write the comparison (report.md + PNG) here.")] = None):
    """Show one run, or compare two side by side with deltas."""
    from polyalign.eval.report import compare_runs, load_results, print_results

    if run_b is None:
        print_results(load_results(run_a), console)
    else:
        compare_runs(run_a, run_b, out or run_b.parent / f"compare_{run_a.name}_vs_{run_b.name}", console)


@app.command("judge")
def judge_cmd(run_dir: Annotated[Path, typer.Argument(help="Evaluation run folder (judged.jsonl or generations.jsonl).")],
              judge: Annotated[str, typer.Option(help="lexicon | llm:SPEC | llm:openai:MODEL@URL | guard:SPEC.")],
              out: Annotated[Path | None, typer.Option(help="Output folder; default RUN_DIR/rejudged-<judge>.")] = None,
              task: Annotated[str | None, typer.Option(help="Task name, only for a run without results.json.")] = None):
    """Re-judge a run's existing responses (no generation, no policy model) into a new run folder."""
    from polyalign.eval.judge_check import rejudge
    from polyalign.eval.report import print_results

    results, folder = rejudge(run_dir, judge, out, task)
    print_results(results, console)
    console.print(f"written to {folder}", highlight=False)


@app.command("judge-check")
def judge_check(labels: Annotated[Path, typer.Argument(help="Hand-labelled JSONL: lang, prompt, response, label, refused.")],
                judge: Annotated[str, typer.Option(help="lexicon | llm:SPEC | llm:openai:MODEL@URL | guard:SPEC.")] = "lexicon",
                split: Annotated[str | None, typer.Option(help="Keep rows whose 'split' field equals this, e.g. heldout.")] = None,
                out: Annotated[Path | None, typer.Option(help="Also write the scores as JSON here.")] = None):
    """Agreement of a judge with hand labels per language (Wilson 95% intervals) and its confusion matrix."""
    from polyalign.data.records import atomic_write_text
    from polyalign.eval.judge_check import load_labels, print_judge_check, score_judge
    from polyalign.eval.judges import build_judge

    rows = load_labels(labels, split)
    report = score_judge(rows, build_judge(judge))
    print_judge_check(report, console)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(report, indent=1, ensure_ascii=False))
        console.print(f"written to {out}", highlight=False)


@app.command("sweep")
def sweep(spec: Annotated[Path, typer.Argument(help="Sweep spec YAML, e.g. recipes/sweeps/example.yaml.")],
          out: Annotated[Path | None, typer.Option(help="Override the spec's sweep folder.")] = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="List the points and a time estimate; run nothing.")] = False,
          summarize: Annotated[bool, typer.Option("--summarize", help="Only summarise the points evaluated so far.")] = False,
          only: Annotated[list[str] | None, typer.Option(help="Run only this config (every seed); repeatable.")] = None,
          seed: Annotated[list[int] | None, typer.Option(help="Run only this seed of each point; repeatable.")] = None,
          finalist: Annotated[bool, typer.Option(help="Also run the spec's finalist_eval (--no-finalist: leave "
                                                      "it for a later run into the same folder).")] = True,
          baseline: Annotated[bool, typer.Option(help="Evaluate the untrained model first (--no-baseline: leave "
                                                      "it, and the summary, for a later run into the same "
                                                      "folder).")] = True,
          final: Annotated[bool, typer.Option("--final", help="Allow the test split: the one final evaluation "
                                              "of chosen recipes (sweeps choose on dev).")] = False):
    """Train and evaluate a grid of recipe overrides x seeds (resumable); sweep.csv + Pareto plot."""
    from polyalign.sweep import load_sweep, run_sweep, summarize_finished

    if summarize:
        summarize_finished(load_sweep(spec), out=out, console=console)
    else:
        run_sweep(load_sweep(spec), out=out, dry_run=dry_run, console=console, only=only, final=final,
                  seeds=seed, finalist=finalist, baseline=baseline)


@app.command("probe")
def probe(model: Annotated[str, typer.Option(help="Model spec.")],
          adapter: Annotated[Path | None, typer.Option(help="Adapter folder to compare with the base model.")] = None,
          data: Annotated[str, typer.Option(help="Parallel source.")] = "builtin:harmful",
          languages: Languages = None, limit: int = 32, layer: int | None = None,
          out: Annotated[Path | None, typer.Option(help="Also write the figures to this JSON file.")] = None,
          dtype: Dtype = None, device: Device = None):
    """Cross-language representation similarity (what MLC optimises) for a model, before vs after."""
    from polyalign.eval.probe import run_probe

    run_probe(model, str(adapter) if adapter else None, data, languages, limit, layer, console,
              str(out) if out else None, dtype=dtype, device=device)


@app.command("demo")
def demo(quick: Annotated[bool, typer.Option(help="Smaller run: 4 languages, 6 steps of 4.")] = False,
         model: Annotated[str, typer.Option(help="Model spec.")] = "builtin:qwen2.5-coder-0.5b-instruct",
         out: Annotated[Path, typer.Option(help="Demo folder.")] = Path("runs/demo"),
         dtype: Dtype = None):
    """Baseline eval -> MSD on-policy with LoRA -> eval -> report.md + PNG, on the built-in benchmark."""
    from polyalign.demo import run_demo

    run_demo(model=model, out=out, quick=quick, console=console, dtype=dtype)


@app.command("export")
def export(adapter: Annotated[Path, typer.Argument(help="Adapter folder trained by polyalign.")],
           out: Annotated[Path, typer.Option(help="Merged safetensors model folder to write.")],
           model: Annotated[str | None, typer.Option(help="Base model spec; default: from the checkpoint.")] = None,
           results: Annotated[list[Path] | None, typer.Option(
               "--results", help="Evaluation run folder whose per-language table goes into the model card "
                                 "(repeat for several).")] = None,
           gguf: Annotated[bool, typer.Option(help="Also write model.gguf (needs llama.cpp's convert_hf_to_gguf.py "
                                                   "on PATH).")] = False):
    """Merge a LoRA adapter into its base model and save a safetensors folder with a model card."""
    from polyalign.export import export_merged

    console.print(f"wrote {export_merged(adapter, out, model, results=results, gguf=gguf)}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except PolyalignError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted; finished work is saved and a rerun continues from it")
        sys.exit(130)


if __name__ == "__main__":
    main()
