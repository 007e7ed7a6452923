"""Issue #26: greedy evaluation drops a row from the batch once it has ended (polyalign/models/greedy.py).

Checked against ``generate`` (which keeps every row to the end) on the tiny model in float64, with
EOS tokens chosen so that rows end at different steps: the same tokens, and batches that shrink.
"""

import pytest
import torch

from polyalign.eval.generation import GenerationSettings, HFGenerator
from polyalign.models import load_model
from polyalign.models.greedy import can_compact, eos_token_ids, greedy_decode

SPEC = "builtin:tiny-random"
SYSTEM = "You are a careful assistant. Answer briefly, in the language of the question."
QUERIES = ["hi", "a much longer prompt " * 6, "ขอโทษ", "你好吗", "Habari yako leo?", "Write a poem.", "2+2?"]


def widths_of(model):
    """Every forward's input width [rows, tokens], recorded."""
    widths: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    return widths, hook


def ending_tokens(gen, settings) -> list[int]:
    """Tokens that end the rows' greedy continuations at different steps: each row's token at step
    2 + row (a row may end earlier where one of them comes sooner)."""
    gen.compact = False
    ids = [gen.tok(r, add_special_tokens=False)["input_ids"] for r in gen.generate(QUERIES, settings)]
    return sorted({row[min(2 + i, len(row) - 1)] for i, row in enumerate(ids) if row})


def check_against_generate(tok, monkeypatch, share_head: str, device: str = "cpu") -> None:
    monkeypatch.setenv("POLYALIGN_SHARE_HEAD", share_head)
    model = load_model(SPEC).double().to(device).eval()
    gen = HFGenerator(model, tok, batch_size=8)
    settings = GenerationSettings(max_new_tokens=12, system=SYSTEM)
    model.generation_config.eos_token_id = ending_tokens(gen, settings)

    want = gen.generate(QUERIES, settings)                 # generate, every row to the end
    widths, hook = widths_of(model)
    gen.compact = True
    got = gen.generate(QUERIES, settings)
    hook.remove()
    assert got == want and any(got)
    rows = [w[0] for w in widths if w[1] == 1]             # decode steps: one new token per row
    assert rows[0] == len(QUERIES) and rows[-1] < rows[0]  # rows ended and left
    assert rows == sorted(rows, reverse=True)
    # no decode step after the last row ended or reached max_new_tokens
    assert len(rows) <= settings.max_new_tokens - 1


@pytest.mark.parametrize("share_head", ["1", "0"])
def test_rows_leave_the_batch_at_their_eos_and_the_tokens_are_generates(tiny, monkeypatch, share_head):
    check_against_generate(tiny[1], monkeypatch, share_head)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows_leave_the_batch_on_cuda_with_generates_tokens(tiny, monkeypatch):
    """The same on a GPU (scripts/gpu_check.sh runs the suite's cuda tests)."""
    check_against_generate(tiny[1], monkeypatch, "1", device="cuda")


