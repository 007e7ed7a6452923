"""Issue #26: decoding's few-row products go to oneDNN on a CPU in fp32 (and bf16 where native), computing
what F.linear does.

oneDNN's op has no backward, so anything that needs a gradient must stay with ``F.linear``; and the
swap, like ``folded_lora``'s, must put every module back and leave every weight bit for bit.
"""

import pytest
import torch

from polyalign.models import LoraSettings, attach_lora, load_model, load_tokenizer
from polyalign.models.batching import left_pad
from polyalign.models.chat import prompt_ids
from polyalign.models.sampling import (
    ONEDNN_MAX_ROWS,
    PackedWeights,
    _linear,
    decoding_linears,
    onednn_decoding_enabled,
    sampling_kwargs,
)

SPEC = "builtin:tiny-random"
pytestmark = pytest.mark.skipif(not onednn_decoding_enabled(), reason="this torch build has no oneDNN linear op")


def onednn_calls(fn) -> int:
    """How many oneDNN linear ops ``fn()`` ran (torch's profiler names each op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b by explicit sums in float64."""
    x64, w64 = x.double().reshape(-1, x.shape[-1]), w.double()
    out = torch.stack([torch.stack([(row * w64[j]).sum() for j in range(w64.shape[0])]) for row in x64])
    if b is not None:
        out = out + b.double()
    return out.reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("shape", [(3, 40), (2, 1, 40), (2, ONEDNN_MAX_ROWS, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_for_decoding_matches_a_float64_reference(shape, bias):
    torch.manual_seed(0)
    w, b, x = torch.randn(300, 40), torch.randn(300) if bias else None, torch.randn(*shape)
    layer = _linear(w, b, onednn=True)
    with torch.no_grad():
        out = layer(x)
        calls = onednn_calls(lambda: layer(x))
    torch.testing.assert_close(out.double(), reference(x, w, b), rtol=1e-5, atol=1e-5)
    rows = x.numel() // x.shape[-1]
    assert calls == (1 if rows <= ONEDNN_MAX_ROWS else 0)


def test_many_rows_narrow_layers_and_other_dtypes_stay_with_f_linear():
    torch.manual_seed(0)
    x = torch.randn(ONEDNN_MAX_ROWS + 1, 40)
    with torch.no_grad():
        assert onednn_calls(lambda: _linear(torch.randn(300, 40), None, onednn=True)(x)) == 0     # a prefill
        assert onednn_calls(lambda: _linear(torch.randn(64, 40), None, onednn=True)(x[:4])) == 0  # k / v size
        assert onednn_calls(lambda: _linear(torch.randn(300, 40), None, onednn=False)(x[:4])) == 0
        w16 = torch.randn(300, 40, dtype=torch.float16)
        assert onednn_calls(lambda: _linear(w16, None, onednn=True)(x[:4].half())) == 0      # another dtype


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_goes_to_onednn_only_where_the_cpu_has_it_and_computes_f_linear(monkeypatch, fast_bf16):
    """bf16 few-row products take oneDNN's path only on a CPU with native bf16 (emulated, it is ~100x
    slower); there they match F.linear in bf16 (bit for bit on AMX; within bf16 rounding where
    oneDNN emulates it, as on a CPU without it that runs this test), frozen and folded weights packed."""
    import polyalign.models.loading as loading

    if fast_bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN refuses bf16 on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)")
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda cpuinfo=None: fast_bf16)
    torch.manual_seed(0)
    w = torch.randn(300, 40).bfloat16()
    x = torch.randn(4, 40).bfloat16()
    frozen = torch.nn.Parameter(w, requires_grad=False)
    with torch.no_grad():
        for layer in (_linear(w, None, onednn=True), _linear(w, None, True, frozen, PackedWeights())):
            assert onednn_calls(lambda layer=layer: layer(x)) == (1 if fast_bf16 else 0)
            torch.testing.assert_close(layer(x).float(), torch.nn.functional.linear(x, w).float(), rtol=1e-2, atol=1e-2)
            assert layer.pack == fast_bf16


def test_a_product_that_needs_a_gradient_never_goes_to_onednn():
    """oneDNN's op has no backward: under autograd the layer must keep the graph."""
    torch.manual_seed(0)
    w = torch.randn(300, 40, requires_grad=True)
    x = torch.randn(4, 40, requires_grad=True)
    layer = _linear(w, None, onednn=True)
    assert onednn_calls(lambda: layer(x)) == 0
    layer(x).square().sum().backward()
    w_ref, x_ref = w.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x_ref, w_ref).square().sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("peft", [False, True])
