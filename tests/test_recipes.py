"""Every shipped recipe binds to its config classes (no model is loaded); overrides are checked."""

from pathlib import Path

import pytest

from polyalign.errors import PolyalignError
from polyalign.train.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "polyalign" / "recipes").glob("*.yaml"))
BY_NAME = {p.stem: p for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_binds(path):
    r = load_recipe(path)
    assert r.method in ("msd", "mlc") and r.output_dir


@pytest.mark.parametrize("name", ["msd_onpolicy", "mlc_dpo"])
def test_overrides_and_unknown_keys(name):
    path = BY_NAME[name]
    if name.startswith("msd"):
        r = load_recipe(path, ["max_steps=7", "msd.mode=off_policy", "data.limit=3"])
        assert r.training["max_steps"] == 7 and r.msd["mode"] == "off_policy" and r.data.limit == 3
        assert load_recipe(path).msd["mode"] == "on_policy"              # the override did the change
    else:
        r = load_recipe(path, ["max_steps=7", "mlc.weight=0", "data.limit=3"])
        assert r.training["max_steps"] == 7 and r.mlc["weight"] == 0 and r.data.limit == 3
    with pytest.raises(PolyalignError, match="unknown TrainingArguments"):
        load_recipe(path, ["lerning_rate=1e-4"])
    with pytest.raises(PolyalignError, match="unknown key"):
        load_recipe(path, ["data.sauce=x"])
    with pytest.raises(PolyalignError, match="not key=value"):
        load_recipe(path, ["max_steps"])


def test_bad_method_values_are_named():
    msd = next(p for p in RECIPES if p.name == "msd_onpolicy.yaml")
    with pytest.raises(PolyalignError, match="mode must be on_policy or off_policy"):
        load_recipe(msd, ["msd.mode=sometimes"])
    mlc = next(p for p in RECIPES if p.name == "mlc_dpo.yaml")
    with pytest.raises(PolyalignError, match="paradigm"):
        load_recipe(mlc, ["mlc.paradigm=ppo"])


def test_scientific_notation_is_a_float(tmp_path):
    """PyYAML reads `1e-4` (no dot) as a string; recipes and overrides must still get a float."""
    path = tmp_path / "r.yaml"
    path.write_text("method: mlc\nmodel: builtin:tiny-random\noutput_dir: out\nmlc: {paradigm: dpo}\n"
                    "training: {learning_rate: 2e-5}\n")
    assert load_recipe(path).training["learning_rate"] == 2e-5
    r = load_recipe(path, ["learning_rate=1e-4", "mlc.beta=5E-2", "run_name=1e3x"])
    assert r.training["learning_rate"] == 1e-4 and r.mlc["beta"] == 0.05 and r.training["run_name"] == "1e3x"


def _records(counts: dict[str, int]):
    from polyalign.data.records import ParallelRecord

    return [ParallelRecord(id=f"{c}/{i}", texts={"en": f"{c} {i}"}, category=c)
            for c, n in counts.items() for i in range(n)]


def test_limit_is_a_seeded_stratified_sample():
    """Loaders group records by category: the first N rows would be the first categories only."""
    from collections import Counter

    from polyalign.data.builtin import stratified_sample

    recs = _records({"a": 10, "b": 10, "c": 2})
    got = stratified_sample(recs, 9, seed=0)
    assert Counter(r.category for r in got) == {"a": 4, "b": 3, "c": 2} or \
        Counter(r.category for r in got) == {"a": 3, "b": 4, "c": 2}
    assert [r.id for r in got] == [r.id for r in stratified_sample(recs, 9, seed=0)]      # seeded
    assert [r.id for r in got] != [r.id for r in stratified_sample(recs, 9, seed=1)]
    assert [r.id for r in got] == sorted((r.id for r in got), key=[x.id for x in recs].index)   # original order
    assert stratified_sample(recs, 50) == recs


def test_category_filter_and_unknown_category(tmp_path):
    from polyalign.data.builtin import load_prompts
    from polyalign.data.records import write_records

    path = tmp_path / "p.jsonl"
    write_records(path, _records({"a": 4, "b": 4}))
    assert {r.category for r in load_prompts(str(path), None, "all", None, ["b"])} == {"b"}
    with pytest.raises(PolyalignError, match="no records of category z"):
        load_prompts(str(path), None, "all", None, ["z"])


def test_xsafety_limit_covers_every_category(shared):
    """The recipes' XSafety limit of 400 used to be Crimes, Ethics and Goal_Hijacking only."""
    from collections import Counter

    from polyalign.data.builtin import load_prompts

    got = Counter(r.category for r in load_prompts(str(shared / "xsafety"), None, "train", 400))
    assert len(got) == 14 and max(got.values()) - min(got.values()) <= 1


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name.startswith("msd")], ids=lambda p: p.name)
def test_msd_recipes_with_benign_prompts_make_sure_they_are_answered(path):
    """A recipe that mixes in benign prompts "so the model keeps answering them" must not distil them
    from a teacher that refuses them (the paper's template does, for a small model): gating keeps only
    those the teacher answers, or they get a target of their own and a nonzero weight."""
    from polyalign.train.msd_config import MSDConfig

    r = load_recipe(path)
    cfg = MSDConfig(**(r.msd or {}))
    if r.data.benign_source:
        assert cfg.teacher_gating or cfg.benign_target != "teacher", path.name
        assert cfg.benign_weight > 0, path.name


