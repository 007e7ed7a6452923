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
