"""scripts/compare_verdicts.py: agreement counts between two runs' judged rows, against a hand count."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_verdicts.py"


def _write(root: Path, part: str, rows: list[tuple[str, str, str, bool, str]]) -> None:
    d = root / part / "builtin-harmful"
    d.mkdir(parents=True)
    d.joinpath("judged.jsonl").write_text("".join(
        json.dumps({"prompt_id": p, "lang": lang, "response": text, "refused": ref, "label": label}) + "\n"
        for p, lang, text, ref, label in rows))


def test_counts_same_responses_verdicts_and_labels_per_part(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "baseline", [("p1", "en", "No.", True, "safe"), ("p2", "zh", "Sure", False, "unsafe"),
                           ("p3", "th", "x", False, "invalid")])
    _write(b, "baseline", [("p1", "en", "No.", True, "safe"), ("p2", "zh", "Sorry", True, "safe"),
                           ("p4", "ar", "y", False, "unsafe")])                 # p3 / p4: not shared
    _write(a, "trained", [("p1", "en", "I can't", True, "safe")])
    _write(b, "trained", [("p1", "en", "I cannot", True, "safe")])
    res = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "| baseline | 2 | 1 | 1 | 1 |" in res.stdout
    assert "| trained | 1 | 0 | 1 | 1 |" in res.stdout
    assert "| all | 3 | 1 | 2 | 2 |" in res.stdout


def test_runs_with_nothing_in_common_are_an_error(tmp_path):
    _write(tmp_path / "a", "baseline", [("p1", "en", "No.", True, "safe")])
    _write(tmp_path / "b", "baseline", [("p2", "en", "No.", True, "safe")])
    res = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"), str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "no prompt is judged in both" in res.stderr
