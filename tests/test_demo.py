"""`polyalign demo` stages on builtin:tiny-random: wiring, report files, resumability."""

import json

import yaml
from rich.console import Console

from polyalign.demo import DemoPlan, run_demo

PLAN = DemoPlan(eval_languages=["en", "th"], eval_limit=2, max_new_tokens=4,
                overrides=["max_steps=2", "per_device_train_batch_size=2", "learning_rate=1e-3", "lora.r=4",
                           "data.limit=2", "data.benign_limit=2", "msd.max_new_tokens=4", "msd.student_languages=[th]",
                           "msd.benign_languages=[th]", "msd.language_hint=[th]", "msd.retain_languages=[]"])


def test_demo_pipeline_and_resume(tmp_path):
    quiet = Console(file=open("/dev/null", "w"))
    out = tmp_path / "demo"
    summary = run_demo(model="builtin:tiny-random", out=out, console=quiet, plan=PLAN)
    for f in ("report.md", "demo.png", "summary.json", "recipe.yaml", "timings.json",
              "msd/final/adapter_config.json", "baseline/builtin-harmful/results.json",
              "trained/builtin-benign/results.json"):
        assert (out / f).exists(), f
    assert [r["lang"] for r in summary["rows"]] == ["en", "th"]
    report = (out / "report.md").read_text()
    assert "| th |" in report and "2 steps of 2, trained languages: th" in report
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())     # the shipped recipe + the plan's overrides
    assert recipe["msd"]["harmful_hint"] == "refuse" and recipe["msd"]["retain_languages"] == []
    assert recipe["training"]["max_steps"] == 2 and recipe["data"]["source"] == "builtin:harmful"
    base = json.loads((out / "baseline" / "builtin-harmful" / "results.json").read_text())
    after = json.loads((out / "trained" / "builtin-harmful" / "results.json").read_text())
    assert base["generated"] == 4 and after["generated"] == 4 and base["fingerprint"] != after["fingerprint"]
    # interrupted after training: the rerun reuses the saved adapter and every cached generation
    adapter_mtime = (out / "msd" / "final" / "adapter_model.safetensors").stat().st_mtime
    again = run_demo(model="builtin:tiny-random", out=out, console=quiet, plan=PLAN)
    assert (out / "msd" / "final" / "adapter_model.safetensors").stat().st_mtime == adapter_mtime
    for tag in ("baseline", "trained"):
        res = json.loads((out / tag / "builtin-harmful" / "results.json").read_text())
        assert res["generated"] == 0 and res["cached"] == 4
    assert again["rows"] == summary["rows"]


def test_docs_rerun_snippets_build_the_recipes_they_describe(monkeypatch, tmp_path):
    """docs/msd.md's "to rerun" snippets (runs 1-8, the demo before the study's recipe) bind."""
    import re
    from pathlib import Path

    import polyalign.demo as demo
    from polyalign.train.msd_config import MSDConfig

    built = {}

    def fake_run_demo(model="builtin:qwen2.5-coder-0.5b-instruct", out="runs/demo", plan=None, **_):
        built[out] = MSDConfig(**demo.demo_recipe(model, tmp_path, plan).msd)
    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    text = (Path(__file__).resolve().parents[1] / "docs" / "msd.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        if "run_demo(" in block:
            exec(block, {})
    assert len(built) == 8
    assert built["runs/demo_paper_template"].teacher_template.startswith("You are a helpful assistant.")
    assert built["runs/demo"].benign_target == "retain" and built["runs/demo"].student_languages == ["zh", "th", "ar", "sw"]
    assert built["runs/demo_expB"].student_languages == ["zh", "th", "ar", "sw", "bn", "ko", "vi", "jv"]
    assert built["runs/demo_1.5b_expC"].teacher_template == "{english_query}"


def test_shipped_plans_bind(tmp_path):
    from polyalign.demo import FULL, QUICK, V1, demo_recipe
    from polyalign.train.msd_config import MSDConfig

    full, quick, v1 = (demo_recipe("builtin:qwen2.5-coder-0.5b-instruct", tmp_path, p) for p in (FULL, QUICK, V1))
    assert (full.training["max_steps"], full.msd["harmful_hint"]) == (32, "refuse")
    q = MSDConfig(**quick.msd)
    assert quick.training["max_steps"] == 6 and q.student_languages == ["zh", "th", "sw"] and q.retain_languages == ["sw"]
    assert MSDConfig(**v1.msd).benign_target == "retain" and v1.training["max_steps"] == 16
