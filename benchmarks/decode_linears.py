"""Decoding with oneDNN's few-row products against MKL's, side by side (issue #26).

    python benchmarks/decode_linears.py                      # 0.5B, 3 alternating repeats of each side
    python benchmarks/decode_linears.py --model builtin:tiny-random --repeats 1     # smoke
    python benchmarks/decode_linears.py --decode-profile     # the token draw, and a decode step by part
    python benchmarks/decode_linears.py --packing            # oneDNN on weights packed once vs plain
    python benchmarks/decode_linears.py --products-only --dtype bfloat16   # bf16 products (a CPU with AMX)
    python benchmarks/decode_linears.py --lora-beside --dtype bfloat16     # MSD sampling: LoRA folded vs beside
    python benchmarks/decode_linears.py --pack-folded --dtype bfloat16     # MSD sampling: folded bf16 packed or not

Two workloads, each timed with the previous path and with :func:`polyalign.models.sampling.decoding_linears`
(oneDNN for every linear layer while it multiplies at most ``ONEDNN_MAX_ROWS`` rows), the two sides
alternating so that a machine's drift hits both alike:

* ``msd sampling``: the demo's on-policy sampling (recipes/msd_selective.yaml): 8 prompts of the
  built-in benchmark's train split over the eight non-English languages, LoRA r=16 on every linear
  layer with a non-zero (trained-like) B, temperature 1, 48 new tokens, the same seed on both sides.
  Previous path: :func:`polyalign.models.sampling.folded_lora` (LoRA folded, MKL products).
* ``evaluation``: the demo's evaluation batch: 32 dev prompts (harmful and benign, nine languages),
  greedy, 40 new tokens, the base model. Previous path: the model as loaded.

``--packing`` times the same two workloads with oneDNN on plain weights (``POLYALIGN_ONEDNN_PACK=0``,
the path of commit 8a16c45) against oneDNN on weights packed once into its own layout.

Also per workload: how many of the rows generated the same tokens both ways (fp32 rounding differs
between the two libraries, so a near-tie can flip a token and the rest of that row with it), and
the layer products alone (rows 8, 32 and 512) per weight shape, and the machine's memory read rate. Prints the CPU model and flags.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msd_profile import cpu_info, load  # noqa: E402


def prompts(tok, split: str, languages: list[str], n: int, kinds: tuple[str, ...]) -> list[list[int]]:
    from polyalign.data.builtin import builtin_benchmark
    from polyalign.models.chat import prompt_ids

    records = [r for kind in kinds for r in builtin_benchmark(kind, split)]
    texts = [records[i].texts[languages[i % len(languages)]] for i in range(n)]
    return [prompt_ids(tok, t) for t in texts]


def generate(model, tok, ids: list[list[int]], greedy: bool, new_tokens: int, seed: int,
             draw: str = "multinomial") -> tuple[float, torch.Tensor]:
    from polyalign.models.batching import left_pad
    from polyalign.models.sampling import sampling_kwargs

    x, mask, _ = left_pad(ids, tok.pad_token_id)
    kwargs = sampling_kwargs(new_tokens, 0.0 if greedy else 1.0, 1.0, tok.pad_token_id, draw=draw)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=mask, **kwargs)
    return time.perf_counter() - t0, out[:, x.shape[1]:]


def side_by_side(name: str, model, tok, ids, greedy: bool, new_tokens: int, before, after, repeats: int,
                 sides: str = "mkl_vs_onednn", batch: int | None = None, draw: str = "multinomial") -> float:
    """Median seconds of each side, alternating; prints them, the ratio and the rows' agreement.
    ``batch``: cut ``ids`` into batches of that many rows, all generated inside one entry of the
    side's context, as an evaluation run does (what a context sets up once is paid once)."""
    times: dict[str, list[float]] = {"before": [], "after": []}
    outs: dict[str, list[torch.Tensor]] = {}
    chunks = [ids[i:i + batch] for i in range(0, len(ids), batch)] if batch else [ids]
    generate(model, tok, ids[:2], greedy, 4, 0)                              # warm up
    for _ in range(repeats):
        for side, ctx in (("before", before), ("after", after)):
            outs[side], dt = [], 0.0
            with ctx():
                for chunk in chunks:
                    t, out = generate(model, tok, chunk, greedy, new_tokens, seed=1234, draw=draw)
                    dt += t
                    outs[side].extend(out)
            times[side].append(dt)
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    same = sum(torch.equal(x, y) for x, y in zip(outs["before"], outs["after"]))
    tokens = int(sum((o != tok.pad_token_id).sum() for o in outs["after"]))
    print(f"{name}: {len(ids)} rows" + (f" in {len(chunks)} batches" if batch else "") + f", {new_tokens} new tokens, "
          f"{'greedy' if greedy else 'sampled'}; "
          f"before {b:.2f} s, after {a:.2f} s (medians of {repeats}; each: "
          f"{', '.join(f'{t:.2f}' for t in times['before'])} / {', '.join(f'{t:.2f}' for t in times['after'])}); "
          f"{tokens / a:.1f} tokens/s after")
    print(f"  ratio {name.replace(' ', '_')}_{sides} **{b / a:.3f}**; rows with the same tokens both ways: {same}/{len(ids)}")
    return b / a


