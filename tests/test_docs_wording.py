"""The project does not speak of itself: no work "session" in its docs, comments or docstrings.

A figure or a change is named by its date, commit and machine (CPU model and flags), e.g.
"2026-12-03, commit 70b777c, Intel Xeon with AMX/avx512_bf16 (2 cores)", or "machine not recorded".
The word stays legitimate where it means something else: a pytest fixture scope, an HTTP client
session, Spark's ``SparkSession``; identifiers such as ``session_id`` do not match ``\\bsession\\b``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORD = re.compile(r"\bsessions?\b", re.IGNORECASE)

# Uses of the word that are not a work session; removed from a line before it is searched.
ALLOWED = [
    re.compile(r"""scope\s*=\s*["']session["']"""),  # pytest fixture scope
    re.compile(r"\bpytest sessions?\b", re.IGNORECASE),
    re.compile(r"\b(?:requests|httpx|aiohttp)\.\w*Session\b"),  # HTTP clients
    re.compile(r"\bClientSession\b|\bSparkSession\b|\bInferenceSession\b"),
    re.compile(r"\bHTTP sessions?\b", re.IGNORECASE),
]


def _files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    for folder in ("polyalign", "benchmarks", "scripts"):
        for pattern in ("*.py", "*.yaml", "*.sh"):
            files += sorted((ROOT / folder).rglob(pattern))
    files += [p for p in sorted((ROOT / "tests").glob("*.py")) if p.name != Path(__file__).name]
    return [p for p in files if p.is_file()]


def _mentions(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line
        for allowed in ALLOWED:
            stripped = allowed.sub("", stripped)
        if WORD.search(stripped):
            found.append((number, line.strip()))
    return found


def test_no_work_session_is_mentioned():
    files = _files()
    assert ROOT / "README.md" in files and any(p.parent.name == "docs" for p in files)
    bad = [
        f"{path.relative_to(ROOT)}:{number}: {line}"
        for path in files
        for number, line in _mentions(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not bad, (
        'name the date, commit and machine instead of a work "session" '
        '(e.g. "2026-12-03, commit 70b777c, Intel Xeon with AMX/avx512_bf16 (2 cores)"):\n' + "\n".join(bad)
    )


def test_the_check_finds_work_sessions_and_allows_other_senses():
    assert _mentions("The table is session 9's run.")
    assert _mentions("Two more quick runs this session.")
    assert _mentions("Earlier Sessions measured 0.59.")
    assert not _mentions('@pytest.fixture(scope="session")')
    assert not _mentions("built once per pytest session")
    assert not _mentions("s = requests.Session()")
    assert not _mentions("spark = SparkSession.builder.getOrCreate()")
    assert not _mentions("session_id = 3; sessions_dir = 'x'")
