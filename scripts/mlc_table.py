"""Markdown table of an MLC real run (scripts/mlc_real_run.sh): python scripts/mlc_table.py runs/mlc_real"""

import json
import sys
from pathlib import Path

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mlc_real")
names = [p.name for p in sorted(run.iterdir()) if (p / "probe.json").exists()]
names = ["base"] + [n for n in names if n != "base"]


def load(name: str, what: str) -> dict:
    f = run / name / what
    return json.loads(f.read_text()) if f.exists() else {}


probe = {n: load(n, "probe.json") for n in names}
langs = probe["base"]["languages"]
others = [lang for lang in langs if lang != "en"]
print(f"Representation similarity ({probe['base']['prompts']} built-in harmful prompts x {len(langs)} languages, "
      "last layer, last prompt token):\n")
print("| run | pairwise cosine | top singular share | " + " | ".join(f"cos({x},en)" for x in others) + " |")
print("|---|---|---|" + "---|" * len(others))
for n in names:
    s = probe[n]["adapter" if n != "base" else "base"]
    print(f"| {n} | {s['pairwise_cosine']:.3f} | {s['top_singular_share']:.3f} | "
          + " | ".join(f"{s['cosine_to_en'][x]:.3f}" for x in others) + " |")
print("\nRefusal rate per language, harmful (higher is safer) / benign (lower is better), lexicon judge:\n")
print("| run | " + " | ".join(langs) + " | mean harmful | mean benign |")
print("|---|" + "---|" * (len(langs) + 2))
for n in names:
    h, b = load(n, "harmful/results.json"), load(n, "benign/results.json")
    if not h or not b:
        continue
    cells = [f"{h['languages'][x]['refusal']:.0%} / {b['languages'][x]['refusal']:.0%}" for x in langs]
    mh = sum(h["languages"][x]["refusal"] for x in langs) / len(langs)
    mb = sum(b["languages"][x]["refusal"] for x in langs) / len(langs)
    print(f"| {n} | " + " | ".join(cells) + f" | {mh:.0%} | {mb:.0%} |")
