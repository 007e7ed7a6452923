"""``polyalign sweep`` on builtin:tiny-random: spec checks, dry run, end to end, rerun, resume."""

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from polyalign.errors import PolyalignError
from polyalign.sweep import expand_points, load_sweep, point_dir, run_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "sweeps" / "tiny.yaml"


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"))


def recording_console(tmp_path) -> tuple[Console, Path]:
    path = tmp_path / "console.txt"
    return Console(file=open(path, "w"), width=200), path


def test_spec_points_and_errors(tmp_path):
    spec = load_sweep(TINY)
    points = expand_points(spec)
    assert [p.name for p in points] == ["learning_rate-0.001/seed0", "learning_rate-0.001/seed1",
                                        "learning_rate-0.01/seed0", "learning_rate-0.01/seed1"]
    assert points[0].overrides == ("learning_rate=0.001",)
    example = load_sweep(ROOT / "recipes" / "sweeps" / "example.yaml")
    names = dict.fromkeys(p.config for p in expand_points(example))
    assert len(names) == 5 and "forward_kl" in names and len(expand_points(example)) == 15
    finalist = tmp_path / "finalist.yaml"
    finalist.write_text("recipe: r.yaml\nout: o\nseeds: [0]\npoint_seeds: {b: [0, 1, 2]}\n"
                        "points: {a: [learning_rate=0.1], b: [learning_rate=0.2]}\n")
    assert [p.name for p in expand_points(load_sweep(finalist))] == ["a/seed0", "b/seed0", "b/seed1", "b/seed2"]
    finalist.write_text("recipe: r.yaml\nout: o\npoint_seeds: {c: [1]}\npoints: {a: [learning_rate=0.1]}\n")
    with pytest.raises(PolyalignError, match="point_seeds names unknown config.*c; configs: a"):
        expand_points(load_sweep(finalist))
    finalist.write_text("recipe: r.yaml\nout: o\npoint_seeds: {a: []}\n")
    with pytest.raises(PolyalignError, match="point_seeds must map"):
        load_sweep(finalist)
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: r.yaml\nout: o\nseeds: [0]\ngrdi: {a: [1]}\n")
    with pytest.raises(PolyalignError, match="unknown key.*grdi"):
        load_sweep(bad)
    bad.write_text("recipe: r.yaml\nout: o\ngrid: {learning_rate: 1e-4}\n")
    with pytest.raises(PolyalignError, match="non-empty list"):
        load_sweep(bad)
    bad.write_text(f"recipe: {ROOT / 'recipes' / 'msd_onpolicy.yaml'}\nout: {tmp_path / 'o'}\n"
                   "overrides: [msd.no_such_knob=1]\n")
    with pytest.raises(PolyalignError, match="sweep point base/seed0:.*no_such_knob"):
        run_sweep(load_sweep(bad), dry_run=True, console=quiet())


def test_dry_run_lists_points_and_estimate_without_training(tmp_path):
    console, path = recording_console(tmp_path)
    est = run_sweep(load_sweep(TINY), out=tmp_path / "sweep", dry_run=True, console=console)
    text = path.read_text()
    assert "learning_rate-0.01/seed1" in text and "total estimate" in text
    assert "default: 17.3 s per batch-4 MSD step" in text and "cost model" in text
    assert not (tmp_path / "sweep").exists()
    row = est["points"][0]
    assert (row["steps"], row["batch"], row["generations"], row["status"]) == (2, 2, 12, "todo")
    # 2 steps x 2 examples x 4.325 s + 12 generations x 4/38.1 s
    assert row["seconds"] == pytest.approx(2 * 2 * 17.3 / 4 + 12 * 4 / 38.1)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    summary = run_sweep(load_sweep(TINY), out=out, console=quiet())
    return out, summary