def test_decoding_linears_generates_as_the_model_and_puts_everything_back(peft):
    torch.manual_seed(0)
    tok = load_tokenizer(SPEC)
    model = load_model(SPEC)
    if peft:
        model = attach_lora(model, LoraSettings(r=4, alpha=8))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = {n: m for n, m in model.named_modules()}
    ids, mask, _ = left_pad([prompt_ids(tok, "hello there"), prompt_ids(tok, "bye there")], tok.pad_token_id)
    kwargs = {**sampling_kwargs(8, 0.0, pad_token_id=tok.pad_token_id), "attention_mask": mask}
    with torch.no_grad():
        want = model.generate(input_ids=ids, **kwargs)
        with decoding_linears(model):
            assert not any(type(m) is torch.nn.Linear for m in model.modules())
            got = model.generate(input_ids=ids, **kwargs)
            calls = onednn_calls(lambda: model.generate(input_ids=ids, **kwargs))
    assert calls > 0                                       # the LM head (512 x 64) at least
    assert got.tolist() == want.tolist()
    assert {n: m for n, m in model.named_modules()} == modules          # the same module objects back
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_decoding_linears_is_off_when_switched_off(monkeypatch):
    monkeypatch.setenv("POLYALIGN_ONEDNN_DECODE", "0")
    model = load_model(SPEC).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), decoding_linears(model):
        assert onednn_calls(lambda: model(ids)) == 0


@pytest.mark.parametrize("rows", [3, 8, 32])
def test_a_packed_weight_computes_what_the_plain_one_does(rows):
    """The weight reordered once into oneDNN's layout gives oneDNN's own product on the plain weight,
    bit for bit, and a float64 reference within fp32 rounding; it is packed once, not per call."""
    torch.manual_seed(0)
    w, b, x = torch.randn(300, 40), torch.randn(300), torch.randn(rows, 40)
    layer = _linear(w, b, onednn=True)
    with torch.no_grad():
        got = layer(x)
        packed = layer.packed_weight
        again = layer(x)
    assert packed is not None and packed.is_mkldnn and layer.packed_weight is packed
    assert torch.equal(got, torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""))
    assert torch.equal(again, got)
    torch.testing.assert_close(got.double(), reference(x, w, b), rtol=1e-5, atol=1e-5)


def test_a_frozen_layers_packed_weight_is_kept_by_its_owner_until_the_parameter_changes():
    """The MSD trainer packs the frozen LM head once for every step (a PackedWeights), but a write to
    the parameter must be seen: a stale packed copy would decode with the old weights."""
    torch.manual_seed(0)
    model = load_model(SPEC).eval()
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    keep = PackedWeights()
    with torch.no_grad():
        with decoding_linears(model, keep=keep):
            first = model(ids).logits
            packed = model.get_output_embeddings().packed_weight
        with decoding_linears(model, keep=keep):
            model(ids)
            assert model.get_output_embeddings().packed_weight is packed       # kept, not repacked
        with decoding_linears(model):
            model(ids)
            assert model.get_output_embeddings().packed_weight is not packed   # no owner: packed anew
        for write in (lambda w: w.mul_(2.0), lambda w: setattr(w, "data", w.data * 2.0)):   # in place; new storage
            write(head.weight)
            with decoding_linears(model, keep=keep):
                second = model(ids).logits
                assert model.get_output_embeddings().packed_weight is not packed
                packed = model.get_output_embeddings().packed_weight
            want = model(ids).logits                                           # plain modules, new weights
            torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(second, first)
            first = second


def test_evaluation_sees_an_adapter_merged_through_data():
    """PEFT merges with ``weight.data += delta``, which leaves the version counter alone: evaluation keeps
    no packed copies between generations, so a base model evaluated before an adapter (a sweep) cannot
    run the adapter's evaluation on the base's packed weights."""
    from peft import LoraConfig, get_peft_model

    from polyalign.eval.runner import merged_for_generation

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(40, 300)          # wide enough for oneDNN (>= 256 outputs)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])).eval()
    x = torch.randn(3, 40)
    with torch.no_grad():
        with net.disable_adapter(), decoding_linears(net):
            base = net(x)                                  # the base weight, packed
        for n, prm in net.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.5)
        want = net(x)                                      # PEFT's own wrapper
        with merged_for_generation(net), decoding_linears(net):
            assert net.base_model.model.proj.packed_weight is None
            got = net(x)
            assert net.base_model.model.proj.packed_weight is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-2)


