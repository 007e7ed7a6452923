"""Export: fold a LoRA adapter into its base model and write a safetensors folder + model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from polyalign.errors import PolyalignError
from polyalign.eval.report import language_rows, render_table


def model_card(info: dict[str, Any], results: list[dict[str, Any]]) -> str:
    recipe = info.get("recipe") or {}
    lines = ["---", "tags: [polyalign, multilingual-safety]", "---", "",
             f"# {Path(str(info.get('base_model', 'model'))).name} + polyalign {recipe.get('method', '')}".rstrip(), "",
             f"Base model: `{info.get('base_model')}`. Merged from a LoRA adapter trained with polyalign.", "",
             "## Training recipe", "", "```json", json.dumps(recipe, indent=1, default=str), "```", ""]
    for res in results:
        first = next(iter(res["languages"].values()))
        cols = [(k, k) for k in ("asr", "refusal", "invalid", "fidelity", "accuracy") if k in first]
        lines += [f"## {res['task']} (judge: {res.get('judge')})", "",
                  render_table(["language", *[label for _, label in cols]], language_rows(res["languages"], cols)), ""]
    return "\n".join(lines)


def export_merged(adapter: str | Path, out: str | Path, base_spec: str | None = None,
                  results: list[str | Path] | None = None, gguf: bool = False) -> Path:
    """Merge ``adapter`` into its base and save ``out`` (safetensors, tokenizer, README.md).

    ``results``: evaluation run folders whose per-language tables go into the model card.
    ``gguf``: also write ``model.gguf`` when llama.cpp's ``convert_hf_to_gguf.py`` is on PATH.
    """
    from polyalign.eval.report import load_results
    from polyalign.models import load_tokenizer, load_with_adapter, merge_adapter
    from polyalign.models.adapters import CHECKPOINT_INFO

    adapter, out = Path(adapter), Path(out)
    info_file = adapter / CHECKPOINT_INFO
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    base_spec = base_spec or info.get("base_model")
    if not base_spec:
        raise PolyalignError(f"{adapter}: no base model recorded; pass --model")
    model = merge_adapter(load_with_adapter(base_spec, adapter))
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(base_spec).save_pretrained(out)
    card = model_card({**info, "base_model": base_spec}, [load_results(r) for r in results or []])
    (out / "README.md").write_text(card)
    if gguf:
        import shutil
        import subprocess

        conv = shutil.which("convert_hf_to_gguf.py")
        if conv is None:
            raise PolyalignError("GGUF export needs llama.cpp's convert_hf_to_gguf.py on PATH")
        done = subprocess.run([conv, str(out), "--outfile", str(out / "model.gguf")], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise PolyalignError(f"GGUF export: convert_hf_to_gguf.py failed ({last})")
    return out
