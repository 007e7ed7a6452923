"""How two evaluation runs of the same prompts agree: responses, refusal verdicts, labels.

    python scripts/compare_verdicts.py runs/demo_a runs/demo_b            # every judged.jsonl under both
    python scripts/compare_verdicts.py runs/demo_a/baseline runs/demo_b/baseline

Pairs the rows of every ``judged.jsonl`` under each folder by (file's path relative to the folder,
prompt_id, lang) and prints, per top-level part (e.g. the demo's baseline / trained) and in all,
how many of the shared prompts have the same response, the same ``refused`` and the same ``label``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def judged_rows(root: Path) -> dict[tuple[str, str, str], dict]:
    rows = {}
    for f in sorted(root.rglob("judged.jsonl")):
        rel = str(f.parent.relative_to(root))
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                rows[(rel, r["prompt_id"], r["lang"])] = r
    return rows


def agreement(a: dict, b: dict) -> dict[str, list[int]]:
    """{part: [prompts, same response, same refused, same label]} over the keys both hold."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for key in sorted(a.keys() & b.keys()):
        x, y = a[key], b[key]
        for part in (key[0].split("/")[0], "all"):
            c = out[part]
            c[0] += 1
            c[1] += x["response"] == y["response"]
            c[2] += x.get("refused") == y.get("refused")
            c[3] += x.get("label") == y.get("label")
    return dict(out)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit(__doc__)
    a, b = (judged_rows(Path(p)) for p in argv)
    if not a.keys() & b.keys():
        sys.exit(f"no prompt is judged in both {argv[0]} and {argv[1]}")
    print("| part | prompts | same response | same refusal verdict | same label |")
    print("|---|---|---|---|---|")
    for part, (n, text, refused, label) in agreement(a, b).items():
        print(f"| {part} | {n} | {text} | {refused} | {label} |")


if __name__ == "__main__":
    main(sys.argv[1:])
