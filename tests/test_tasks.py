"""Task interfaces: --data is always a path (file or shipped folder), --split, --columns, and
each task's own generation default."""

import pytest

from polyalign.data.builtin import builtin_benchmark
from polyalign.errors import PolyalignError
from polyalign.eval.runner import EvalConfig, run_eval
from polyalign.eval.tasks import get_task


@pytest.mark.parametrize("task,folder,file,n", [("xstest", "xstest", "xstest_prompts.csv", 250),
                                                ("advbench", "advbench", "harmful_behaviors.csv", 520)])
def test_tasks_accept_the_folder_a_data_set_ships_as(shared, task, folder, file, n):
    from_folder = get_task(task).load(str(shared / folder))
    assert len(from_folder) == n
    assert [r.texts for r in from_folder] == [r.texts for r in get_task(task).load(str(shared / folder / file))]


def test_an_ambiguous_folder_names_the_candidates(shared):
    with pytest.raises(PolyalignError, match=r"several candidate files \(pku_saferlhf_multilingual_dpo.jsonl, "
                                             r"pku_saferlhf_multilingual_sft.json\); pass the one you mean"):
        get_task("pku-multilingual").load(str(shared / "mlc_pku"))


def test_split_is_separate_from_data(tmp_path):
    task = get_task("builtin-harmful")
    assert [r.id for r in task.load()] == [r.id for r in builtin_benchmark("harmful", "eval")]
    assert [r.id for r in task.load(split="train")] == [r.id for r in builtin_benchmark("harmful", "train")]
    with pytest.raises(PolyalignError, match="--data is a path; .* use --split train"):
        task.load("train")
    mine = tmp_path / "mine.csv"
    mine.write_text("q,q_th\n" + "".join(f"Question {i}?,คำถาม {i}\n" for i in range(20)))
    own = task.load(str(mine), columns="en=q,th=q_th")                   # built-in task, own prompts
    assert len(own) == 20 and own[3].texts == {"en": "Question 3?", "th": "คำถาม 3"}
    test = task.load(str(mine), split="test", columns="en=q,th=q_th")
    assert 0 < len(test) < 20 and {r.id for r in test} <= {r.id for r in own}


def test_generic_format_needs_columns_and_says_so(tmp_path):
    mine = tmp_path / "mine.csv"
    mine.write_text("q\nHello?\n")
    from polyalign.data import load_source

    with pytest.raises(PolyalignError, match="--format generic needs --columns LANG=COLUMN"):
        load_source(mine, "generic")
    with pytest.raises(PolyalignError, match="'en:q' is not LANG=COLUMN"):
        load_source(mine, None, "en:q")
    with pytest.raises(PolyalignError, match="--columns goes with --format generic"):
        load_source(mine, "xstest", "en=q")


@pytest.mark.parametrize("field", ["limit", "max_new_tokens", "batch_size"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes_are_errors(field, value):
    with pytest.raises(PolyalignError, match=f"--{field.replace('_', '-')} must be a positive number, got {value}"):
        EvalConfig(model="builtin:tiny-random", **{field: value})


def test_tasks_carry_their_generation_default(tmp_path, tiny):
    assert get_task("mgsm").max_new_tokens == 384
    assert get_task("builtin-harmful").max_new_tokens == get_task("xstest").max_new_tokens == 64
    model, tok = tiny
    c = EvalConfig(model="builtin:tiny-random", out=str(tmp_path / "a"), languages="en", limit=1, batch_size=1)
    assert run_eval(c, model=model, tokenizer=tok)["settings"]["max_new_tokens"] == 64
    c = EvalConfig(model="builtin:tiny-random", out=str(tmp_path / "b"), languages="en", limit=1, max_new_tokens=5)
    assert run_eval(c, model=model, tokenizer=tok)["settings"]["max_new_tokens"] == 5


def test_unknown_task_points_at_an_existing_command():
    with pytest.raises(PolyalignError, match=r"\(`polyalign tasks` lists them\)\. Did you mean 'mgsm'"):
        get_task("mgms")