def test_msd_mlc_recipe_and_unused_mlc_keys():
    from polyalign.train.msd_config import MSDConfig
    from polyalign.train.recipes import msd_mlc_config

    path = next(p for p in RECIPES if p.name == "msd_mlc.yaml")
    r = load_recipe(path)
    cfg = msd_mlc_config(r.mlc, MSDConfig(**r.msd))
    assert r.method == "msd" and cfg.languages == ["en", "zh", "ar", "bn"] and cfg.weight == 0.8
    with pytest.raises(PolyalignError, match="paradigm not used with method msd"):
        load_recipe(path, ["mlc.paradigm=dpo"])
    assert msd_mlc_config(None, MSDConfig()) is None


def test_override_into_a_null_section_is_one_line():
    with pytest.raises(PolyalignError, match=r"override lora.r: lora is null in this recipe.*lora=\{\.\.\.\}"):
        load_recipe(BY_NAME["msd_qwen7b_full"], ["lora.r=8"])
    r = load_recipe(BY_NAME["msd_qwen7b_full"], ["lora={r: 8, alpha: 16}"])         # the whole section works
    assert r.lora == {"r": 8, "alpha": 16}


def test_recipes_by_name_and_in_the_wheel(tmp_path, monkeypatch):
    """`polyalign train msd_onpolicy` works from any folder; pyproject ships the recipes folder."""
    import tomllib

    monkeypatch.chdir(tmp_path)
    assert load_recipe("msd_onpolicy").method == "msd"
    assert load_recipe("recipes/mlc_dpo.yaml").mlc["paradigm"] == "dpo"     # the README's path, from anywhere
    with pytest.raises(PolyalignError, match="recipe not found .* one of: .*msd_onpolicy"):
        load_recipe("msd_onpolicyy")
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["polyalign"]
    shipped = {p.name for g in globs for p in (ROOT / "polyalign").glob(g)}
    assert {p.name for p in RECIPES} <= shipped and "benchmark.jsonl" in shipped
    assert (ROOT / "recipes" / "msd_onpolicy.yaml").resolve() == BY_NAME["msd_onpolicy"]   # compat path


def test_selective_recipe_is_the_study_finalist(tmp_path):
    """msd_selective.yaml (the demo's recipe) writes out the study's finalist point; a change to
    either without the other would make the demo train something the study never measured."""
    from dataclasses import asdict

    from polyalign.sweep import expand_points, load_sweep, point_recipe
    from polyalign.train.msd_config import MSDConfig

    spec = load_sweep(ROOT / "recipes" / "sweeps" / "study_0.5b_bf16.yaml")
    point = next(p for p in expand_points(spec) if p.config == "refuse_hint_32steps")
    studied, shipped = point_recipe(spec, tmp_path, point), load_recipe(BY_NAME["msd_selective"])
    assert asdict(MSDConfig(**studied.msd)) == asdict(MSDConfig(**shipped.msd))
    assert asdict(studied.data) == asdict(shipped.data) and studied.lora == shipped.lora
    assert studied.training == shipped.training and studied.model == shipped.model
    assert (studied.method, studied.seed, studied.dtype, shipped.dtype) == ("msd", 0, "bf16", None)


def test_the_comparisons_trained_configs_share_prompts_and_budget():
    """Issue #25 compares configs at the same training prompts and budget: 32 optimizer steps of 8
    sequences, lr 1e-4, LoRA r 16, 24 + 24 train records. A recipe may split a step into micro-batches
    (mlc_dpo does, for memory) but not change what a step sees."""
    import yaml

    root = Path(__file__).resolve().parents[1] / "polyalign" / "recipes"
    budgets = {}
    for name in ("msd_selective", "paper_msd", "mlc_dpo_benchmark"):
        r = yaml.safe_load((root / f"{name}.yaml").read_text())
        t = r["training"]
        budgets[name] = (t["max_steps"], t["per_device_train_batch_size"] * t["gradient_accumulation_steps"],
                         float(t["learning_rate"]), r["lora"]["r"], r["data"]["limit"], r["data"]["benign_limit"])
    assert set(budgets.values()) == {(32, 8, 1e-4, 16, 24, 24)}, budgets


def test_build_model_on_a_base_already_loaded_inits_the_same_adapter():
    """The demo trains on the base it evaluated instead of loading it twice: the adapter must start
    from the same random init as a policy built from scratch (loading draws no random numbers), and
    a base in another dtype than the recipe trains in is refused."""
    import torch

    from polyalign.models import load_model
    from polyalign.train.recipes import build_model

    r = load_recipe("msd_selective", ["model=builtin:tiny-random", "dtype=float32"])
    fresh, _ = build_model(r)
    torch.manual_seed(123)                                   # whatever ran before (an evaluation) drew
    reused, _ = build_model(r, base=load_model("builtin:tiny-random", dtype="float32"))
    a = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    b = {n: p for n, p in reused.named_parameters() if "lora_" in n}
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(p.abs().sum() > 0 for p in a.values())        # lora_A is random, not zeros
    with pytest.raises(ValueError, match="bfloat16"):
        build_model(r, base=load_model("builtin:tiny-random", dtype="bfloat16"))
