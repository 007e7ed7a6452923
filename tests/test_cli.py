"""The CLI as a user meets it: tables, files written, one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "polyalign.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin",
                                                   "HOME": "/tmp", "PYTHONPATH": ":".join(sys.path)})


def test_help_lists_every_command():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("train", "eval", "report", "demo", "data", "probe", "export"):
        assert cmd in res.stdout


def test_inspect_xsafety_table(shared):
    res = run_cli("data", "inspect", shared / "xsafety")
    assert res.returncode == 0, res.stderr
    assert "2800 prompts" in res.stdout
    rows = [line for line in res.stdout.splitlines() if "│" in line and "2800" in line]
    assert len(rows) == 9           # 9 languages with 2800; ru has 2799 (one empty published cell)
    assert "2799" in res.stdout and "ru/Insult.csv, row 165" in res.stderr


def test_convert_writes_canonical_jsonl(shared, tmp_path):
    out = tmp_path / "pku.jsonl"
    res = run_cli("data", "convert", shared / "mlc_pku" / "pku_saferlhf_multilingual_dpo.jsonl", "--out", out,
                  "--languages", "en,zh,sw")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 180 and set(rows[0]["texts"]) == {"en", "zh", "sw"}


@pytest.mark.parametrize("args,message", [
    (("data", "inspect", "/no/such/file.csv"), "/no/such/file.csv: file not found"),
    (("data", "convert", "{shared}/mgsm", "--out", "{tmp}/o.jsonl", "--languages", "xx"), "unknown language code 'xx'"),
    (("eval", "--model", "builtin:nope", "--out", "{tmp}/e"), "unknown built-in model 'nope'"),
    (("eval", "--model", "builtin:tiny-random", "--limit", "-3", "--out", "{tmp}/e"),
     "--limit must be a positive number, got -3"),
    (("eval", "--model", "builtin:tiny-random", "--task", "xstets", "--out", "{tmp}/e"), "`polyalign tasks` lists them"),
    (("eval", "--model", "builtin:tiny-random", "--data", "eval", "--out", "{tmp}/e"), "use --split eval"),
    (("data", "inspect", "{shared}/mlc_pku"), "several candidate files"),
    (("data", "inspect", "{shared}/advbench/harmful_behaviors.csv", "--format", "generic"),
     "--format generic needs --columns"),
    (("train", "msd_qwen7b_full", "lora.r=8"), "lora is null in this recipe"),
])
def test_bad_input_one_line_exit_2_nothing_written(args, message, shared, tmp_path):
    args = [a.format(shared=shared, tmp=tmp_path) for a in args]
    res = run_cli(*args)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_own_csv_with_columns(tmp_path):
    mine = tmp_path / "mine.csv"
    mine.write_text("question,q_th\nHow are you?,สบายดีไหม\nWhere is it?,อยู่ที่ไหน\n")
    res = run_cli("data", "inspect", mine, "--columns", "en=question,th=q_th")
    assert res.returncode == 0, res.stderr
    assert "generic: 2 prompts" in res.stdout and "Thai" in res.stdout
    out = tmp_path / "mine.jsonl"
    res = run_cli("data", "convert", mine, "--out", out, "--columns", "en=question,th=q_th")
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text().splitlines()[1])["texts"] == {"en": "Where is it?", "th": "อยู่ที่ไหน"}


def test_xstest_folder_and_export_options(shared):
    res = run_cli("data", "inspect", shared / "xstest")
    assert res.returncode == 0 and "xstest: 250 prompts" in res.stdout
    res = run_cli("export", "--help")
    assert "--results" in res.stdout and "--gguf" in res.stdout