def test_sweep_writes_results_csv_and_plot(swept):
    out, summary = swept
    for f in ("sweep.csv", "sweep.json", "pareto.png", "sweep.yaml", "baseline/builtin-harmful/results.json",
              "baseline/builtin-benign/judged.jsonl"):
        assert (out / f).exists(), f
    for p in expand_points(load_sweep(TINY)):
        d = point_dir(out, p)
        assert (d / "train" / "final" / "adapter_config.json").exists()
        assert (d / "eval" / "builtin-benign" / "results.json").exists()
        res = json.loads((d / "eval" / "builtin-harmful" / "results.json").read_text())
        assert res["adapter"] == str(d / "train" / "final")
        recipe = json.loads((d / "train" / "final" / "polyalign_checkpoint.json").read_text())["recipe"]
        assert (recipe["seed"], recipe["training"]["learning_rate"]) == (p.seed, float(p.overrides[0].split("=")[1]))
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    # (baseline + 4 points) x 2 tasks x (en, th, sw, non-en pooled)
    assert len(rows) == 5 * 2 * 4
    r = next(r for r in rows if r["point"] == "learning_rate-0.01/seed1" and r["task"] == "builtin-harmful"
             and r["lang"] == "non-en")
    assert r["seed"] == "1" and r["overrides"] == "learning_rate=0.01" and r["n"] == "4"
    diff = float(r["harmful_refusal"]) - float(r["harmful_refusal_baseline"])
    assert float(r["harmful_refusal_diff"]) == pytest.approx(diff, abs=1e-5)
    assert float(r["harmful_refusal_diff_lo"]) <= diff <= float(r["harmful_refusal_diff_hi"])
    b = next(r for r in rows if r["point"] == "baseline" and r["task"] == "builtin-benign" and r["lang"] == "th")
    assert b["benign_refusal"] != "" and b["benign_refusal_diff"] == "" and b["harmful_refusal"] == ""
    cfg = summary["configs"]["learning_rate-0.01"]
    assert cfg["seeds"] == [0, 1] and cfg["builtin-harmful:harmful_refusal:diff"]["n"] == 2
    # sweep.md: one row per trained point, the pooled change with its interval, English before -> after
    md = (out / "sweep.md").read_text().splitlines()
    row = next(line for line in md if line.startswith("| learning_rate-0.01 | 1 |"))
    lo, hi = float(r["harmful_refusal_diff_lo"]), float(r["harmful_refusal_diff_hi"])
    assert f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" in row
    en = next(r for r in rows if r["point"] == "learning_rate-0.01/seed1" and r["task"] == "builtin-harmful"
              and r["lang"] == "en")
    assert row.endswith(f"{100 * float(en['harmful_refusal_baseline']):.1f} -> {100 * float(en['harmful_refusal']):.1f} |")
    # 4 point rows, then one row per config over its two seeds (mean with a prompts-then-seeds interval)
    assert sum(line.startswith("| learning_rate-") and "(builtin-" not in line for line in md) == 6
    over = cfg["builtin-harmful:harmful_refusal:diff"]
    assert over["ci"][0] <= over["mean"] <= over["ci"][1]
    seeds_row = next(line for line in md if line.startswith("| learning_rate-0.01 | 0, 1 |"))
    assert f"{100 * over['mean']:+.1f} [{100 * over['ci'][0]:+.1f}, {100 * over['ci'][1]:+.1f}]" in seeds_row
    base_th = next(r for r in rows if r["point"] == "baseline" and r["task"] == "builtin-harmful" and r["lang"] == "th")
    line = next(x for x in md if x.startswith("| baseline | harmful_refusal (builtin-harmful) |"))
    assert f"{100 * float(base_th['harmful_refusal']):.1f}" in line.split(" | ")[3]       # en, th, sw, non-en


def test_rerun_skips_everything(swept, monkeypatch, tmp_path):
    out, summary = swept
    import polyalign.eval.runner as runner
    import polyalign.models as models
    import polyalign.train.recipes as recipes

    def boom(*a, **k):
        raise AssertionError("a finished sweep must not train, generate or load a model")
    monkeypatch.setattr(recipes, "run_recipe", boom)
    monkeypatch.setattr(runner, "run_eval", boom)
    monkeypatch.setattr(models, "load_model", boom)
    again = run_sweep(load_sweep(TINY), out=out, console=quiet())
    assert again["configs"] == json.loads(json.dumps(summary["configs"]))
    console, path = recording_console(tmp_path)
    est = run_sweep(load_sweep(TINY), out=out, dry_run=True, console=console)
    assert {r["status"] for r in est["points"]} == {"done"} and est["total_seconds"] == 0
    assert "measured in this sweep (16 example-steps)" in path.read_text()


def test_summarize_covers_the_evaluated_points_only(swept, monkeypatch, tmp_path):
    from polyalign.sweep import summarize_finished

    out = tmp_path / "copy"
    shutil.copytree(swept[0], out)
    shutil.rmtree(out / "points" / "learning_rate-0.01" / "seed1" / "eval")   # a point still training
    import polyalign.train.recipes as recipes

    monkeypatch.setattr(recipes, "run_recipe", lambda *a, **k: pytest.fail("--summarize must not train"))
    summary = summarize_finished(load_sweep(TINY), out=out, console=quiet())
    assert [p["point"] for p in summary["points"]] == ["learning_rate-0.001/seed0", "learning_rate-0.001/seed1",
                                                       "learning_rate-0.01/seed0"]
    md = (out / "sweep.md").read_text()
    assert "| learning_rate-0.01 | 0 |" in md and "| learning_rate-0.01 | 1 |" not in md
    shutil.rmtree(out / "baseline")
    with pytest.raises(PolyalignError, match="baseline is not evaluated"):
        summarize_finished(load_sweep(TINY), out=out)


