"""Print a demo run's before/after table as Markdown: python scripts/demo_table.py runs/demo"""

import json
import sys
from pathlib import Path

from polyalign.demo import demo_markdown

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
print(demo_markdown(json.loads((run / "summary.json").read_text())))
