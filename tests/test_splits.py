"""Splits (train | dev | test by meta.split), stratified limits, the sweep's --final, labels never
guessed, and the comparison configs of issue #25 (system prompt, label-free MSD, SFT, DPO+MLC)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

import polyalign.data.builtin as builtin
from polyalign.data.records import ParallelRecord, read_records, record_label, record_split, split_records
from polyalign.errors import DataError, PolyalignError
from polyalign.eval.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
BORDERLINE = ["homonym", "figurative", "safe_target", "definition"]


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"))


def record(rid: str, category: str | None, split: str | None, **meta) -> dict:
    m = {k: v for k, v in {"split": split, **meta}.items() if v is not None}
    return {"id": rid, "category": category, "texts": {"en": f"Prompt {rid}?", "th": f"คำถาม {rid}", "sw": f"Swali {rid}?"},
            "meta": m}


def write_benchmark(path: Path, layout: str = "new") -> Path:
    """A small benchmark in the built-in's shape: harmful (3 harm categories) and benign (everyday, and
    borderline of 4 kinds, grouped in file order as the real file is), each split train/dev/test;
    ``layout="old"``: the train | eval layout before 2026-12-04."""
    rows = []
    splits = ["train", "dev", "test"] if layout == "new" else ["train", "eval"]
    for s in splits:
        for cat in ("weapons", "fraud", "drugs"):
            rows += [record(f"h-{s}-{cat}-{i}", "harmful", s, harm_category=cat) for i in range(3)]
        rows += [record(f"b-{s}-everyday-{i}", "benign", s, benign_type="everyday") for i in range(4)]
        for kind in BORDERLINE:       # file order: every homonym first, then every figurative, ...
            rows += [record(f"b-{s}-{kind}-{i}", "benign", s, benign_type="borderline", borderline_type=kind)
                     for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def bench(tmp_path, monkeypatch):
    path = write_benchmark(tmp_path / "benchmark.jsonl")
    monkeypatch.setattr(builtin, "builtin_path", lambda: path)
    return path


def test_meta_split_decides_and_eval_means_dev(tmp_path):
    recs = [ParallelRecord("a", {"en": "x"}, meta={"split": "test"}), ParallelRecord("b", {"en": "x"}, meta={"split": "eval"}),
            ParallelRecord("c", {"en": "x"}, meta={"split": "train"})]
    assert [record_split(r) for r in recs] == ["test", "dev", "train"]
    plain = [ParallelRecord(f"p{i}", {"en": "x"}) for i in range(200)]
    split = split_records(plain + recs)
    assert {r.id for r in split["test"]} >= {"a"} and "b" in {r.id for r in split["dev"]}
    assert 0 < len(split["test"]) - 1 < 60                          # the rest by the hash of the id
    # the same split with meta.split written from it
    tagged = [ParallelRecord(r.id, r.texts, meta={"split": record_split(r)}) for r in plain]
    assert {k: [r.id for r in v] for k, v in split_records(tagged).items()} == \
        {k: [r.id for r in v] for k, v in split_records(plain).items()}


def test_builtin_tasks_select_by_meta_split(bench):
    task = get_task("builtin-benign")
    ids = {s: {r.id for r in task.load(split=s)} for s in ("train", "dev", "test")}
    assert all(len(v) == 16 for v in ids.values()) and not (ids["dev"] & ids["test"])
    assert all(i.startswith("b-test-") for i in ids["test"])
    assert {r.id for r in task.load()} == ids["dev"] == {r.id for r in task.load(split="eval")}  # default: dev
    assert len(task.load(split="all")) == 48
    with pytest.raises(PolyalignError, match="split must be train, dev, test, eval"):
        task.load(split="heldout")


def test_old_layout_eval_is_dev_and_has_no_test(tmp_path, monkeypatch):
    path = write_benchmark(tmp_path / "old.jsonl", "old")
    monkeypatch.setattr(builtin, "builtin_path", lambda: path)
    task = get_task("builtin-harmful")
    assert {r.id for r in task.load()} == {f"h-eval-{c}-{i}" for c in ("weapons", "fraud", "drugs") for i in range(3)}
    with pytest.raises(PolyalignError, match="no record has meta.split test"):
        task.load(split="test")


def test_a_limit_covers_every_borderline_kind_and_category_seeded(bench):
    benign = builtin.builtin_benchmark("benign", "test")
    first = benign[:8]
    # round-robin over everyday / borderline, and inside borderline over its kinds: file order took
    # only homonym
    kinds = [r.meta.get("borderline_type") for r in first if r.meta.get("benign_type") == "borderline"]
    assert sorted(kinds) == sorted(BORDERLINE)
    harmful = builtin.builtin_benchmark("harmful", "test")
    assert {r.meta["harm_category"] for r in harmful[:3]} == {"weapons", "fraud", "drugs"}
    # deterministic by seed, and the seed changes which prompts of each kind come first
    assert [r.id for r in builtin.builtin_benchmark("benign", "test", seed=0)] == [r.id for r in benign]
    orders = {tuple(r.id for r in builtin.builtin_benchmark("benign", "test", seed=s)) for s in range(5)}
    assert len(orders) > 1
    # a record added to the file later does not reorder the others of its group
    homonym = [r.id for r in benign if r.meta.get("borderline_type") == "homonym"]
    for new in ("b-test-homonym-new", "b-test-homonym-a", "zzz"):
        more = builtin.interleave_groups([*benign, ParallelRecord(new, {"en": "x"}, "benign", {
            "split": "test", "benign_type": "borderline", "borderline_type": "homonym"})], seed=0)
        assert [r.id for r in more if r.id in homonym] == homonym
    from polyalign.eval.runner import select_requests

    chosen = select_requests(get_task("builtin-benign").load(split="test"), ["th"], 8)
    by_id = {r.id: r for r in benign}
    assert len({by_id[q.prompt_id].meta.get("borderline_type") for q in chosen} - {None}) == 4


def test_training_never_reads_test(bench, tmp_path):
    from polyalign.data.builtin import load_prompts

    train = load_prompts("builtin:all", None, "train", None)
    assert train and all(r.meta["split"] == "train" for r in train)
    assert all(r.meta["split"] == "dev" for r in load_prompts("builtin:harmful", None, "dev", None))
    with pytest.raises(PolyalignError, match="training data never comes from the test split"):
        load_prompts("builtin:harmful", None, "test", None)
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps(record(f"o{i}", "harmful", ["train", "test"][i % 2])) + "\n" for i in range(6)))
    assert [r.id for r in load_prompts(str(own), None, "train", None)] == ["o0", "o2", "o4"]


# --- the sweep: dev by default, test only with --final ---------------------------------------------

def tiny_spec(tmp_path: Path, **eval_overrides) -> Path:
    raw = yaml.safe_load((ROOT / "recipes" / "sweeps" / "tiny.yaml").read_text())
    raw["recipe"] = str(ROOT / "recipes" / "msd_onpolicy.yaml")
    raw["eval"].pop("split")
    raw["eval"].update(eval_overrides)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sweep_evaluates_dev_and_refuses_test_without_final(bench, tmp_path):
    from polyalign.sweep import _generations, load_sweep, run_sweep

    spec = load_sweep(tiny_spec(tmp_path))
    assert spec.eval.split == "dev"
    assert _generations(spec.eval) == 2 * 3 * 2          # 2 tasks x 3 languages x limit 2, from dev
    test_spec = load_sweep(tiny_spec(tmp_path, split="test"))
    with pytest.raises(PolyalignError, match="eval.split is test, which holds the test prompts.*pass --final"):
        run_sweep(test_spec, out=tmp_path / "s", dry_run=True, console=quiet())
    with pytest.raises(PolyalignError, match="covers every test record: set eval.limit to null"):
        run_sweep(test_spec, out=tmp_path / "s", dry_run=True, console=quiet(), final=True)
    final = load_sweep(tiny_spec(tmp_path, split="test", limit=None))
    est = run_sweep(final, out=tmp_path / "s", dry_run=True, console=quiet(), final=True)
    assert est["points"][0]["generations"] == 3 * (9 + 16)  # 3 languages x every test record (9 harmful, 16 benign)
    own = tiny_spec(tmp_path, data={"parallel": str(bench)}, tasks=["parallel"], data_split="test")
    with pytest.raises(PolyalignError, match="eval.data_split is test"):
        run_sweep(load_sweep(own), out=tmp_path / "s", dry_run=True, console=quiet())


def test_sweep_command_refuses_test_in_one_line(tmp_path):
    import subprocess
    import sys

    spec = tiny_spec(tmp_path, split="test")
    res = subprocess.run([sys.executable, "-m", "polyalign.cli", "sweep", str(spec), "--dry-run"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "pass --final" in res.stderr


# --- labels ------------------------------------------------------------------------------------

def test_records_keep_file_and_row_and_labels_are_never_guessed(tmp_path):
    from polyalign.train.msd_config import MSDConfig
    from polyalign.train.msd_trainer import build_msd_examples

    path = tmp_path / "mine.jsonl"
    rows = [record("a", "harmful", None), record("b", "benign", None), record("c", None, None),
            record("d", "Insult", None), record("e", None, None, label="safe")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = read_records(path)
    assert [(r.source, r.row) for r in recs][2] == (str(path), 3)
    assert [record_label(r) for r in recs] == ["harmful", "benign", None, "harmful", "benign"]
    # a recipe that reads labels refuses the unlabelled record, naming file and row
    for setting in ({"harmful_hint": "refuse"}, {"benign_weight": 3.0}, {"teacher_gating": True},
                    {"benign_target": "english"}, {"labels": "required"}):
        with pytest.raises(DataError, match=r"mine.jsonl, row 3: record 'c' has no harmful/benign label"):
            build_msd_examples(recs, MSDConfig(student_languages=["th"], **setting))
    # label-free: the label is never read, every prompt the same
    free = build_msd_examples(recs, MSDConfig(student_languages=["th"], labels="none"))
    assert [(e["label"], e["benign"]) for e in free] == [(None, False)] * 5
    # auto with nothing reading labels: allowed, and the unlabelled record is not called harmful
    auto = build_msd_examples(recs, MSDConfig(student_languages=["th"]))
    assert [e["label"] for e in auto] == ["harmful", "benign", None, "harmful", "benign"]
    with pytest.raises(ValueError, match="labels: none, but harmful_hint, benign_weight read"):
        MSDConfig(labels="none", harmful_hint="refuse", benign_weight=3.0)


def test_paper_msd_recipe_is_label_free_and_binds():
    from polyalign.train.msd_config import TEACHER_TEMPLATE, MSDConfig
    from polyalign.train.recipes import load_recipe

    r = load_recipe(ROOT / "recipes" / "paper_msd.yaml")
    cfg = MSDConfig(**r.msd)
    assert cfg.labels == "none" and not cfg.label_settings() and cfg.teacher_template == TEACHER_TEMPLATE
    assert cfg.mode == "on_policy" and cfg.dpsw
    selective = load_recipe(ROOT / "recipes" / "msd_selective.yaml")
    assert r.data == selective.data and r.training == selective.training and r.lora == selective.lora
    assert MSDConfig(**selective.msd).reads_labels()


def test_mlc_harmful_pairs_choose_a_refusal_and_refuse_unlabelled(tmp_path, tiny):
    from polyalign.train.mlc_config import BENIGN_REFUSAL, MLCConfig
    from polyalign.train.mlc_trainer import mlc_rows

    _, tok = tiny
    recs = [ParallelRecord("h", {"en": "Make a bomb", "th": "ระเบิด"}, "harmful"),
            ParallelRecord("b", {"en": "Bake bread", "th": "ขนมปัง"}, "benign")]
    cfg = MLCConfig(languages=["en", "th"], harmful_pairs=True, benign_pairs=True)
    rows = mlc_rows(recs, cfg, tok, {"h": "Sure, here is how", "b": "Mix flour and water"})
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == \
        [(BENIGN_REFUSAL, "Sure, here is how"), ("Mix flour and water", BENIGN_REFUSAL)]
    assert mlc_rows(recs, MLCConfig(languages=["en", "th"]), tok) == []          # off: no responses, no rows
    with pytest.raises(DataError, match="record 'x' has no harmful/benign label"):
        mlc_rows([*recs, ParallelRecord("x", {"en": "?", "th": "?"})], cfg, tok, {})


def test_mlc_harmful_pairs_skip_prompts_the_model_already_refuses(tiny, caplog):
    """A harmful prompt the model already refuses would pair a refusal with a refusal: DPO could only
    learn the wording, while benign pairs push refusals down (mlc_dpo seed 0 of the study)."""
    from polyalign.train.mlc_config import BENIGN_REFUSAL, MLCConfig
    from polyalign.train.mlc_trainer import mlc_rows

    _, tok = tiny
    recs = [ParallelRecord(f"h{i}", {"en": f"Make a bomb {i}", "th": "ระเบิด"}, "harmful") for i in range(2)]
    own = {"h0": "I'm sorry, but I can't assist with that.", "h1": "Sure, here is how"}
    cfg = MLCConfig(languages=["en", "th"], harmful_pairs=True)
    with caplog.at_level("WARNING"):
        rows = mlc_rows(recs, cfg, tok, own)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [(BENIGN_REFUSAL, "Sure, here is how")]
    assert "1 harmful records give no pair" in caplog.text and "h0" in caplog.text
    kept = mlc_rows(recs, MLCConfig(languages=["en", "th"], harmful_pairs=True, harmful_skip_refused=False), tok, own)
    assert len(kept) == 2


# --- label_sft: SFT on the teacher's greedy answers ------------------------------------------------

def test_sft_mode_trains_on_the_teachers_greedy_answers(tmp_path, bench):
    from polyalign.data.builtin import load_prompts
    from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
    from polyalign.models.batching import response_batch, response_logits
    from polyalign.train.msd_config import MSDConfig
    from polyalign.train.msd_trainer import SFT_TARGETS_FILE, MSDTrainer, build_msd_examples
    from polyalign.train.recipes import Recipe, training_arguments

    spec = "builtin:tiny-random"
    model = attach_lora(load_model(spec), LoraSettings(r=4, alpha=8))
    tok = load_tokenizer(spec)
    cfg = MSDConfig(mode="sft", student_languages=["th"], max_new_tokens=6, harmful_hint="refuse",
                    language_hint=True, benign_weight=2.0)
    examples = build_msd_examples(load_prompts("builtin:all", None, "train", 4), cfg)
    r = Recipe(method="msd", model=spec, output_dir=str(tmp_path / "out"),
               training={"max_steps": 1, "learning_rate": 1e-2, "per_device_train_batch_size": 4})
    trainer = MSDTrainer(model, training_arguments(r), cfg, examples, tok)
    targets = [e["target"] for e in trainer.train_dataset]
    # the targets: the frozen teacher's greedy answers in its label-conditioned context
    _, teacher = trainer._prompts(examples)
    want = trainer.sample_responses(model, teacher, from_teacher=True, greedy=True, max_new_tokens=6)
    assert targets == [list(w) for w in want] and any(targets)
    assert json.loads((tmp_path / "out" / SFT_TARGETS_FILE).read_text())
    # the loss: cross-entropy on them, benign sequences weighted 2
    batch = trainer.train_dataset[:4]
    student, _ = trainer._prompts(batch)
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"examples": batch})
        rb = response_batch(student, [e["target"] for e in batch], tok.pad_token_id)
        logits = response_logits(model, rb)
        per = []
        for i, e in enumerate(batch):
            n = len(e["target"])
            lp = torch.log_softmax(logits[i, -n:].float(), -1) if n else None
            nll = -lp.gather(-1, torch.tensor(e["target"])[:, None]).mean() if n else None
            per.append((nll, 2.0 if e["benign"] else 1.0))
        kept = [(v, w) for v, w in per if v is not None]
        manual = sum(v * w for v, w in kept) / len(kept)
    assert float(loss) == pytest.approx(float(manual), rel=1e-4)


# --- system_prompt: no training, a safety system prompt in the query's language -------------------

def test_system_prompt_point_evaluates_each_language_with_its_prompt(bench, tmp_path):
    from polyalign.eval.report import load_results
    from polyalign.sweep import SYSTEM_PROMPTS, expand_points, load_sweep, point_dir, run_sweep

    path = tmp_path / "sp.yaml"
    path.write_text(yaml.safe_dump({
        "recipe": str(ROOT / "recipes" / "msd_onpolicy.yaml"), "model": "builtin:tiny-random", "out": str(tmp_path / "s"),
        "points": {"system_prompt": ["recipe=none", "eval.system_prompt=safety"]},
        "eval": {"tasks": ["builtin-harmful", "builtin-benign"], "languages": "en,th,sw", "limit": 2,
                 "max_new_tokens": 3, "batch_size": 8}, "bootstrap": 50}))
    spec = load_sweep(path)
    est = run_sweep(spec, dry_run=True, console=quiet())
    assert [(p["point"], p["status"], p["steps"]) for p in est["points"]] == [("system_prompt/seed0", "untrained", 0)]
    summary = run_sweep(spec, console=quiet())
    d = point_dir(tmp_path / "s", expand_points(spec)[0])
    assert not (d / "train").exists()
    for task in ("builtin-harmful", "builtin-benign"):
        res = load_results(d / "eval" / task)
        assert res["system_prompt"] == {lang: SYSTEM_PROMPTS["safety"][lang] for lang in ("en", "th", "sw")}
        judged = [json.loads(x) for x in (d / "eval" / task / "judged.jsonl").read_text().splitlines()]
        assert sorted({j["lang"] for j in judged}) == ["en", "sw", "th"] and len(judged) == 6
        for lang in ("th", "sw"):
            part = load_results(d / "eval" / task / "by_language" / lang)
            assert part["settings"]["system"] == SYSTEM_PROMPTS["safety"][lang]
    assert "system_prompt" in summary["configs"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("eval.system_prompt=safety", "eval.system_prompt=polite"))
    with pytest.raises(PolyalignError, match="eval.system_prompt must be one of safety or a mapping"):
        run_sweep(load_sweep(bad), dry_run=True, console=quiet())


def test_the_bf16_comparisons_spec_is_the_fp32_one_in_bf16():
    """comparisons_0.5b_bf16.yaml must run the very comparisons of comparisons_0.5b.yaml (points,
    seeds, evaluation), only with the base in bf16 for training and evaluation, into its own folder."""
    from dataclasses import asdict

    from polyalign.sweep import expand_points, load_sweep

    fp32 = load_sweep(ROOT / "recipes" / "sweeps" / "comparisons_0.5b.yaml")
    bf16 = load_sweep(ROOT / "recipes" / "sweeps" / "comparisons_0.5b_bf16.yaml")
    assert [(p.config, p.overrides, p.seed) for p in expand_points(bf16)] == \
        [(p.config, p.overrides, p.seed) for p in expand_points(fp32)]
    assert (fp32.overrides, bf16.overrides) == (["dtype=float32"], ["dtype=bfloat16"]) and bf16.out != fp32.out
    assert fp32.eval.dtype == "float32" and asdict(bf16.eval) == asdict(fp32.eval) | {"dtype": "bfloat16"}
    assert [f.dtype for f in fp32.finalist_eval] == ["float32"]
    assert [asdict(f) for f in bf16.finalist_eval] == [asdict(f) | {"dtype": "bfloat16"} for f in fp32.finalist_eval]
    assert (bf16.recipe, bf16.model, bf16.seeds, bf16.point_seeds) == (fp32.recipe, fp32.model, fp32.seeds, fp32.point_seeds)


def test_comparisons_spec_lists_every_config(bench):
    from polyalign.sweep import expand_points, load_sweep, run_sweep

    spec = load_sweep(ROOT / "recipes" / "sweeps" / "comparisons_0.5b.yaml")
    points = expand_points(spec)
    configs = {p.config: [q.seed for q in points if q.config == p.config] for p in points}
    assert configs == {"default": [0, 1, 2], "msd_mlc": [0, 1, 2], "paper_msd": [0, 1, 2], "label_sft": [0, 1, 2],
                       "mlc_dpo": [0, 1, 2], "system_prompt": [0]}
    spec.finalist_eval = []                  # MGSM's data may be absent here; the points are what is listed
    with pytest.raises(PolyalignError, match="pass --final"):
        run_sweep(spec, dry_run=True, console=quiet())
    est = run_sweep(spec, dry_run=True, console=quiet(), final=True)
    assert len(est["points"]) == 16
    rows = {p["point"]: p for p in est["points"]}
    assert rows["system_prompt/seed0"]["steps"] == 0
    assert {rows[f"{c}/seed0"]["steps"] * rows[f"{c}/seed0"]["batch"]
            for c in ("default", "msd_mlc", "paper_msd", "label_sft", "mlc_dpo")} == {32 * 8}   # same budget


def test_the_1_5b_spec_is_the_0_5b_one_on_the_larger_model():
    """comparisons_1.5b_bf16.yaml runs the default and the strongest comparison exactly as the 0.5B
    bf16 spec does (overrides, seeds, evaluation, MGSM), only on the 1.5B model, into its own folder."""
    from dataclasses import asdict

    from polyalign.sweep import expand_points, load_sweep

    small = load_sweep(ROOT / "recipes" / "sweeps" / "comparisons_0.5b_bf16.yaml")
    large = load_sweep(ROOT / "recipes" / "sweeps" / "comparisons_1.5b_bf16.yaml")
    kept = {"default", "msd_mlc"}
    memory = {"msd_mlc": ["gradient_checkpointing=true"]}     # the same values, less memory (the spec says why)
    assert [(p.config, p.overrides, p.seed) for p in expand_points(large)] == \
        [(p.config, (*p.overrides, *memory.get(p.config, [])), p.seed) for p in expand_points(small) if p.config in kept]
    assert large.model.endswith("1.5b-instruct") and large.out != small.out
    assert (large.recipe, large.overrides, large.seeds) == (small.recipe, small.overrides, small.seeds)
    assert asdict(large.eval) == asdict(small.eval)
    assert [asdict(f) for f in large.finalist_eval] == \
        [asdict(f) | {"configs": sorted(kept, key=["default", "msd_mlc"].index)} for f in small.finalist_eval]


def test_the_levers_spec_chooses_on_dev_with_the_default_beside_its_lever():
    """levers_0.5b_bf16.yaml (issue #25: a lever tried on dev) must run without --final, evaluate
    the dev split only, and differ from the comparisons' default in the lever's override alone."""
    from dataclasses import asdict

    from polyalign.sweep import expand_points, load_sweep, run_sweep

    levers = load_sweep(ROOT / "recipes" / "sweeps" / "levers_0.5b_bf16.yaml")
    comparisons = load_sweep(ROOT / "recipes" / "sweeps" / "comparisons_0.5b_bf16.yaml")
    assert levers.eval.split == "dev" and levers.eval.limit is None and not levers.finalist_eval
    assert asdict(levers.eval) == asdict(comparisons.eval) | {"split": "dev"}
    assert (levers.recipe, levers.model, levers.overrides) == (comparisons.recipe, comparisons.model,
                                                               comparisons.overrides)
    points = {(p.config, p.seed): p.overrides for p in expand_points(levers)}
    assert set(points) == {(c, s) for c in ("default", "benign48") for s in (0, 1, 2)} | \
        {("benign48_lr2", 0), ("benign48_lr2", 1)}
    assert points[("default", 0)] == () and points[("benign48", 0)] == ("data.benign_limit=48",)
    assert points[("benign48_lr2", 0)] == ("data.benign_limit=48", "learning_rate=2e-4")
    est = run_sweep(levers, dry_run=True, console=quiet())          # dev: no --final needed
    assert len(est["points"]) == 8
    assert {p["steps"] * p["batch"] for p in est["points"]} == {32 * 8}                  # same budget
