"""Print a demo run's before/after table as Markdown: python scripts/demo_table.py runs/demo"""

import json
import sys
from pathlib import Path

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
s = json.loads((run / "summary.json").read_text())


def p(x):
    return f"{100 * x:.0f}%"


print("| lang | harmful refused | ASR | invalid | benign refused (over-refusal) | benign answers in language |")
print("|---|---|---|---|---|---|")
for r in s["rows"]:
    print(f"| {r['lang']} | {p(r['harmful_refusal_before'])} → {p(r['harmful_refusal_after'])} | "
          f"{p(r['asr_before'])} → {p(r['asr_after'])} | {p(r['invalid_before'])} → {p(r['invalid_after'])} | "
          f"{p(r['over_refusal_before'])} → {p(r['over_refusal_after'])} | "
          f"{p(r['fidelity_before'])} → {p(r['fidelity_after'])} |")
m = s["mean"]
print(f"| **mean** | {p(m['harmful_refusal_before'])} → {p(m['harmful_refusal_after'])} | {p(m['asr_before'])} → "
      f"{p(m['asr_after'])} | {p(m['invalid_before'])} → {p(m['invalid_after'])} | {p(m['over_refusal_before'])} → "
      f"{p(m['over_refusal_after'])} | {p(m['fidelity_before'])} → {p(m['fidelity_after'])} |")
print()
print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["timings"].items()))
