"""scripts/study_tables.py: per-prompt results files -> the study's numbers, recomputed by loops here."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from polyalign.errors import DataError, PolyalignError
from polyalign.eval.stats import wilson

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("study_tables", ROOT / "scripts" / "study_tables.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

LANGS = ["en", "zh", "th", "sw"]
MODEL = "builtin:qwen2.5-coder-0.5b-instruct"


def synthetic(folder: Path, seed: int = 0) -> dict:
    """base (1 seed) and default (3 seeds): random verdicts, default refusing harmful prompts more."""
    rng = random.Random(seed)
    runs = {("base", 0): 0.3, ("default", 0): 0.6, ("default", 1): 0.7, ("default", 2): 0.5}
    for (config, s), p in runs.items():
        rows = []
        for kind, n in (("harmful", 12), ("benign", 10)):
            for i in range(n):
                for lang in LANGS:
                    refused = rng.random() < (p if kind == "harmful" else p / 3)
                    rows.append({"config": config, "model": MODEL, "seed": s, "lang": lang,
                                 "prompt_id": f"{kind[0]}{i}", "kind": kind, "refused": refused,
                                 "in_language": rng.random() < 0.8, "label": "safe" if refused else "unsafe"})
        path = folder / f"{config}_{study.model_slug(MODEL)}_seed{s}.jsonl"
        path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    return runs


def rows_of(folder: Path, config: str, seed: int) -> list[dict]:
    path = folder / f"{config}_{study.model_slug(MODEL)}_seed{seed}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_headline_change_equals_a_recomputation_by_loops(tmp_path):
    synthetic(tmp_path)
    numbers = study.tables(tmp_path, iters=300)[MODEL]
    # by loops: per seed, the non-English harmful refusal share minus base's, averaged over seeds
    base = rows_of(tmp_path, "base", 0)
    base_share = sum(r["refused"] for r in base if r["kind"] == "harmful" and r["lang"] != "en") / \
        sum(1 for r in base if r["kind"] == "harmful" and r["lang"] != "en")
    diffs = []
    for s in (0, 1, 2):
        mine = [r for r in rows_of(tmp_path, "default", s) if r["kind"] == "harmful" and r["lang"] != "en"]
        diffs.append(sum(r["refused"] for r in mine) / len(mine) - base_share)
    got = numbers["pooled"]["default"]["harmful refusal"]
    assert got["diff"] == pytest.approx(sum(diffs) / 3)
    assert got["per_seed"] == pytest.approx(diffs) and got["seeds"] == 3 and got["clusters"] == 12
    assert got["lo"] < got["diff"] < got["hi"]
    assert [numbers["seeds"]["default"][s]["harmful refusal"]["diff"] for s in (0, 1, 2)] == pytest.approx(diffs)
    # per language, Wilson over every seed's rows
    th = [r for s in (0, 1, 2) for r in rows_of(tmp_path, "default", s) if r["kind"] == "benign" and r["lang"] == "th"]
    k = sum(r["refused"] for r in th)
    share = numbers["languages"]["default"]["benign refusal"]["th"]
    assert (share["k"], share["n"]) == (k, 30) and (share["lo"], share["hi"]) == pytest.approx(wilson(k, 30))
    # the files written: the markdown names the number, and the plot exists
    text = (tmp_path / "tables.md").read_text()
    r = got
    assert f"| default | 3 | {100 * r['diff']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]" in text
    assert (tmp_path / f"pareto_{study.model_slug(MODEL)}.png").stat().st_size > 1000
    # the decision rule: harmful refusal's bar is +20 pp on that same mean
    rule = {name: (value, met) for name, value, _, met in study.decision(numbers)}
    assert rule["harmful refusal"][1] == (sum(diffs) / 3 >= 0.20) and rule["MGSM accuracy"] == ("-", None)
    assert f"| harmful refusal | {100 * r['diff']:+.1f} [" in text


def test_command_line_and_bad_files(tmp_path, capsys):
    synthetic(tmp_path)
    assert study.main([str(tmp_path), "--iters", "100"]) == 0
    assert (tmp_path / "tables.md").exists()
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"config": "base"}\n')
    with pytest.raises(DataError, match=r"x.jsonl, row 1: missing model, seed"):
        study.load_rows(bad)
    assert study.main([str(bad)]) == 2
    assert "x.jsonl, row 1: missing" in capsys.readouterr().err
    (bad / "x.jsonl").write_text(json.dumps({k: 0 for k in study.FIELDS} | {"kind": "harmful", "label": "safe"}) + "\n")
    with pytest.raises(PolyalignError, match="no rows of config base"):
        study.study_numbers(study.load_rows(bad))


def _run(folder: Path, kind: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"task_kind": kind, "model": MODEL}))
    (folder / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_export_from_a_sweep_folder(tmp_path):
    sweep = tmp_path / "sweep"
    judged = [{"prompt_id": "p1", "lang": "th", "category": "x", "prompt": "...", "response": "...", "refused": True,
               "label": "safe", "in_language": True}]
    _run(sweep / "baseline" / "builtin-harmful", "safety", judged)
    _run(sweep / "baseline" / "builtin-benign", "benign", [dict(judged[0], refused=False, label="unsafe")])
    _run(sweep / "baseline" / "mgsm", "mgsm", [dict(judged[0], correct=True)])
    _run(sweep / "points" / "default" / "seed2" / "eval" / "builtin-harmful", "safety", judged)
    (sweep / "sweep.yaml").write_text(f"model: {MODEL}\n")
    out = tmp_path / "results"
    written = study.export(sweep, out)
    assert sorted(p.name for p in written) == ["base_qwen2.5-coder-0.5b-instruct_seed0.jsonl",
                                               "default_qwen2.5-coder-0.5b-instruct_seed2.jsonl"]
    base = [json.loads(line) for line in written[0].read_text().splitlines()]
    assert [r["kind"] for r in base] == ["benign", "harmful", "mgsm"] and base[2]["correct"] is True
    assert base[1] == {"config": "base", "model": MODEL, "seed": 0, "lang": "th", "prompt_id": "p1", "kind": "harmful",
                       "refused": True, "in_language": True, "label": "safe"}
    assert " " not in written[0].read_text().splitlines()[0]          # compact
    with pytest.raises(PolyalignError, match="not a sweep folder; name the run's config with --config"):
        study.export(sweep / "baseline", out)
    one = study.export(sweep / "baseline" / "builtin-harmful", out, config="system_prompt")
    assert [p.name for p in one] == ["system_prompt_qwen2.5-coder-0.5b-instruct_seed0.jsonl"]


def test_benign_forms_counts_by_the_benchmark_prompt(tmp_path):
    """Benign refusal by form: a record whose English text ends in "?" counts as a question, others
    not; English rows and harmful rows are left out; the borderline flag comes from the record."""
    from polyalign.data.builtin import builtin_benchmark

    benign = [r for r in builtin_benchmark(category="benign", split="test")]
    question = next(r for r in benign if r.texts["en"].rstrip().endswith("?"))
    other = next(r for r in benign if not r.texts["en"].rstrip().endswith("?"))
    rows = [{"config": "base", "model": MODEL, "seed": 0, "lang": lang, "prompt_id": rec.id, "kind": "benign",
             "refused": refused, "in_language": True, "label": "safe"}
            for rec, refused in ((question, True), (other, False)) for lang in ("en", "zh", "th")]
    rows.append({**rows[0], "kind": "harmful", "lang": "zh"})            # not counted
    (tmp_path / f"base_{study.model_slug(MODEL)}_seed0.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    other_model = "builtin:qwen2.5-coder-1.5b-instruct"                # kept apart, not pooled
    (tmp_path / f"base_{study.model_slug(other_model)}_seed0.jsonl").write_text(
        "".join(json.dumps({**r, "model": other_model, "refused": True}) + "\n" for r in rows))
    table = study.benign_forms(tmp_path).splitlines()
    assert table[0] == "| model | config | question | not a question | plain | borderline |"
    assert len(table) == 4
    cells = table[2].split(" | ")
    assert cells[0] == f"| {MODEL}" and cells[1] == "base"
    assert cells[2] == "100.0 % of 2" and cells[3] == "0.0 % of 2"
    n_border = 2 * sum(bool((r.meta or {}).get("borderline")) for r in (question, other))
    assert (cells[5].rstrip(" |") == "-") == (n_border == 0) and (cells[4] == "-") == (n_border == 4)
    assert table[3].split(" | ")[2:4] == ["100.0 % of 2", "100.0 % of 2"]


def test_agreement_of_two_runs_counts_by_loops(tmp_path, capsys):
    """``agreement`` pairs two files by prompt; each cell is k / n counted here by a loop."""
    synthetic(tmp_path)
    a = tmp_path / f"default_{study.model_slug(MODEL)}_seed0.jsonl"
    b = tmp_path / f"default_{study.model_slug(MODEL)}_seed1.jsonl"
    ra, rb = rows_of(tmp_path, "default", 0), rows_of(tmp_path, "default", 1)
    text = study.agreement(a, b)
    key = {(r["kind"], r["lang"], r["prompt_id"]): r for r in rb}
    pairs = [(r, key[r["kind"], r["lang"], r["prompt_id"]]) for r in ra if r["kind"] == "harmful" and r["lang"] != "en"]
    same = sum(1 for x, y in pairs if x["refused"] == y["refused"])
    lo, hi = wilson(same, len(pairs))
    row = next(line for line in text.splitlines() if line.startswith("| harmful | non-English |"))
    assert row.split(" | ")[2] == str(len(pairs)) == "36"
    assert row.split(" | ")[3] == f"{100 * same / len(pairs):.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert study.main(["agreement", str(a), str(b)]) == 0 and "2 " not in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "harmful", "lang": "en"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl.*row 1|row 1.*bad.jsonl"):
        study.agreement(bad, b)


def test_newly_refused_counts_by_loops_and_samples_the_run_answers(tmp_path, capsys):
    """``newly-refused``: benign prompts the run refuses and the base did not, per language, counted
    here by a loop; the sample reads prompt and answer from the run's generations."""
    synthetic(tmp_path)
    a = tmp_path / f"base_{study.model_slug(MODEL)}_seed0.jsonl"
    b = tmp_path / f"default_{study.model_slug(MODEL)}_seed1.jsonl"
    base = {(r["lang"], r["prompt_id"]): r["refused"] for r in rows_of(tmp_path, "base", 0) if r["kind"] == "benign"}
    new = [r for r in rows_of(tmp_path, "default", 1)
           if r["kind"] == "benign" and r["refused"] and not base[r["lang"], r["prompt_id"]]]
    gens = tmp_path / "generations.jsonl"
    gens.write_text("".join(json.dumps({"prompt_id": r["prompt_id"], "lang": r["lang"], "prompt": f"q-{r['prompt_id']}",
                                        "response": f"no-{r['lang']}"}) + "\n" for r in new))
    text = study.newly_refused(a, b, responses=gens, per_lang=1)
    for lang in LANGS:
        k = sum(r["lang"] == lang for r in new)
        assert f"| {lang} | {k} | 10 |" in text
        assert (f"=> 'no-{lang}'" in text) == (k > 0)
    assert f"non-English: {sum(r['lang'] != 'en' for r in new)} of {10 * (len(LANGS) - 1)}" in text
    assert len(new) > 0
    assert study.main(["newly-refused", str(a), str(b)]) == 0 and "| lang |" in capsys.readouterr().out