def test_no_baseline_evaluates_the_points_and_leaves_the_baseline_and_summary_for_later(swept, tmp_path):
    """--no-baseline: a point's evaluation does not need the untrained model's, so a run may leave it
    (half an hour at 1.5B on the test split) and the summary for a later run into the same folder."""
    out = tmp_path / "copy"
    shutil.copytree(swept[0], out)
    spec = load_sweep(TINY)
    p = expand_points(spec)[0]
    shutil.rmtree(out / "baseline")
    shutil.rmtree(point_dir(out, p) / "eval")
    for f in ("sweep.csv", "sweep.md", "sweep.json"):
        (out / f).unlink()
    est = run_sweep(spec, out=out, dry_run=True, console=quiet(), baseline=False)
    assert est["baseline_seconds"] == 0 and run_sweep(spec, out=out, dry_run=True, console=quiet())["baseline_seconds"] > 0
    res = run_sweep(spec, out=out, console=quiet(), baseline=False)
    assert res == {"points": [q.name for q in expand_points(spec)], "baseline": False}
    judged = point_dir(out, p) / "eval" / "builtin-harmful" / "judged.jsonl"
    assert judged.read_text() == (point_dir(swept[0], p) / "eval" / "builtin-harmful" / "judged.jsonl").read_text()
    assert not (out / "baseline").exists() and not (out / "sweep.csv").exists()
    # the export of such a folder has the points and no base
    spec_ = importlib.util.spec_from_file_location("study_tables", ROOT / "scripts" / "study_tables.py")
    study_tables = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(study_tables)
    written = study_tables.export(out, tmp_path / "files")
    assert sorted(f.name for f in written) == sorted(f"{q.config}_tiny-random_seed{q.seed}.jsonl"
                                                     for q in expand_points(spec))
    # a later run with the baseline evaluates it, and only it, and summarises as a whole sweep does
    summary = run_sweep(spec, out=out, console=quiet())
    assert (out / "baseline" / "builtin-benign" / "results.json").exists() and (out / "sweep.csv").exists()
    assert summary["configs"] == json.loads(json.dumps(swept[1]["configs"]))


def test_a_folder_is_not_continued_in_another_dtype(swept, monkeypatch, tmp_path):
    """A sweep folder whose baseline was generated in one dtype (another machine's policy) is not
    continued in another: the new points would be read against the wrong baseline."""
    out = tmp_path / "copy"
    shutil.copytree(swept[0], out)
    spec = load_sweep(TINY)
    p = expand_points(spec)[0]
    shutil.rmtree(point_dir(out, p) / "eval")                    # one point left to evaluate
    for res in out.glob("baseline/*/results.json"):              # as if generated on a CPU with AMX
        info = json.loads(res.read_text())
        assert info["dtype"] == "float32"
        res.write_text(json.dumps(info | {"dtype": "bfloat16"}))
    import polyalign.eval.runner as runner
    import polyalign.train.recipes as recipes

    def boom(*a, **k):
        raise AssertionError("nothing may run before the dtype check")
    monkeypatch.setattr(recipes, "run_recipe", boom)
    monkeypatch.setattr(runner, "run_eval", boom)
    with pytest.raises(PolyalignError, match=r"baseline/builtin-benign/results.json: evaluated in bfloat16, but "
                                             r"this run would evaluate in float32 .*eval.dtype: bfloat16"):
        run_sweep(spec, out=out, console=quiet())
    spec.eval.dtype = "bfloat16"                                # the points' evaluations were fp32 too
    with pytest.raises(PolyalignError, match=r"learning_rate-0.001/seed1/eval/builtin-benign/results.json: "
                                             r"evaluated in float32, but this run would evaluate in bfloat16"):
        run_sweep(spec, out=out, console=quiet())
    for f in out.glob("points/*/*/eval/*/results.json"):        # the whole folder generated in bf16: the
        f.write_text(json.dumps(json.loads(f.read_text()) | {"dtype": "bfloat16"}))      # check passes and
    with pytest.raises(AssertionError, match="nothing may run"):  # the point's evaluation starts
        run_sweep(spec, out=out, console=quiet())
    # a finished folder is only summarised, whatever its dtypes: nothing is left to generate
    shutil.copytree(point_dir(swept[0], p) / "eval", point_dir(out, p) / "eval", dirs_exist_ok=True)
    spec.eval.dtype = None
    run_sweep(spec, out=out, console=quiet())