@contextlib.contextmanager
def switch(name: str, on: bool):
    """The environment switch ``name`` set to "1" / "0" inside the block, as it was after it."""
    import os

    old = os.environ.get(name)
    os.environ[name] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def lora_beside(model, on: bool, keep):
    """:func:`decoding_linears` as the MSD trainer enters it every step (one ``keep`` for all steps),
    with LoRA folded into a new weight (``on`` False, the default) or beside the base, which is
    packed once and kept (``POLYALIGN_LORA_BESIDE=1``)."""
    from polyalign.models.sampling import decoding_linears

    with switch("POLYALIGN_LORA_BESIDE", on), decoding_linears(model, keep=keep):
        yield


@contextlib.contextmanager
def folded_packing(model, on: bool, keep):
    """:func:`decoding_linears` as the MSD trainer enters it every step, its folded bf16 layers packed
    for oneDNN at their first few-row product (``on``, ``sampling.PACK_FOLDED``, the default since
    2026-12-06) or read plain (before); packing is inside the timed generation."""
    from polyalign.models import sampling

    before = sampling.PACK_FOLDED
    sampling.PACK_FOLDED = on
    try:
        with sampling.decoding_linears(model, keep=keep):
            yield
    finally:
        sampling.PACK_FOLDED = before


@contextlib.contextmanager
def packing(model, on: bool):
    """:func:`decoding_linears` with oneDNN's weights packed once (``on``) or read plain each product;
    packing included in the timing: every layer is packed anew in each generation (in training the
    frozen LM head is packed once for all steps)."""
    from polyalign.models.sampling import decoding_linears

    with switch("POLYALIGN_ONEDNN_PACK", on), decoding_linears(model):
        yield


def read_bandwidth(gib: float = 1.0, trials: int = 3) -> float:
    """GB/s of one ``sum`` over a ``gib`` GiB fp32 tensor, best of ``trials``: what a product that only
    streams its weights once could reach."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def products(model, repeats: int = 20) -> None:
    """Each distinct linear shape of ``model``, rows 8, 32 (decoding) and 512 (a prefill): F.linear
    (MKL in fp32; oneDNN's own call in bf16) vs oneDNN vs oneDNN on the weight packed for that row
    count, ms, in the model's dtype."""
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if type(m) is torch.nn.Linear})
    dtype = next(model.parameters()).dtype
    for rows in (8, 32, 512):
        cells = []
        for out_f, in_f in shapes:
            w, x = torch.randn(out_f, in_f, dtype=dtype), torch.randn(rows, in_f, dtype=dtype)
            wp = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            t = {}
            for side, f in (("mkl", lambda x=x, w=w: torch.nn.functional.linear(x, w)),
                            ("onednn", lambda x=x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")),
                            ("packed", lambda x=x, w=wp: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))):
                f()
                t0 = time.perf_counter()
                for _ in range(repeats):
                    f()
                t[side] = (time.perf_counter() - t0) / repeats * 1e3
            cells.append(f"[{out_f}x{in_f}] {t['mkl']:.2f}/{t['onednn']:.2f}/{t['packed']:.2f} ms "
                         f"({t['mkl'] / t['onednn']:.2f}x, {t['onednn'] / t['packed']:.2f}x)")
        print(f"  {dtype} products at {rows} rows, F.linear/oneDNN/oneDNN packed (F.linear/oneDNN, oneDNN/packed): " + "; ".join(cells))