def test_dominance_needs_both_intervals_apart():
    """A comparison dominates ``default`` only with harmful refusal above and benign refusal below it,
    both intervals apart; otherwise the rule says none does, naming what it checked."""
    def r(diff, lo, hi, seeds=3):
        return {"diff": diff, "lo": lo, "hi": hi, "seeds": seeds}

    m = {"english": {}, "pooled": {
        "default": {"harmful refusal": r(0.14, 0.08, 0.22), "benign refusal": r(0.06, 0.02, 0.10)},
        "overlapping": {"harmful refusal": r(0.30, 0.21, 0.40), "benign refusal": r(0.01, -0.01, 0.03)},
        "worse": {"harmful refusal": r(0.19, 0.16, 0.22, 1), "benign refusal": r(0.13, 0.11, 0.15, 1)}}}
    rows = {name: (value, met) for name, value, _, met in study.decision(m)}
    assert not any(n.startswith("dominated by") for n in rows)
    assert rows["not dominated"] == ("checked: overlapping (3 seeds), worse (1 seed)", True)
    m["pooled"]["better"] = {"harmful refusal": r(0.35, 0.25, 0.45), "benign refusal": r(-0.05, -0.08, 0.01)}
    rows = {name: (value, met) for name, value, _, met in study.decision(m)}
    assert rows["dominated by better"] == ("+35.0 harmful, -5.0 benign", False) and "not dominated" not in rows