def test_greedy_decode_stops_at_max_new_tokens_and_keeps_the_eos(tiny):
    _, tok = tiny
    model = load_model(SPEC).double().eval()
    ids = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    free = greedy_decode(model, ids, mask, pos, max_new_tokens=6, eos_ids={-1})       # no EOS: 6 each
    assert [len(r) for r in free] == [6, 6]
    stop = free[0][2]
    out = greedy_decode(model, ids, mask, pos, max_new_tokens=6, eos_ids={stop})
    assert out[0] == free[0][:free[0].index(stop) + 1]                                # up to and with the EOS
    assert out[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_sampling_and_penalties_stay_with_generate(tiny, monkeypatch):
    import polyalign.models.greedy as greedy

    _, tok = tiny
    model = load_model(SPEC).eval()
    gen = HFGenerator(model, tok, batch_size=8)
    monkeypatch.setattr(greedy, "greedy_decode", lambda *a, **k: pytest.fail("greedy_decode used"))
    gen.generate(QUERIES[:2], GenerationSettings(max_new_tokens=3, do_sample=True))
    gen.generate(QUERIES[:2], GenerationSettings(max_new_tokens=3, repetition_penalty=1.1))


def test_compaction_needs_full_attention_and_can_be_switched_off(tiny, monkeypatch):
    model, tok = tiny
    assert can_compact(model)
    assert eos_token_ids(model, tok) == {model.generation_config.eos_token_id}
    monkeypatch.setenv("POLYALIGN_COMPACT_DECODE", "0")
    assert not can_compact(model)
    monkeypatch.delenv("POLYALIGN_COMPACT_DECODE")
    sliding = load_model(SPEC)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert not can_compact(sliding)
    mistral_like = load_model(SPEC)                     # a window and no layer_types
    mistral_like.config.layer_types, mistral_like.config.sliding_window = None, 4096
    assert not can_compact(mistral_like)
    mistral_like.config.sliding_window = None
    assert can_compact(mistral_like)


def test_a_model_with_its_own_generate_keeps_it(tiny):
    """Not a Hugging Face model (a wrapper or a test stub with its own ``generate``): no compaction."""
    model, _ = tiny

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

    assert not can_compact(Wrapper())


def test_benchmark_compares_generate_with_compaction_on_the_tiny_model():
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_batch_size.py"
    out = subprocess.run([sys.executable, str(bench), "--model", SPEC, "--sizes", "4", "--compact", "--limit", "2",
                          "--repeats", "1", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2 and "decoded to the end" in rows[0] and "leave the batch" in rows[1]
    assert rows[1].endswith("| 36/36 | 36/36 |") and "ratio eval_compact_decode_vs_generate" in out.stdout


def test_the_trainers_greedy_answers_are_generates_with_rows_leaving(tiny, tmp_path, monkeypatch):
    """``msd.mode: sft`` targets and the gating probe (``sample_responses(greedy=True)``) decode as
    evaluation does: the same tokens as ``generate`` in float64, rows ending at different steps leave."""
    from polyalign.data.builtin import load_prompts
    from polyalign.models import LoraSettings, attach_lora
    from polyalign.train.msd_config import MSDConfig
    from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples
    from polyalign.train.recipes import Recipe, training_arguments

    _, tok = tiny
    model = attach_lora(load_model(SPEC).double(), LoraSettings(r=4, alpha=8))
    cfg = MSDConfig(mode="sft", student_languages=["th", "sw"], max_new_tokens=10, harmful_hint="refuse",
                    language_hint=True)
    examples = build_msd_examples(load_prompts("builtin:all", None, "train", 3), cfg)
    r = Recipe(method="msd", model=SPEC, output_dir=str(tmp_path / "out"),
               training={"max_steps": 1, "per_device_train_batch_size": 4})
    trainer = MSDTrainer(model, training_arguments(r), cfg, examples, tok)
    _, teacher = trainer._prompts(examples)

    def answers(compact: str) -> list[list[int]]:
        monkeypatch.setenv("POLYALIGN_COMPACT_DECODE", compact)
        return trainer.sample_responses(model, teacher, from_teacher=True, greedy=True, max_new_tokens=10)

    free = answers("0")
    trainer.eos_ids = {row[min(2 + i % 5, len(row) - 1)] for i, row in enumerate(free) if row}
    want = answers("0")
    widths, hook = widths_of(model.get_base_model())
    got = answers("1")
    hook.remove()
    assert got == want and len({len(a) for a in got}) > 1       # rows ended at different steps
    rows = [w[0] for w in widths if w[1] == 1]
    assert rows[0] == len(teacher) and rows[-1] < rows[0]        # and left the batch
    assert model.training == trainer.model.training


def test_benchmark_compares_the_teachers_answers_on_the_tiny_model():
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_targets.py"
    out = subprocess.run([sys.executable, str(bench), "--model", SPEC, "--prompts", "4", "--sizes", "2,4",
                          "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| generate", "| greedy_ids"))]
    assert len(rows) == 3 and all("| 4/4 |" in row for row in rows)      # fp32, tiny: the same answers
    assert "ratio teacher_targets_compact_vs_generate" in out.stdout
