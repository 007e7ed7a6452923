"""Decoding with transformers' own compiled forward on the CPU, against eager decoding (issue #26).

    python benchmarks/compiled_decode.py                           # 0.5B, the policy's dtype, 8 prompts, 48 tokens
    python benchmarks/compiled_decode.py --model builtin:tiny-random --tokens 4 --repeats 1   # smoke

``benchmarks/sampling_split.py`` finds a quarter of a decode step in small operators that cost the
same in bf16 and fp32 (norms, rotary, the KV cache, attention, residual adds, Python). Fusing them
takes a compiler. transformers compiles the decoding forward itself when ``generate`` runs with a
static cache (``cache_implementation="static"``) and a ``CompileConfig`` that allows every device
(``_compile_all_devices``; by default only accelerators). This times, on the demo's first MSD batch
of student prompts (greedy, so the two sides' tokens can be compared):

- eager: ``generate`` as evaluation runs it (dynamic cache, no compilation);
- compiled: the same with the static cache and the compiled forward; its first call includes the
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
    args = p.parse_args()
    import msd_profile as mp
    from transformers import CompileConfig

    from polyalign.data.builtin import load_prompts
    from polyalign.models import load_model, load_tokenizer
    from polyalign.models.batching import left_pad
    from polyalign.models.chat import prompt_ids
    from polyalign.models.loading import model_dtype
    from polyalign.models.sampling import sampling_kwargs

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

    first_eager, ref = timed(eager)
    first_compiled, out = timed(compiled)
    print(f"# first calls: eager {first_eager:.2f} s, compiled {first_compiled:.2f} s (compilation included)",
          flush=True)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    same = torch.equal(ref, out)
    for k in range(args.repeats):
        for side, f in ((("eager", eager), ("compiled", compiled)) if k % 2 == 0 else
                        (("compiled", compiled), ("eager", eager))):
            sec, o = timed(f)
            times[side].append(sec)
            same = same and torch.equal(o, ref)
    e, c = (statistics.median(times[s]) for s in ("eager", "compiled"))
    print(f"eager {e:.2f} s ({e / args.tokens * 1e3:.1f} ms a token), compiled {c:.2f} s "
          f"({c / args.tokens * 1e3:.1f} ms a token), medians of {args.repeats}; the same tokens: {same}")
    print(f"ratio decode_compiled_vs_eager {e / c:.3f}")
    print(f"# {mp.load()} at end")


if __name__ == "__main__":
    main()