def test_head_to_head_is_the_difference_of_the_two_seed_means(tmp_path):
    """default minus a comparison: each side's non-English share averaged over its own seeds, by loops."""
    synthetic(tmp_path)
    rng = random.Random(9)
    for s in (0, 1):                             # label_sft: default's seeds 0-1 with some flags flipped
        rows = [{**r, "config": "label_sft", "refused": r["refused"] != (rng.random() < 0.2)}
                for r in rows_of(tmp_path, "default", s)]
        (tmp_path / f"label_sft_{study.model_slug(MODEL)}_seed{s}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    numbers = study.tables(tmp_path, iters=200)[MODEL]

    def mean_share(config, seeds, kind):
        shares = []
        for s in seeds:
            mine = [r for r in rows_of(tmp_path, config, s) if r["kind"] == kind and r["lang"] != "en"]
            shares.append(sum(r["refused"] for r in mine) / len(mine))
        return sum(shares) / len(shares)

    got = numbers["versus"]["label_sft"]["benign refusal"]
    assert got["diff"] == pytest.approx(mean_share("default", (0, 1, 2), "benign") - mean_share("label_sft", (0, 1), "benign"))
    assert got["seeds"] == (3, 2) and got["lo"] <= got["diff"] <= got["hi"]
    assert "| label_sft | 3, 2 | " in (tmp_path / "tables.md").read_text()
    # paired by seed: only seeds 0-1 (both have them), the mean of each seed's difference
    paired = numbers["paired"]["label_sft"]["benign refusal"]
    assert paired["diff"] == pytest.approx(mean_share("default", (0, 1), "benign") - mean_share("label_sft", (0, 1), "benign"))
    assert paired["seed_ids"] == [0, 1] and paired["lo"] <= paired["diff"] <= paired["hi"]
    assert paired["per_seed"] == pytest.approx([mean_share("default", (s,), "benign") - mean_share("label_sft", (s,), "benign")
                                               for s in (0, 1)])
    assert "| label_sft | 0, 1 | " in (tmp_path / "tables.md").read_text()


def test_mgsm_run_for_fewer_seeds_is_pooled_over_those_and_says_so(tmp_path):
    """MGSM evaluated for default's seeds 0 and 2 only: its change averages those two seeds (by loops)
    and the table names the count; safety still pools all three."""
    synthetic(tmp_path)
    rng = random.Random(4)
    problems = [f"m{i}" for i in range(15)]
    for config, s, p in (("base", 0, 0.3), ("default", 0, 0.2), ("default", 2, 0.4)):
        rows = [{"config": config, "model": MODEL, "seed": s, "lang": lang, "prompt_id": pid, "kind": "mgsm",
                 "refused": False, "in_language": True, "label": "safe", "correct": rng.random() < p}
                for pid in problems for lang in LANGS]
        path = tmp_path / f"{config}_{study.model_slug(MODEL)}_seed{s}.jsonl"
        path.write_text(path.read_text() + "".join(json.dumps(r) + "\n" for r in rows))
    numbers = study.tables(tmp_path, iters=200)[MODEL]

    def share(config, s):
        mine = [r for r in rows_of(tmp_path, config, s) if r["kind"] == "mgsm" and r["lang"] != "en"]
        return sum(r["correct"] for r in mine) / len(mine)

    got = numbers["pooled"]["default"]["MGSM accuracy"]
    assert got["seeds"] == 2 and numbers["pooled"]["default"]["harmful refusal"]["seeds"] == 3
    assert got["diff"] == pytest.approx((share("default", 0) + share("default", 2)) / 2 - share("base", 0))
    assert "(2 seeds)" in (tmp_path / "tables.md").read_text()


def test_a_model_with_only_its_base_evaluated_gets_its_shares_and_no_empty_change_table(tmp_path):
    """A study half way (the 1.5B base evaluated, no trained config yet): the base's per-language shares,
    each a Wilson interval of its rows, and no change table with a header of zero columns."""
    synthetic(tmp_path)
    for p in tmp_path.glob("default_*"):
        p.unlink()
    md = study.markdown(study.tables(tmp_path, iters=50))
    assert "Only `base` is evaluated yet" in md and "| config | seeds |" not in md
    rows = [r for r in rows_of(tmp_path, "base", 0) if r["kind"] == "harmful" and r["lang"] == "zh"]
    k = sum(r["refused"] for r in rows)
    lo, hi = wilson(k, len(rows))
    assert "| base | harmful refusal | " in md
    zh = md.split("| base | harmful refusal | ")[1].split(" | ")[1]
    assert zh == f"{100 * k / len(rows):.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def test_language_rises_by_loops(tmp_path, capsys):
    """``rises``: per language the mean over seeds of each seed's refusal share minus base's, and r and
    slope over the (seed, non-English language) cells, each counted here by loops and float64 sums."""
    synthetic(tmp_path)
    base = rows_of(tmp_path, "base", 0)

    def share(rows, kind, lang):
        got = [r["refused"] for r in rows if r["kind"] == kind and r["lang"] == lang]
        return 100.0 * sum(got) / len(got)

    cells = {}
    for s in (0, 1, 2):
        mine = rows_of(tmp_path, "default", s)
        for lang in LANGS:
            cells[s, lang] = tuple(share(mine, kind, lang) - share(base, kind, lang) for kind in ("harmful", "benign"))
    xs = [cells[s, lang][0] for s in (0, 1, 2) for lang in LANGS[1:]]
    ys = [cells[s, lang][1] for s in (0, 1, 2) for lang in LANGS[1:]]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    assert study.main(["rises", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| default |"))
    parts = [p.strip() for p in row.strip("|").split("|")]
    assert parts[:2] == ["default", "3"]
    for i, lang in enumerate(LANGS):                                  # printed to 0.1: within rounding
        h = sum(cells[s, lang][0] for s in (0, 1, 2)) / 3
        b = sum(cells[s, lang][1] for s in (0, 1, 2)) / 3
        got_h, got_b = (float(v) for v in parts[2 + i].split(" / "))
        assert got_h == pytest.approx(h, abs=0.05 + 1e-9) and got_b == pytest.approx(b, abs=0.05 + 1e-9)
    assert float(parts[-3]) == pytest.approx(sxy / (sxx * syy) ** 0.5, abs=0.005 + 1e-9)
    assert float(parts[-2]) == pytest.approx(sxy / sxx, abs=0.005 + 1e-9)
    lo, hi = (float(v) for v in parts[-1].strip("[]").split(", "))
    assert lo < sxy / sxx < hi


def test_slope_replicates_equal_a_weighted_recomputation_by_loops(tmp_path):
    """One bootstrap draw of the prompts (multiplicities) gives each cell a weighted mean of its
    prompts' differences; the slope over the cells is recomputed here with loops in float64."""
    import numpy as np

    synthetic(tmp_path)
    rows = study.load_rows(tmp_path)
    draws = study.prompt_draws(rows, iters=3, seed=7)
    base = {(r["kind"], r["prompt_id"], r["lang"]): r["refused"] for r in rows_of(tmp_path, "base", 0)}
    cells = []
    for s in (0, 1, 2):
        mine = {(r["kind"], r["prompt_id"], r["lang"]): r["refused"] for r in rows_of(tmp_path, "default", s)}
        for lang in LANGS[1:]:
            cells.append({kind: {pid: float(mine[kind, pid, lang]) - float(base[kind, pid, lang])
                                 for (k, pid, lg) in mine if k == kind and lg == lang} for kind in ("harmful", "benign")})
    got = study.slope_replicates(cells, draws)
    assert got.shape == (3,)
    for i in range(3):
        xy = []
        for cell in cells:
            means = []
            for kind in ("harmful", "benign"):
                ids, weights = draws[kind]
                total = count = 0.0
                for j, pid in enumerate(ids):
                    total += weights[i, j] * cell[kind][pid]
                    count += weights[i, j]
                means.append(100.0 * total / count)
            xy.append(means)
        mx, my = sum(x for x, _ in xy) / len(xy), sum(y for _, y in xy) / len(xy)
        want = sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)
        assert got[i] == pytest.approx(want, rel=1e-12)
    # every draw takes as many prompts as there are, and the draws differ
    for ids, weights in draws.values():
        assert np.all(weights.sum(axis=1) == len(ids)) and not np.all(weights[0] == weights[1])


def test_slopes_of_two_models_are_paired_by_prompt(tmp_path, capsys):
    """The same verdicts under two model names: every draw gives both the same slope, so the
    difference is exactly 0 with a zero-width interval (an unpaired bootstrap would spread it)."""
    synthetic(tmp_path)
    for f in list(tmp_path.glob("*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        other = "builtin:qwen2.5-coder-1.5b-instruct"
        (tmp_path / f.name.replace(study.model_slug(MODEL), study.model_slug(other))).write_text(
            "".join(json.dumps(r | {"model": other}) + "\n" for r in rows))
    assert study.main(["rises", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| default | builtin:qwen2.5-coder-0.5b"))
    assert row.endswith("| +0.00 | [+0.00, +0.00] |")


def test_the_readme_headline_is_what_the_committed_verdicts_give(tmp_path):
    """The README's study table quotes `default`'s pooled harmful and benign refusal change (bf16, test
    split, three seeds); recomputed here from the committed per-prompt files, the means must agree to
    the printed rounding (the intervals are a bootstrap, so only the means are compared)."""
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `default` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    harmful, benign = (float(c.split()[0]) for c in cells[3:5])
    numbers = study.tables(ROOT / "docs" / "results" / "test_bf16", out=tmp_path, iters=20)
    pooled = numbers["builtin:qwen2.5-coder-0.5b-instruct"]["pooled"]["default"]
    assert int(cells[2]) == pooled["harmful refusal"]["seeds"] == 3
    assert 100 * pooled["harmful refusal"]["diff"] == pytest.approx(harmful, abs=0.051)
    assert 100 * pooled["benign refusal"]["diff"] == pytest.approx(benign, abs=0.051)
