"""The fused paths read only the final hidden state: caught by a hook, not a tuple of every layer's."""

import torch

from polyalign.models import LoraSettings, attach_lora, load_model
from polyalign.models.batching import final_hidden_forward, response_batch, response_hidden


def _batch(tok):
    prompts = [tok("hello there")["input_ids"], tok("a longer prompt, with more words in it")["input_ids"]]
    responses = [[5, 6, 7], [8, 9]]
    return response_batch(prompts, responses, tok.pad_token_id)


def test_final_hidden_forward_equals_the_last_of_all_hidden_states(tiny):
    model, tok = tiny                     # the shared model stays unwrapped: LoRA goes on a fresh one
    for m in (model, attach_lora(load_model("builtin:tiny-random"), LoraSettings(r=4, alpha=8))):
        b = _batch(tok)
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
        with torch.no_grad():
            want = m(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]
            out, got = final_hidden_forward(m, **inputs, logits_to_keep=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert out.logits.shape[1] == 1


def test_response_hidden_asks_for_no_hidden_states_tuple(tiny):
    model, tok = tiny
    seen = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("output_hidden_states")),
                                             with_kwargs=True)
    try:
        h = response_hidden(model, _batch(tok), model.get_output_embeddings())
    finally:
        handle.remove()
    assert seen == [None] and h.shape[:2] == (2, 3)


def test_folded_lora_frees_its_weights_on_exit_without_the_cyclic_gc():
    """The folded weights die with the context (refcount), not at the next cyclic GC: a per-call
    class closing over them leaked ~1 GB a step on the 0.5B demo (killed at 24 GB, 2026-12-04)."""
    import gc
    import weakref

    from polyalign.models.sampling import folded_lora

    model = attach_lora(load_model("builtin:tiny-random"), LoraSettings(r=4, alpha=8))
    refs = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            with folded_lora(model):
                folded = [m for m in model.modules() if type(m).__name__ == "FoldedLinear"]
                assert folded
                refs += [weakref.ref(m.folded_weight) for m in folded]
                del folded
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
