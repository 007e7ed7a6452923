"""The user-facing docs, step by step: README "Using it", docs/own-data.md, docs/gpu.md.
(docs/languages.md is tests/test_text.py::test_adding_a_language_is_one_entry.)"""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def using_it_lines() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("  #")[0]) for line in block.strip().splitlines()]


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_readme_lines_work_in_a_clone(tmp_path, monkeypatch):
    """Every file a line names is in the repository, the train line writes the adapter the eval
    line reads, the recipe and overrides bind, and the eval tasks exist; the cheap lines run."""
    from polyalign.cli import app
    from polyalign.eval.tasks import get_task
    from polyalign.train.recipes import load_recipe

    lines = using_it_lines()
    assert all(argv[0] == "polyalign" for argv in lines)
    monkeypatch.chdir(ROOT)
    adapters = {option(a, "--adapter") for a in lines if a[1] == "eval"} - {None}
    written = set()
    for argv in lines:
        for arg in argv[2:]:
            if "/" in arg and not arg.startswith(("builtin:", "runs/")) and "=" not in arg:
                assert (ROOT / arg).exists(), f"{arg} is not in a clone"
        if argv[1] == "train":
            overrides = [a for a in argv[3:] if "=" in a and not a.startswith("--")]
            recipe = load_recipe(argv[2], overrides)
            out = option(argv, "--output-dir") or recipe.output_dir
            written.add(f"{out}/final")
        if argv[1] == "eval":
            get_task(option(argv, "--task") or "builtin-harmful")
    assert adapters <= written, f"eval reads {adapters}, train writes {written}"

    from typer.testing import CliRunner

    out = tmp_path / "bench_train.jsonl"
    for argv in lines:
        if argv[1] in ("data", "tasks"):
            argv = [str(out) if a == "bench_train.jsonl" else a for a in argv[1:]]
            res = CliRunner().invoke(app, argv)
            assert res.exit_code == 0, res.output
    assert out.exists()


def test_own_data_doc(tmp_path, tiny):
    from polyalign.data import load_source, read_records, split_records, write_records
    from polyalign.data.builtin import load_prompts
    from polyalign.eval.runner import EvalConfig, run_eval

    doc = (ROOT / "docs" / "own-data.md").read_text()
    assert "--columns en=question,th=q_th,sw=q_sw" in doc
    mine = tmp_path / "mine.csv"
    mine.write_text("question,q_th,q_sw\n" + "".join(f"How do I pick lock {i}?,ฉันจะสะเดาะกุญแจ {i},"
                                                    f"Ninawezaje kufungua kufuli {i}?\n" for i in range(40)))
    records = load_source(mine, None, "en=question,th=q_th,sw=q_sw")
    write_records(tmp_path / "mine.jsonl", records)
    model, tok = tiny
    res = run_eval(EvalConfig(model="builtin:tiny-random", task="parallel", data=str(tmp_path / "mine.jsonl"),
                              out=str(tmp_path / "run"), limit=2, max_new_tokens=4), model=model, tokenizer=tok)
    assert set(res["languages"]) == {"en", "th", "sw"} and res["languages"]["th"]["n"] == 2
    train = load_prompts(str(tmp_path / "mine.jsonl"), None, "train", None)
    test = run_eval(EvalConfig(model="builtin:tiny-random", task="builtin-harmful", data=str(mine),
                               columns="en=question,th=q_th,sw=q_sw", split="test", languages="en",
                               out=str(tmp_path / "t"), max_new_tokens=2), model=model, tokenizer=tok)
    # training refuses the test split, so its ids come from the split itself
    test_ids = {r.id for r in split_records(read_records(tmp_path / "mine.jsonl"))["test"]}
    assert test["languages"]["en"]["n"] == len(test_ids) and not test_ids & {r.id for r in train}


def test_gpu_doc(tmp_path, monkeypatch):
    import torch

    from polyalign.errors import PolyalignError
    from polyalign.eval.runner import EvalConfig, run_eval
    from polyalign.train.recipes import load_recipe, precision, training_arguments

    doc = (ROOT / "docs" / "gpu.md").read_text()
    assert "--backend vllm" in doc and "dtype=bfloat16" in doc
    r = load_recipe("msd_onpolicy", ["dtype=bfloat16", "per_device_train_batch_size=16",
                                     f"output_dir={tmp_path}"])
    assert r.dtype == "bfloat16"
    args = training_arguments(r)
    assert args.use_cpu == (not torch.cuda.is_available())
    # LoRA: bf16 base weights, fp32 adapter, no autocast; full fine-tuning: fp32 master weights with
    # bf16 autocast (recipes.precision). On an H200 (2026-12-04) this line read bf16 == CUDA, and failed.
    assert not args.bf16 and precision(dataclasses.replace(r, lora=None)) == ("float32", True)

    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *a, **k):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("no vllm")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(PolyalignError, match=re.escape("pip install 'polyalign[vllm]'")):
        run_eval(EvalConfig(model="builtin:tiny-random", backend="vllm", out=str(tmp_path / "v"), limit=1))


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_gpu_doc_one_bf16_lora_step_on_the_gpu(tmp_path):
    from polyalign.train.recipes import DataSettings, Recipe, run_recipe

    r = Recipe(method="msd", model="builtin:tiny-random", output_dir=str(tmp_path), dtype="bfloat16",
               data=DataSettings(source="builtin:harmful", limit=2),
               msd={"student_languages": ["th"], "max_new_tokens": 4}, lora={"r": 2, "alpha": 4},
               training={"max_steps": 1, "per_device_train_batch_size": 2})
    assert (run_recipe(r) / "adapter_config.json").exists()