def test_packing_is_off_when_switched_off(monkeypatch):
    monkeypatch.setenv("POLYALIGN_ONEDNN_PACK", "0")
    layer = _linear(torch.randn(300, 40), None, onednn=True)
    with torch.no_grad():
        out = layer(torch.randn(4, 40))
    assert layer.packed_weight is None and out.shape == (4, 300)


def onednn_packs_bf16() -> bool:
    """Whether oneDNN packs a bf16 weight on this CPU: it needs avx_ne_convert or AVX-512 BW / VL / DQ
    (an AVX2-only CPU raises; polyalign itself sends bf16 to oneDNN only where the CPU has native bf16)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 4)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not onednn_packs_bf16(), reason="oneDNN cannot pack bf16 weights on this CPU (no AVX-512 BW/VL/DQ)"))])
def test_lora_beside_computes_what_pefts_forward_does_with_the_base_packed_and_kept(monkeypatch, dtype):
    """POLYALIGN_LORA_BESIDE=1: the student's wrapped layers are base (packed once, kept by the owner)
    plus B(A(x)) * scaling in the adapter's dtype, as PEFT's forward: the decode step's logits equal
    PEFT's own within the products' rounding, the base's packed copies are reused by the next context,
    and nothing is folded."""
    from polyalign.models import loading, sampling

    monkeypatch.setenv("POLYALIGN_LORA_BESIDE", "1")
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda cpuinfo=None: True)   # bf16 on oneDNN here too
    monkeypatch.setattr(sampling, "ONEDNN_MIN_OUT_FEATURES", 1)                  # the tiny model's narrow layers too
    torch.manual_seed(0)
    model = attach_lora(load_model(SPEC, dtype=str(dtype).removeprefix("torch.")), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    x = torch.randint(3, 200, (4, 1))                     # one decode step's rows
    keep = PackedWeights()
    with torch.no_grad():
        want = model(input_ids=x).logits.float()
        with decoding_linears(model, keep=keep):
            beside = [m for m in model.modules() if type(m).__name__ == "LoraBesideLinear"]
            got = model(input_ids=x).logits.float()
        kept = len(keep._by_id)
        with decoding_linears(model, keep=keep):
            again = model(input_ids=x).logits.float()
    assert beside and all(m.base.onednn and m.adapters and m.adapters[0][0].dtype == torch.float32 for m in beside)
    assert kept >= len(beside) and len(keep._by_id) == kept          # packed once, reused
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol
    assert torch.equal(got, again)
    monkeypatch.setenv("POLYALIGN_LORA_BESIDE", "0")
    assert not sampling.lora_beside_enabled()


def test_past_onednn_rows_a_strided_head_input_reaches_f_linear_with_plain_strides(monkeypatch):
    """A stand-in LM head lacks ``contiguous_head_input``'s hook: a prefill's last-position slice
    ``hidden[:, -1:, :]`` past ONEDNN_MAX_ROWS rows must still reach F.linear with row-major strides
    (else torch copies the weight once per row: 144 rows of the 0.5B head asked for 39 GB)."""
    torch.manual_seed(0)
    w = torch.randn(300, 40)
    hidden = torch.randn(ONEDNN_MAX_ROWS + 16, 5, 40)
    x = hidden[:, -1:, :]
    seen = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda i, *a: seen.append(i.stride()) or real(i, *a))
    with torch.no_grad():
        out = _linear(w, None, onednn=True)(x)
    assert seen == [(40, 40, 1)]
    torch.testing.assert_close(out, real(x.contiguous(), w))


@pytest.mark.parametrize("alpha", [32, 8, 64, 24])
def test_lora_delta_is_pefts_delta_bit_for_bit(alpha):
    """``lora_delta`` moves a power-of-two scaling onto B (exact) and leaves any other to PEFT."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from polyalign.models.sampling import lora_delta

    torch.manual_seed(alpha)
    model = attach_lora(load_model(SPEC, dtype="float32", device="cpu"), LoraSettings(r=16, alpha=alpha))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers
    for m in layers:
        with torch.no_grad():
            m.lora_B["default"].weight.normal_(0, 0.02)          # trained-like, not the zero init
            m.lora_A["default"].weight.mul_(3.0)
        assert torch.equal(lora_delta(m, "default"), m.get_delta_weight("default").detach())
