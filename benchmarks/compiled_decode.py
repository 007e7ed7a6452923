"""Decoding with transformers' own compiled forward on the CPU, against eager decoding (issue #26).

    python benchmarks/compiled_decode.py                           # 0.5B, the policy's dtype, 8 prompts, 48 tokens
    python benchmarks/compiled_decode.py --model builtin:tiny-random --tokens 4 --repeats 1   # smoke

``benchmarks/sampling_split.py`` finds about 30 % of a decode step in small operators that cost the
same in bf16 and fp32 (norms, rotary, the KV cache, attention, residual adds, Python). Fusing them
takes a compiler. transformers compiles the decoding forward itself when ``generate`` runs with a
static cache (``cache_implementation="static"``) and a ``CompileConfig`` that allows every device
(``_compile_all_devices``; by default only accelerators). This times, on ``--batch`` harmful
train prompts of the built-in benchmark, each in the next non-English language (greedy, so the
sides' tokens can be compared):

- eager: plain ``generate`` (dynamic cache, no compilation);
- ours: the same inside ``decoding_linears``, as evaluation and MSD sampling run it (few-row
  products on oneDNN with packed weights);
- compiled: plain ``generate`` with the static cache and the compiled forward (``--freezing``:
  inductor's freezing, which folds the weights in as constants and packs them for oneDNN; weights
  that change, as a folded adapter does every MSD step, would recompile); its first call includes the
  compilation (printed apart), then ``--repeats`` timed calls.

Only the base model is timed (no LoRA stand-ins, no shared prefix): the question is what the
compiler makes of the layers' small operators, before any of it is wired into the MSD step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--freezing", action="store_true", help="torch._inductor.config.freezing for the compiled side")
    args = p.parse_args()
    import msd_profile as mp
    from transformers import CompileConfig

    from polyalign.data.builtin import load_prompts
    from polyalign.models import load_model, load_tokenizer
    from polyalign.models.batching import left_pad
    from polyalign.models.chat import prompt_ids
    from polyalign.models.loading import model_dtype
    from polyalign.models.sampling import decoding_linears, sampling_kwargs

    name, flags = mp.cpu_info()
    print(f"# cpu: {name}, torch threads {torch.get_num_threads()}; flags: {' '.join(flags)}")
    print(f"# {mp.load()} at start; torch {torch.__version__}", flush=True)
    model = load_model(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    recs = load_prompts("builtin:harmful", None, "train", args.batch, seed=0)
    langs = ["zh", "th", "ar", "sw", "bn", "ko", "vi", "jv"]
    prompts = [prompt_ids(tok, r.texts.get(langs[i % len(langs)]) or r.texts["en"]) for i, r in enumerate(recs[:args.batch])]
    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    kw = sampling_kwargs(args.tokens, 0.0, pad_token_id=tok.pad_token_id)
    kw.update(min_new_tokens=args.tokens, min_length=None)      # every call decodes the same number of steps
    print(f"# model {args.model}, {model_dtype(model)}: {len(prompts)} prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, {args.tokens} greedy tokens", flush=True)

    def eager() -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, **kw)

    def ours() -> torch.Tensor:
        with decoding_linears(model):
            return model.generate(input_ids=ids, attention_mask=mask, **kw)

    if args.freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    compile_config = CompileConfig(fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True

    def compiled() -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static",
                              compile_config=compile_config, **kw)

    def timed(f) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = f()
        return time.perf_counter() - t0, out

    sides = {"eager": eager, "ours": ours, "compiled": compiled}
    first, outs = {}, {}
    for side, f in sides.items():
        first[side], outs[side] = timed(f)
    print("# first calls: " + ", ".join(f"{k} {v:.2f} s" for k, v in first.items()) + " (compilation included)",
          flush=True)
    times: dict[str, list[float]] = {k: [] for k in sides}
    order = list(sides)
    for k in range(args.repeats):
        for side in (order if k % 2 == 0 else order[::-1]):
            sec, outs[side] = timed(sides[side])
            times[side].append(sec)
    med = {k: statistics.median(v) for k, v in times.items()}
    for side in sides:
        print(f"{side}: {med[side]:.2f} s a call ({len(prompts)} rows: prefill, {args.tokens} tokens; the oneDNN side "
              f"packs its weights in each call), median of {args.repeats}; the same tokens as eager: "
              f"{torch.equal(outs[side], outs['eager'])}")
    print(f"ratio decode_compiled_vs_eager {med['eager'] / med['compiled']:.3f}")
    print(f"ratio decode_compiled_vs_ours {med['ours'] / med['compiled']:.3f}")
    print(f"# {mp.load()} at end")


if __name__ == "__main__":
    main()
