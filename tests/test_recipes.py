"""Every shipped recipe binds to its config classes (no model is loaded); overrides are checked."""

from pathlib import Path

import pytest

from polyalign.errors import PolyalignError
from polyalign.train.recipes import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_binds(path):
    r = load_recipe(path)
    assert r.method in ("msd", "mlc") and r.output_dir


def test_overrides_and_unknown_keys():
    path = RECIPES[0]
    r = load_recipe(path, ["max_steps=7", "msd.mode=off_policy", "data.limit=3"]) if "msd" in path.name else None
    if r is not None:
        assert r.training["max_steps"] == 7 and r.msd["mode"] == "off_policy" and r.data.limit == 3
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
