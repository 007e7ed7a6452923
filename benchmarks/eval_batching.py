"""Evaluation's batches formed by prompt tokens against by characters, side by side (issue #26).

    python benchmarks/eval_batching.py                          # 0.5B, 128 test prompts, batch 32
    python benchmarks/eval_batching.py --model builtin:tiny-random --n 16 --batch-size 4   # smoke

``generate_cached`` pads each batch to its longest prompt. It used to sort prompts by characters,
a poor proxy across scripts (a Thai or Bengali character is often several tokens, a Chinese one
about one), so batches mixed short and long prompts. Both sides run evaluation's own path
(``generate_cached`` over ``HFGenerator`` with ``decoding_linears``, greedy) on the same ``--n``
prompts drawn with a fixed seed from the built-in benchmark's split (harmful and benign, nine
languages), each into an empty cache; "characters" hides the generator's token count. Prints the
padding share of each order (over the sample and over the whole split), the time of each side
(alternating, ``--repeats``), the ratio, and how many responses are identical both ways (left
padding changes fp32 rounding, so a near-tie can flip a token), with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msd_profile import cpu_info, load  # noqa: E402

LANGS = ["en", "zh", "th", "ar", "sw", "bn", "ko", "vi", "jv"]


class ByCharacters:
    """The generator with its token count hidden: ``generate_cached`` then sorts by characters."""

    def __init__(self, inner):
        self.inner, self.batch_size = inner, inner.batch_size

    def generate(self, texts, settings):
        return self.inner.generate(texts, settings)


def padding_share(lengths: list[int], batch_size: int) -> float:
    """Share of a prefill's token slots that are padding when ``lengths`` (in order) are batched."""
    real = padded = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i:i + batch_size]
        real, padded = real + sum(chunk), padded + max(chunk) * len(chunk)
    return 1 - real / padded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    import torch

    from polyalign.data.builtin import builtin_benchmark
    from polyalign.eval.generation import (
        GenerationCache,
        GenerationSettings,
        GenRequest,
        HFGenerator,
        generate_cached,
    )
    from polyalign.models import load_model, load_tokenizer
    from polyalign.models.sampling import decoding_linears

    name, flags = cpu_info()
    print(f"# CPU: {name}; flags: {' '.join(flags)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{load()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    tok, model = load_tokenizer(args.model), load_model(args.model, dtype="float32", device="cpu").eval()
    everything = [GenRequest(r.id, lang, r.texts[lang]) for kind in ("harmful", "benign")
                  for r in builtin_benchmark(kind, args.split) for lang in LANGS if lang in r.texts]
    sample = random.Random(0).sample(everything, min(args.n, len(everything)))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    gen = HFGenerator(model, tok, args.batch_size)
    for label, reqs in ((f"these {len(sample)}", sample), (f"the whole {args.split} split ({len(everything)})", everything)):
        n_tok = [gen.prompt_length(r.text, settings) for r in reqs]
        by_chars = [n for _, n in sorted(zip([len(r.text) for r in reqs], n_tok), key=lambda x: x[0])]
        print(f"  padding share at {args.batch_size} a batch, {label} prompts: by characters "
              f"{padding_share(by_chars, args.batch_size):.1%}, by tokens {padding_share(sorted(n_tok), args.batch_size):.1%}")

    times: dict[str, list[float]] = {"characters": [], "tokens": []}
    outs: dict[str, dict] = {}
    gen.generate([sample[0].text], GenerationSettings(max_new_tokens=2))         # warm up
    with decoding_linears(model):
        for _ in range(args.repeats):
            for side, g in (("characters", ByCharacters(gen)), ("tokens", gen)):
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    rows, _, _ = generate_cached(g, sample, settings, GenerationCache(Path(tmp) / "g.jsonl"), "bench")
                    times[side].append(time.perf_counter() - t0)
                outs[side] = {(r["prompt_id"], r["lang"]): r["response"] for r in rows.values()}
    c, t = statistics.median(times["characters"]), statistics.median(times["tokens"])
    same = sum(outs["characters"][k] == outs["tokens"][k] for k in outs["tokens"])
    print(f"evaluation of {len(sample)} prompts, batch {args.batch_size}, {args.max_new_tokens} new tokens, greedy: "
          f"by characters {c:.2f} s, by tokens {t:.2f} s (medians of {args.repeats}; each: "
          f"{', '.join(f'{x:.2f}' for x in times['characters'])} / {', '.join(f'{x:.2f}' for x in times['tokens'])})")
    print(f"  ratio eval_batches_chars_vs_tokens **{c / t:.3f}**; identical responses both ways: {same}/{len(sample)}")
    print(f"# {load()}")


if __name__ == "__main__":
    main()
