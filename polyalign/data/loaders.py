"""Loaders: every public source -> ``list[ParallelRecord]``.

Each loader is registered by name in :data:`LOADERS` and knows one data set's quirks
(see ``../shared/data/README.md``). :func:`load_source` picks a loader from a path.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polyalign.data.records import ParallelRecord, iter_jsonl, read_records, validate_records
from polyalign.errors import DataError, PolyalignError
from polyalign.registry import Registry
from polyalign.text.languages import normalize_code

log = logging.getLogger(__name__)
Loader = Callable[..., list[ParallelRecord]]
LOADERS: Registry[Loader] = Registry("data source")


def _require(path: Path) -> Path:
    if not path.exists():
        raise DataError("file not found", path)
    return path


def one_file(path: str | Path, patterns: tuple[str, ...], what: str) -> Path:
    """``path`` itself, or the one file in the folder ``path`` matching ``patterns`` (the folder a
    data set ships as); otherwise one line saying which file is wanted."""
    path = _require(Path(path))
    if not path.is_dir():
        return path
    found = sorted({f for pat in patterns for f in path.glob(pat) if f.is_file()})
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"no {what} in this folder (looked for {' or '.join(patterns)}); pass the file", path)
    raise DataError(f"several candidate files ({', '.join(f.name for f in found)}); pass the one you mean", path)


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """``"en=question,th=q_th"`` -> ``{"en": "question", "th": "q_th"}`` (language code -> column)."""
    if spec is None or isinstance(spec, dict):
        return spec
    out = {}
    for item in spec.split(","):
        lang, eq, col = item.partition("=")
        if not eq or not lang.strip() or not col.strip():
            raise PolyalignError(f"--columns: {item.strip()!r} is not LANG=COLUMN (e.g. --columns en=question,th=q_th)")
        out[normalize_code(lang)] = col.strip()
    return out


def read_csv_rows(path: str | Path, delimiter: str = ",") -> list[list[str]]:
    """All rows of a CSV (BOM stripped, quoted multi-line cells kept whole)."""
    path = _require(Path(path))
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            return list(csv.reader(fh, delimiter=delimiter))
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", path) from None
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", path) from None


def read_csv_dicts(path: str | Path, required: list[str]) -> list[dict[str, str]]:
    rows = read_csv_rows(path)
    if not rows:
        raise DataError("empty file", path)
    header = [h.strip() for h in rows[0]]
    for col in required:
        if col not in header:
            raise DataError(f"missing column (header has: {', '.join(header)})", path, column=col)
    return [dict(zip(header, r, strict=False)) for r in rows[1:] if any(c.strip() for c in r)]


# --------------------------------------------------------------------------------------------
# XSafety: one folder per language, one single-column headerless file per category.

XSAFETY_CATEGORIES = [
    "Crimes_And_Illegal_Activities", "Ethics_And_Morality", "Goal_Hijacking",
    "Inquiry_With_Unsafe_Opinion", "Insult", "Mental_Health", "Physical_Harm",
    "Privacy_And_Property", "Prompt_Leaking", "Reverse_Exposure", "Role_Play_Instruction",
    "Unfairness_And_Discrimination", "Unsafe_Instruction_Topic", "commonsense",
]
# Typos in the published files, mapped to the category they mean.
_XSAFETY_TYPOS = {"Crimes_And_Illegal_Activitie": "Crimes_And_Illegal_Activities"}


def _xsafety_category(stem: str) -> str | None:
    """File stem -> canonical category: drops the ``_n``/``_en`` suffixes, fixes known typos.
    Unknown stems (e.g. ``hi/commen_sense``, a variant without the task suffix) return None."""
    s = re.sub(r"_(n|en)$", "", stem)
    s = _XSAFETY_TYPOS.get(s, s)
    return s if s in XSAFETY_CATEGORIES else None


def _xsafety_cells(path: Path) -> list[str]:
    """One text per row. Unquoted commas split a row into several cells: re-join them;
    trailing empty cells are artefacts of the export."""
    if path.suffix == ".xlsx":
        import openpyxl

        try:
            wb = openpyxl.load_workbook(path, read_only=True)
        except Exception as e:  # zipfile.BadZipFile, KeyError ... from a broken workbook
            raise DataError(f"cannot read workbook: {e}", path) from None
        rows = [[("" if c is None else str(c)) for c in row] for row in wb.active.iter_rows(values_only=True)]
        wb.close()
    else:
        rows = read_csv_rows(path)
    out = []
    for row in rows:
        while row and not row[-1].strip():
            row = row[:-1]
        out.append(",".join(row).strip())
    while out and not out[-1]:
        out.pop()
    return out


@LOADERS.register("xsafety")
def load_xsafety(path: str | Path, languages: list[str] | None = None,
                 categories: list[str] | None = None, strict: bool = False) -> list[ParallelRecord]:
    """XSafety raw folder -> 2,800 parallel records (14 categories x 200) in 10 languages.

    Row i of a category file is the same query in every language; ids are ``category/i``.
    Raises DataError naming the file and count when a category's row counts disagree.
    An empty cell (the published ``ru/Insult.csv`` row 165 is one) drops that language from that
    record with a warning naming file and row; ``strict=True`` raises instead.
    """
    root = _require(Path(path))
    if not root.is_dir():
        raise DataError("expected the XSafety folder (one sub-folder per language)", root)
    files: dict[str, dict[str, Path]] = {}  # lang -> category -> file
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            lang = normalize_code(sub.name)
        except PolyalignError:
            continue  # e.g. a "paper" folder
        if languages and lang not in languages:
            continue
        for f in sorted(sub.iterdir()):
            if f.suffix not in (".csv", ".xlsx"):
                continue
            cat = _xsafety_category(f.stem)
            if cat is None or (categories and cat not in categories):
                continue
            if cat in files.setdefault(lang, {}):
                raise DataError(f"two files for category {cat}: {files[lang][cat].name} and {f.name}", sub)
            files[lang][cat] = f
    if not files:
        raise DataError("no XSafety language folders found", root)

    texts: dict[str, dict[str, list[str]]] = {lang: {c: _xsafety_cells(f) for c, f in cats.items()}
                                              for lang, cats in files.items()}
    all_cats = sorted({c for cats in texts.values() for c in cats}, key=XSAFETY_CATEGORIES.index)
    records = []
    for cat in all_cats:
        counts = {lang: len(texts[lang][cat]) for lang in texts if cat in texts[lang]}
        missing = [lang for lang in texts if cat not in texts[lang]]
        if missing:
            raise DataError(f"category {cat} has no file for language(s) {', '.join(missing)}", root)
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{files[lang][cat].relative_to(root)}={n}" for lang, n in counts.items())
            raise DataError(f"row counts of category {cat} disagree across languages: {detail}", root)
        for i in range(next(iter(counts.values()))):
            row = {}
            for lang in texts:
                if texts[lang][cat][i]:
                    row[lang] = texts[lang][cat][i]
                elif strict:
                    raise DataError("empty text", files[lang][cat], row=i + 1)
                else:
                    log.warning("%s, row %d: empty text; language %s dropped from %s/%d",
                                files[lang][cat], i + 1, lang, cat, i)
            records.append(ParallelRecord(f"{cat}/{i}", row, cat, source=str(files.get("en", next(iter(files.values())))[cat]),
                                          row=i + 1))
    return validate_records(records, root)


# --------------------------------------------------------------------------------------------
# MultiJail: CSV with BOM, columns id, source, tags, en zh it vi ar ko th bn sw jv.

MULTIJAIL_LANGS = ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]
MULTIJAIL_HUB = "DAMO-NLP-SG/MultiJail"


def _multijail_rows(path: str) -> tuple[list[dict[str, Any]], str]:
    if Path(path).exists():
        f = one_file(path, ("*.csv",), "MultiJail CSV")
        return read_csv_dicts(f, ["id", *MULTIJAIL_LANGS]), str(f)
    if path not in ("hub", MULTIJAIL_HUB):
        raise DataError("file not found (pass a local CSV, or 'hub' for DAMO-NLP-SG/MultiJail)", path)
    try:  # users with hub access; tests never reach this
        from datasets import load_dataset

        ds = load_dataset(MULTIJAIL_HUB, split="train")
    except Exception as e:
        raise PolyalignError(f"cannot load {MULTIJAIL_HUB} from the hub ({e}); pass a local CSV path") from None
    return [dict(r) for r in ds], MULTIJAIL_HUB


@LOADERS.register("multijail")
def load_multijail(path: str | Path = MULTIJAIL_HUB, languages: list[str] | None = None) -> list[ParallelRecord]:
    rows, source = _multijail_rows(str(path))
    records = []
    for n, row in enumerate(rows, start=2):  # row 1 is the header
        tags = row.get("tags") or "[]"
        try:
            tag_list = ast.literal_eval(tags) if isinstance(tags, str) else list(tags)
        except (ValueError, SyntaxError):
            raise DataError(f"tags is not a list literal: {tags!r}", source, row=n, column="tags") from None
        texts = {lang: str(row[lang]).strip() for lang in (languages or MULTIJAIL_LANGS)}
        for lang, t in texts.items():
            if not t:
                raise DataError("empty text", source, row=n, column=lang)
        # every MultiJail prompt is a harmful request (its tags name the kind of harm)
        records.append(ParallelRecord(f"multijail/{row['id']}", texts, (tag_list or [None])[0],
                                      {"source": row.get("source"), "tags": tag_list, "label": "harmful"},
                                      source=str(source), row=n))
    return validate_records(records, source)


# --------------------------------------------------------------------------------------------
# MLC's multilingual PKU-SafeRLHF files: English prompt + prompt_<lang> columns.

def _turn_text(value: Any) -> str:
    """``[{"from": "human", "value": ...}]`` / ``{"from": ..., "value": ...}`` / str -> text."""
    if isinstance(value, list):
        return "\n".join(_turn_text(v) for v in value)
    if isinstance(value, dict):
        return str(value.get("value", ""))
    return "" if value is None else str(value)


def _mlc_row(obj: dict[str, Any], english: str, source: Path, n: int, rid: str) -> ParallelRecord:
    texts = {"en": english.strip()}
    for key, val in obj.items():
        if key.startswith("prompt_"):
            try:
                lang = normalize_code(key[len("prompt_"):])
            except PolyalignError as e:
                raise DataError(str(e), source, row=n, column=key) from None
            texts[lang] = _turn_text(val).strip()
    for lang, t in texts.items():
        if not t:
            raise DataError("empty text", source, row=n, column="prompt" if lang == "en" else f"prompt_{lang}")
    return ParallelRecord(rid, texts, source=str(source), row=n)


@LOADERS.register("mlc-pku")
def load_mlc_pku(path: str | Path) -> list[ParallelRecord]:
    """MLC's DPO ``.jsonl`` (prompt/chosen/rejected) or SFT ``.json`` (instruction/input/output).

    The English responses go to ``meta`` (``chosen``/``rejected`` or ``output``).
    """
    path = one_file(path, ("*.jsonl", "*.json"), "MLC PKU file (*_dpo.jsonl or *_sft.json)")
    records = []
    if path.suffix == ".jsonl":
        for n, obj in iter_jsonl(path):
            for col in ("prompt", "chosen", "rejected"):
                if col not in obj:
                    raise DataError("missing column", path, row=n, column=col)
            r = _mlc_row(obj, _turn_text(obj["prompt"]), path, n, f"pku-dpo/{n}")
            r.meta = {"chosen": _turn_text(obj["chosen"]), "rejected": _turn_text(obj["rejected"]), "label": "harmful"}
            records.append(r)
    else:
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"invalid JSON: {e}", path) from None
        if not isinstance(rows, list):
            raise DataError("expected a JSON list of objects", path)
        for n, obj in enumerate(rows, start=1):
            for col in ("instruction", "output"):
                if col not in obj:
                    raise DataError("missing column", path, row=n, column=col)
            english = obj["instruction"] + (("\n" + obj["input"]) if obj.get("input") else "")
            r = _mlc_row(obj, english, path, n, f"pku-sft/{n}")
            r.meta = {"output": obj["output"], "label": "harmful"}
            records.append(r)
    return validate_records(records, path)


# --------------------------------------------------------------------------------------------
# English-only sources and benchmarks.

@LOADERS.register("advbench")
def load_advbench(path: str | Path) -> list[ParallelRecord]:
    path = one_file(path, ("harmful_behaviors.csv",), "AdvBench harmful_behaviors.csv")
    rows = read_csv_dicts(path, ["goal"])
    recs = [ParallelRecord(f"advbench/{i}", {"en": r["goal"].strip()}, "harmful", {"target": r.get("target")})
            for i, r in enumerate(rows)]
    return validate_records(recs, path)


@LOADERS.register("xstest")
def load_xstest(path: str | Path, label: str | None = "safe") -> list[ParallelRecord]:
    """XSTest prompts; ``label="safe"`` keeps the 250 safe prompts used for over-refusal."""
    path = one_file(path, ("*xstest*.csv",), "XSTest CSV (xstest_prompts.csv)")
    rows = read_csv_dicts(path, ["id", "prompt", "type", "label"])
    recs = [ParallelRecord(f"xstest/{r['id']}", {"en": r["prompt"].strip()}, r["type"], {"label": r["label"]})
            for r in rows if label is None or r["label"] == label]
    return validate_records(recs, path)


@LOADERS.register("mgsm")
def load_mgsm(path: str | Path, languages: list[str] | None = None) -> list[ParallelRecord]:
    """MGSM folder of ``mgsm_<lang>.tsv`` (question<TAB>answer) -> parallel records, answer in meta."""
    root = _require(Path(path))
    files = sorted(root.glob("mgsm_*.tsv")) if root.is_dir() else [root]
    per_lang: dict[str, list[list[str]]] = {}
    for f in files:
        lang = normalize_code(f.stem.split("_", 1)[1])
        if languages and lang not in languages:
            continue
        rows = [r for r in read_csv_rows(f, delimiter="\t") if r]
        for n, r in enumerate(rows, start=1):
            if len(r) < 2:
                raise DataError("expected question<TAB>answer", f, row=n)
        per_lang[lang] = rows
    if not per_lang:
        raise DataError("no mgsm_<lang>.tsv files", root)
    counts = {lang: len(r) for lang, r in per_lang.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"MGSM files are not parallel, row counts: {counts}", root)
    recs = []
    for i in range(next(iter(counts.values()))):
        answers = {lang: rows[i][1].strip() for lang, rows in per_lang.items()}
        recs.append(ParallelRecord(f"mgsm/{i}", {lang: rows[i][0].strip() for lang, rows in per_lang.items()},
                                   "math", {"answer": next(iter(answers.values()))}))
    return validate_records(recs, root)


@LOADERS.register("mmlu")
def load_mmlu(path: str | Path, split: str = "test", subjects: list[str] | None = None) -> list[ParallelRecord]:
    """MMLU ``<subject>_{dev,test}.csv`` (question,A,B,C,D,answer), English."""
    root = _require(Path(path))
    files = sorted(root.glob(f"*_{split}.csv")) if root.is_dir() else [root]
    recs = []
    for f in files:
        subject = f.stem.rsplit("_", 1)[0]
        if subjects and subject not in subjects:
            continue
        for n, r in enumerate(read_csv_rows(f), start=1):
            if len(r) != 6:
                raise DataError(f"expected 6 columns (question,A,B,C,D,answer), got {len(r)}", f, row=n)
            if r[5].strip() not in "ABCD" or not r[5].strip():
                raise DataError(f"answer must be A-D, got {r[5]!r}", f, row=n, column="answer")
            recs.append(ParallelRecord(f"mmlu/{subject}/{split}/{n}", {"en": r[0].strip()}, subject,
                                       {"choices": [c.strip() for c in r[1:5]], "answer": r[5].strip()}))
    return validate_records(recs, root)


@LOADERS.register("generic")
def load_generic(path: str | Path, columns: dict[str, str] | str | None = None, id_column: str | None = None,
                 category_column: str | None = None) -> list[ParallelRecord]:
    """Any CSV/JSONL with one column per language: ``columns`` maps language code -> column
    (``{"en": "question"}`` or the CLI's ``"en=question,th=q_th"``)."""
    if not columns:
        raise PolyalignError("--format generic needs --columns LANG=COLUMN,... (e.g. --columns en=question,th=q_th)")
    path = one_file(path, ("*.csv", "*.jsonl"), "CSV or JSONL file")
    mapping = {normalize_code(lang): col for lang, col in parse_columns(columns).items()}
    if path.suffix == ".jsonl":
        rows = [(n, obj) for n, obj in iter_jsonl(path)]
    else:
        needed = list(mapping.values()) + [c for c in (id_column, category_column) if c]
        rows = list(enumerate(read_csv_dicts(path, needed), start=2))
    recs = []
    for n, row in rows:
        texts = {}
        for lang, col in mapping.items():
            if col not in row:
                raise DataError("missing column", path, row=n, column=col)
            texts[lang] = str(row[col] or "").strip()
            if not texts[lang]:
                raise DataError("empty text", path, row=n, column=col)
        rid = str(row[id_column]) if id_column else f"{path.stem}/{n}"
        recs.append(ParallelRecord(rid, texts, row.get(category_column) if category_column else None,
                                   source=str(path), row=n))
    return validate_records(recs, path)


@LOADERS.register("jsonl")
def load_canonical(path: str | Path) -> list[ParallelRecord]:
    return read_records(one_file(path, ("*.jsonl",), "canonical parallel JSONL"))


def detect_format(path: str | Path) -> str:
    """Guess the loader for ``path`` from its layout and name."""
    p = Path(path)
    if str(path) in ("hub", MULTIJAIL_HUB):
        return "multijail"
    if not p.exists():
        raise DataError("file not found", p)
    name = p.name.lower()
    if p.is_dir():
        if any((p / d).is_dir() for d in ("en", "zh")) and any(p.glob("*/*_n.*")) or any(p.glob("en/*.csv")):
            return "xsafety"
        if any(p.glob("mgsm_*.tsv")):
            return "mgsm"
        if any(p.glob("*_test.csv")):
            return "mmlu"
        for pattern, fmt in (("harmful_behaviors.csv", "advbench"), ("*xstest*.csv", "xstest"),
                             ("pku_saferlhf*", "mlc-pku"), ("*multijail*.csv", "multijail")):
            if any(p.glob(pattern)):
                return fmt
        raise DataError("cannot tell the data set from this folder; pass --format (one of: "
                        + ", ".join(LOADERS.names()) + ")", p)
    if name.startswith("mgsm_"):
        return "mgsm"
    if "xstest" in name:
        return "xstest"
    if "harmful_behaviors" in name or "advbench" in name:
        return "advbench"
    if "multijail" in name:
        return "multijail"
    if name.startswith("pku_saferlhf") or (p.suffix == ".json"):
        return "mlc-pku"
    if p.suffix == ".jsonl":
        _, first = next(iter_jsonl(p), (0, {}))
        if "texts" in first:
            return "jsonl"
        if "prompt" in first and "chosen" in first:
            return "mlc-pku"
    raise DataError("cannot tell the data set from this file; pass --format (one of: "
                    + ", ".join(LOADERS.names()) + ")", p)


def load_source(path: str | Path, fmt: str | None = None, columns: dict[str, str] | str | None = None,
                **kwargs: Any) -> list[ParallelRecord]:
    """Load any supported source as canonical records; ``fmt`` overrides detection.

    ``columns`` (language -> column) is the generic loader's map and implies ``fmt="generic"``.
    """
    if columns:
        if fmt not in (None, "generic"):
            raise PolyalignError(f"--columns goes with --format generic, not --format {fmt}")
        return load_generic(path, columns, **kwargs)
    return LOADERS.get(fmt or detect_format(path))(path, **kwargs)