def test_killed_point_resumes_from_its_checkpoint(swept, monkeypatch):
    out, _ = swept
    spec = load_sweep(TINY)
    p = expand_points(spec)[1]
    d = point_dir(out, p)
    shutil.rmtree(d / "train" / "final")
    shutil.rmtree(d / "eval")
    shutil.rmtree(d / "train" / "checkpoint-2")            # killed after step 1's checkpoint
    assert (d / "train" / "checkpoint-1").exists()
    import polyalign.train.recipes as recipes

    calls = []
    real = recipes.run_recipe

    def spy(recipe, resume=False, **kw):
        calls.append((recipe.output_dir, recipe.seed, resume))
        return real(recipe, resume=resume, **kw)
    monkeypatch.setattr(recipes, "run_recipe", spy)
    run_sweep(spec, out=out, console=quiet())
    assert calls == [(str(d / "train"), p.seed, True)]
    assert (d / "train" / "final" / "adapter_config.json").exists()
    res = json.loads((d / "eval" / "builtin-harmful" / "results.json").read_text())
    assert res["generated"] == 6
    log = json.loads((d / "train" / "final" / "log_history.json").read_text())
    assert max(h["step"] for h in log) == 2


def test_sweep_cli_dry_run(tmp_path):
    from tests.test_cli import run_cli

    res = run_cli("sweep", TINY, "--out", tmp_path / "s", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "learning_rate-0.001/seed0" in res.stdout and "total estimate" in res.stdout
    assert not (tmp_path / "s").exists()
    res = run_cli("sweep", TINY, "--out", tmp_path / "s", "--dry-run", "--only", "learning_rate-0.01")
    assert res.returncode == 0, res.stderr
    assert "learning_rate-0.01/seed1" in res.stdout and "learning_rate-0.001/seed0" not in res.stdout
    res = run_cli("sweep", tmp_path / "nope.yaml")
    assert res.returncode == 2 and "sweep spec not found" in res.stderr and "Traceback" not in res.stderr
    help_ = run_cli("--help")
    for cmd in ("sweep", "judge", "judge-check"):
        assert cmd in help_.stdout


def finalist_spec(tmp_path, shared, **finalist) -> Path:
    """tiny.yaml with one seed, a named finalist over two seeds and MGSM for the finalist only."""
    raw = yaml.safe_load(TINY.read_text())
    raw.update(recipe=str(ROOT / "recipes" / "msd_onpolicy.yaml"), seeds=[0], grid={},
               points={"other": ["learning_rate=1e-3"], "chosen": ["learning_rate=1e-2"]},
               point_seeds={"chosen": [0, 1]},
               finalist_eval=[{"tasks": ["mgsm"], "data": {"mgsm": str(shared / "mgsm")}, "languages": "en,th",
                               "limit": 2, "max_new_tokens": 6, "batch_size": 8, **finalist}])
    path = tmp_path / "finalist.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_finalist_eval_runs_only_for_the_finalists_and_the_baseline(tmp_path, shared):
    path = finalist_spec(tmp_path, shared)
    out = tmp_path / "s"
    est = run_sweep(load_sweep(path), out=out, dry_run=True, console=quiet())
    base_only = run_sweep(load_sweep(path), out=tmp_path / "x", dry_run=True, console=quiet())
    by = {r["point"]: r for r in est["points"]}
    # MGSM's 4 responses (2 prompts x en, th) cost 6/4 of a main response each, for the finalist only
    gs = est["figures"]["generation_seconds"][0]
    assert by["chosen/seed0"]["seconds"] - by["other/seed0"]["seconds"] == pytest.approx(4 * gs * 6 / 4)
    assert base_only["baseline_seconds"] == pytest.approx(12 * gs + 4 * gs * 6 / 4)
    summary = run_sweep(load_sweep(path), out=out, console=quiet())
    assert (out / "baseline" / "mgsm" / "results.json").exists()
    for seed in (0, 1):
        assert (out / "points" / "chosen" / f"seed{seed}" / "eval" / "mgsm" / "results.json").exists()
    assert not (out / "points" / "other" / "seed0" / "eval" / "mgsm").exists()
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    acc = [r for r in rows if r["task"] == "mgsm" and r["lang"] == "th"]
    assert {r["point"] for r in acc} == {"baseline", "chosen/seed0", "chosen/seed1"}
    assert all(r["accuracy"] != "" for r in acc)
    assert summary["configs"]["chosen"]["mgsm:accuracy:diff"]["n"] == 2
    assert "mgsm:accuracy:diff" not in summary["configs"]["other"]
    md = (out / "sweep.md").read_text()
    assert "mgsm:accuracy" in md and "| baseline | accuracy (mgsm) |" in md
    assert next(x for x in md.splitlines() if x.startswith("| other | 0 |")).count("| - ") >= 1


def test_only_runs_the_named_configs_and_their_finalist_tasks(tmp_path, shared):
    path = finalist_spec(tmp_path, shared)
    chosen = run_sweep(load_sweep(path), out=tmp_path / "a", dry_run=True, console=quiet(), only=["chosen"])
    assert [r["point"] for r in chosen["points"]] == ["chosen/seed0", "chosen/seed1"]
    other = run_sweep(load_sweep(path), out=tmp_path / "b", dry_run=True, console=quiet(), only=["other"])
    gs = other["figures"]["generation_seconds"][0]
    # no finalist among the points: MGSM is not costed (nor run) for the baseline either
    assert [r["point"] for r in other["points"]] == ["other/seed0"] and other["baseline_seconds"] == pytest.approx(12 * gs)
    assert chosen["baseline_seconds"] > other["baseline_seconds"]
    with pytest.raises(PolyalignError, match="--only names unknown config.*nope; configs: chosen, other"):
        run_sweep(load_sweep(path), out=tmp_path / "c", dry_run=True, console=quiet(), only=["nope"])


def test_seed_and_no_finalist_select_a_piece_of_the_study(tmp_path, shared):
    path = finalist_spec(tmp_path, shared)
    full = run_sweep(load_sweep(path), out=tmp_path / "a", dry_run=True, console=quiet(), only=["chosen"])
    one = run_sweep(load_sweep(path), out=tmp_path / "a", dry_run=True, console=quiet(), only=["chosen"], seeds=[1])
    assert [r["point"] for r in one["points"]] == ["chosen/seed1"]
    bare = run_sweep(load_sweep(path), out=tmp_path / "a", dry_run=True, console=quiet(), only=["chosen"], seeds=[1],
                     finalist=False)
    gs = bare["figures"]["generation_seconds"][0]
    # without the finalist evaluation neither the point nor the baseline is costed for MGSM
    assert bare["baseline_seconds"] == pytest.approx(12 * gs) and bare["baseline_seconds"] < full["baseline_seconds"]
    assert bare["points"][0]["seconds"] < one["points"][0]["seconds"]
    with pytest.raises(PolyalignError, match="--seed 7 is not a seed of the selected points; seeds: 0, 1"):
        run_sweep(load_sweep(path), out=tmp_path / "c", dry_run=True, console=quiet(), seeds=[7])


def test_finalist_eval_errors(tmp_path, shared):
    with pytest.raises(PolyalignError, match=r"finalist_eval\[0\] repeats task\(s\) builtin-benign"):
        load_sweep(finalist_spec(tmp_path, shared, tasks=["builtin-benign"]))
    with pytest.raises(PolyalignError, match=r"finalist_eval\[0\] names unknown config\(s\) nope"):
        run_sweep(load_sweep(finalist_spec(tmp_path, shared, configs=["nope"])), dry_run=True, console=quiet())
    with pytest.raises(PolyalignError, match=r"finalist_eval\[0\].*limt"):
        load_sweep(finalist_spec(tmp_path, shared, limt=3))


def test_sweep_markdown_english_column_is_the_main_safety_task():
    """A finalist safety task (XSafety) also has English harmful refusal; the column is the main task's."""
    from polyalign.sweep import sweep_markdown

    point = {"point": "a/seed0", "config": "a", "seed": 0, "t1:harmful_refusal:diff": 0.1,
             "t1:harmful_refusal:diff_ci": [0.0, 0.2]}
    rows = [{"point": "a/seed0", "task": task, "lang": "en", "harmful_refusal": after, "harmful_refusal_baseline": 0.5,
             "harmful_refusal_diff": after - 0.5} for task, after in (("t1", 0.75), ("xsafety", 0.25))]
    line = next(x for x in sweep_markdown([point], rows).splitlines() if x.startswith("| a | 0 |"))
    assert line.endswith("50.0 -> 75.0 |")
