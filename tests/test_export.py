"""Export: the merged model reproduces the adapter's logits; the model card lists recipe and results."""

import json

import torch

from polyalign.export import export_merged
from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer, save_checkpoint


def test_merged_model_reproduces_adapter_logits(tmp_path):
    model = attach_lora(load_model("builtin:tiny-random"), LoraSettings(r=4, alpha=8))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    save_checkpoint(model, tmp_path / "adapter", load_tokenizer("builtin:tiny-random"),
                    info={"recipe": {"method": "msd", "msd": {"mode": "on_policy"}}})
    results = tmp_path / "eval"
    results.mkdir()
    (results / "results.json").write_text(json.dumps({"task": "builtin-harmful", "judge": "lexicon", "languages": {
        "th": {"asr": 0.25, "refusal": 0.75, "invalid": 0.0, "fidelity": 1.0}}}))
    out = export_merged(tmp_path / "adapter", tmp_path / "merged", results=[results])
    merged = load_model(str(out))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[3, 50, 7, 99, 12]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)
    card = (out / "README.md").read_text()
    assert '"method": "msd"' in card and "| th | 25.0% | 75.0% | 0.0% | 100.0% |" in card
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
