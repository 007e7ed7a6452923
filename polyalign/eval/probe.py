"""Cross-language representation similarity: what MLC optimises, measured on any checkpoint."""

from __future__ import annotations

from typing import Any

import torch

from polyalign.losses.mlc import mean_pairwise_cosine, mlc_loss, top_singular_share
from polyalign.models.batching import last_token_hidden, left_pad
from polyalign.models.chat import prompt_ids
from polyalign.text.languages import parse_language_list


@torch.no_grad()
def representations(model: Any, tokenizer: Any, prompts: list[list[str]], layer: int | None = None,
                    batch_size: int = 8) -> torch.Tensor:
    """[N, L, H] hidden states (layer k, last prompt token) for N prompts in L languages each."""
    L = len(prompts[0])
    flat = [prompt_ids(tokenizer, t) for row in prompts for t in row]
    out = []
    for i in range(0, len(flat), batch_size):
        ids, mask, pos = left_pad(flat[i:i + batch_size], tokenizer.pad_token_id)
        dev = next(model.parameters()).device
        o = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                  output_hidden_states=True, logits_to_keep=1)
        hidden = o.hidden_states[-1 if layer is None else layer]
        out.append(last_token_hidden(hidden, mask.to(dev)).float().cpu())
    return torch.cat(out).view(len(prompts), L, -1)


def similarity(reps: torch.Tensor, languages: list[str]) -> dict[str, Any]:
    """Whole-set figures plus each language's mean cosine to English (where transfer is weakest)."""
    out: dict[str, Any] = {"pairwise_cosine": float(mean_pairwise_cosine(reps)),
                           "top_singular_share": float(top_singular_share(reps)), "mlc_loss_no_head": float(mlc_loss(reps))}
    if "en" in languages:
        z = torch.nn.functional.normalize(reps.double(), dim=-1)
        en = z[:, languages.index("en")]
        out["cosine_to_en"] = {lang: float((z[:, i] * en).sum(-1).mean()) for i, lang in enumerate(languages)
                               if lang != "en"}
    return out


def run_probe(model_spec: str, adapter: str | None, data: str, languages: str | None, limit: int,
              layer: int | None, console: Any, out: str | None = None, dtype: str | None = None,
              device: str | None = None) -> dict[str, dict[str, Any]]:
    import json

    from rich.table import Table

    from polyalign.data.builtin import load_prompts
    from polyalign.data.records import atomic_write_text
    from polyalign.models import load_model, load_tokenizer, load_with_adapter

    langs = parse_language_list(languages) or ["en", "zh", "th", "ar", "sw"]
    records = [r for r in load_prompts(data, None, "all", None) if all(lang in r.texts for lang in langs)][:limit]
    prompts = [[r.texts[lang] for lang in langs] for r in records]
    tok = load_tokenizer(model_spec)
    rows = {"base": similarity(representations(load_model(model_spec, dtype=dtype, device=device), tok, prompts,
                                                 layer), langs)}
    if adapter:
        model = load_with_adapter(model_spec, adapter, dtype=dtype, device=device)
        rows["adapter"] = similarity(representations(model, tok, prompts, layer), langs)
    others = [lang for lang in langs if lang != "en"] if "en" in langs else []
    table = Table(title=f"cross-language similarity, {len(prompts)} prompts x {len(langs)} languages")
    for col in ("model", "pairwise cosine", "top singular share", "MLC loss (no head)",
                *[f"cos({lang},en)" for lang in others]):
        table.add_column(col)
    for name, s in rows.items():
        table.add_row(name, f"{s['pairwise_cosine']:.4f}", f"{s['top_singular_share']:.4f}",
                      f"{s['mlc_loss_no_head']:.4f}", *[f"{s['cosine_to_en'][lang]:.4f}" for lang in others])
    console.print(table)
    if out:
        payload = {"model": model_spec, "adapter": adapter, "data": data, "languages": langs, "prompts": len(prompts),
                   "layer": layer, **rows}
        atomic_write_text(out, json.dumps(payload, indent=2))
    return rows
