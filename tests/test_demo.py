"""`polyalign demo` stages on builtin:tiny-random: wiring, report files, resumability."""

import json

from rich.console import Console

from polyalign.demo import DemoPlan, run_demo

PLAN = DemoPlan(eval_languages=["en", "th"], train_languages=["th"], eval_limit=2, max_new_tokens=4, steps=2,
                learning_rate=1e-3, batch_size=2, lora_r=4, gen_tokens=4)


def test_demo_pipeline_and_resume(tmp_path):
    quiet = Console(file=open("/dev/null", "w"))
    out = tmp_path / "demo"
    summary = run_demo(model="builtin:tiny-random", out=out, console=quiet, plan=PLAN)
    for f in ("report.md", "demo.png", "summary.json", "recipe.yaml", "timings.json",
              "msd/final/adapter_config.json", "baseline/builtin-harmful/results.json",
              "trained/builtin-benign/results.json"):
        assert (out / f).exists(), f
    assert [r["lang"] for r in summary["rows"]] == ["en", "th"]
    assert "| th |" in (out / "report.md").read_text()
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