def draws(vocab: int, rows: int = 8, repeats: int = 20) -> None:
    """The token draw alone at ``rows`` x ``vocab``: torch.multinomial over the softmax (what ``generate``
    samples with) vs :class:`polyalign.models.sampling.InverseCDFDraw` (softmax included), median ms."""
    from polyalign.models.sampling import InverseCDFDraw

    scores, draw = torch.randn(rows, vocab), InverseCDFDraw()
    t = {}
    for side, f in (("multinomial", lambda: torch.multinomial(torch.softmax(scores, -1), 1)),
                    ("inverse_cdf", lambda: draw(None, scores))):
        f()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            runs.append(time.perf_counter() - t0)
        t[side] = statistics.median(runs) * 1e3
    print(f"  draw of one token, {rows} x {vocab}: multinomial {t['multinomial']:.2f} ms, inverse CDF "
          f"{t['inverse_cdf']:.2f} ms (ratio {t['multinomial'] / t['inverse_cdf']:.1f}x)")


def decode_profile(model, tok, ids: list[list[int]], new_tokens: int, draw: str) -> None:
    """torch's profiler over the demo's sampling (decoding_linears on): ms per decode step in the
    products, the draw and the rest. ``generate`` with 1 new token is the prefill, subtracted."""
    from torch.profiler import ProfilerActivity, profile

    from polyalign.models.batching import left_pad
    from polyalign.models.sampling import decoding_linears, sampling_kwargs

    x, mask, _ = left_pad(ids, tok.pad_token_id)
    groups = {"products": ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm"),
              "draw": ("aten::exponential_", "aten::cumsum", "aten::searchsorted", "aten::rand")}
    per_step = {}
    with decoding_linears(model), torch.no_grad():
        for n in (1, new_tokens):
            kwargs = sampling_kwargs(n, 1.0, 1.0, tok.pad_token_id, draw=draw)
            model.generate(input_ids=x, attention_mask=mask, **kwargs)                      # warm
            torch.manual_seed(0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.generate(input_ids=x, attention_mask=mask, **kwargs)
            ev = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in ev) / 1e3
            part = {g: sum(e.self_cpu_time_total for e in ev if e.key in keys) / 1e3 for g, keys in groups.items()}
            per_step[n] = {**part, "other": total - sum(part.values()), "all": total}
    steps = new_tokens - 1
    cells = {k: (per_step[new_tokens][k] - per_step[1][k]) / steps for k in per_step[1]}
    print(f"  decode step ({draw} draw, {len(ids)} rows, profiler on): {cells['all']:.1f} ms: products "
          f"{cells['products']:.1f}, draw {cells['draw']:.1f}, other {cells['other']:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--products-only", action="store_true", help="the per-shape products alone (a minute)")
    p.add_argument("--packing", action="store_true",
                   help="both workloads with oneDNN on plain weights vs on weights packed once (a few minutes)")
    p.add_argument("--decode-profile", action="store_true",
                   help="the draw side by side and where a decode step of the demo's sampling goes (two minutes)")
    p.add_argument("--lora-beside", action="store_true",
                   help="the demo's MSD sampling with LoRA folded (as trained) vs beside a base packed once")
    p.add_argument("--pack-folded", action="store_true",
                   help="the demo's MSD sampling with folded bf16 layers packed for oneDNN (default) or read plain")
    p.add_argument("--eval-batches", type=int, default=1,
                   help="N: the evaluation workload is N batches of 32 in one context, as a run generates them")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the base model's dtype (bf16: where the CPU has it natively)")
    args = p.parse_args()

    from polyalign.models import load_model, load_tokenizer
    from polyalign.models.adapters import LoraSettings, attach_lora
    from polyalign.models.sampling import decoding_linears, folded_lora, onednn_decoding_enabled

    name, flags = cpu_info()
    print(f"# CPU: {name}; flags: {' '.join(flags)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{load()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if not onednn_decoding_enabled():
        print("oneDNN's linear op is not in this torch build (or POLYALIGN_ONEDNN_DECODE=0): nothing to compare")
        return
    tok = load_tokenizer(args.model)
    base = load_model(args.model, dtype=args.dtype, device="cpu").eval()
    langs = ["zh", "th", "ar", "sw", "bn", "ko", "vi", "jv"]
    if args.decode_profile:
        draws(base.get_output_embeddings().weight.shape[0])
        torch.manual_seed(0)
        model = attach_lora(base, LoraSettings(r=16, alpha=32)).eval()
        ids = prompts(tok, "train", langs, 8, ("harmful",))
        for draw in ("multinomial", "inverse_cdf"):
            decode_profile(model, tok, ids, 48, draw)
        return
    if args.lora_beside or args.pack_folded:
        from polyalign.models.sampling import PackedWeights

        torch.manual_seed(0)
        model = attach_lora(base, LoraSettings(r=16, alpha=32)).eval()
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if "lora_B" in n:
                    prm.normal_(0, 1e-3)                     # a trained-like adapter (B starts at zero)
        keep = PackedWeights()                               # the trainer's: one for every step
        ids_train = prompts(tok, "train", langs, 8, ("harmful",))
        if args.pack_folded:
            side_by_side("msd sampling", model, tok, ids_train, False, 48, lambda: folded_packing(model, False, keep),
                         lambda: folded_packing(model, True, keep), args.repeats, "folded_plain_vs_packed",
                         draw="inverse_cdf")                # the trainer's draw (msd.draw)
        else:
            side_by_side("msd sampling", model, tok, ids_train, False, 48, lambda: lora_beside(model, False, keep),
                         lambda: lora_beside(model, True, keep), args.repeats, "folded_vs_beside")
        print(f"# {load()}")
        return
    print(f"  memory read: {read_bandwidth():.1f} GB/s (sum over a 1 GiB fp32 tensor, best of 3)")
    products(base)
    if args.products_only:
        return
    ids_eval = prompts(tok, "dev", ["en", *langs], 32 * args.eval_batches, ("harmful", "benign"))
    if args.packing:
        side_by_side("evaluation", base, tok, ids_eval, True, 40, lambda: packing(base, False),
                     lambda: packing(base, True), args.repeats, "plain_vs_packed", batch=32)
    else:
        side_by_side("evaluation", base, tok, ids_eval, True, 40, contextlib.nullcontext,
                     lambda: decoding_linears(base), args.repeats, batch=32)

    torch.manual_seed(0)
    model = attach_lora(base, LoraSettings(r=16, alpha=32)).eval()
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 1e-3)                     # a trained-like adapter (B starts at zero)
    ids_train = prompts(tok, "train", langs, 8, ("harmful",))
    if args.packing:
        side_by_side("msd sampling", model, tok, ids_train, False, 48, lambda: packing(model, False),
                     lambda: packing(model, True), args.repeats, "plain_vs_packed")
    else:
        side_by_side("msd sampling", model, tok, ids_train, False, 48, lambda: folded_lora(model),
                     lambda: decoding_linears(model), args.repeats)
    print(f"# {load()}")


if __name__ == "__main__":
    main()
