"""Relative attention kernels against the definition softmax(Q K^T / sqrt(d) + B) V, and precision choice."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.units import resolve_precision
from model import attention
from model.blocks import RelativePositionBias

ROOT = Path(__file__).resolve().parents[1]
FEAT = (5, 6)  # N = 30: not a multiple of 8 or 16, and H != W catches transposed offsets


@pytest.fixture
def impl():
    """Restore the module-level switch after a test changes it."""
    saved = attention.attention_impl
    yield attention.set_attention_impl
    attention.attention_impl = saved


def _problem(dtype, batch=3, heads=4, head_dim=8):
    torch.manual_seed(0)
    n = FEAT[0] * FEAT[1]
    rel_pos = RelativePositionBias(heads, FEAT)
    with torch.no_grad():
        rel_pos.bias_table.copy_(torch.randn_like(rel_pos.bias_table))
    qkv = [torch.randn(batch, heads, n, head_dim).to(dtype).requires_grad_() for _ in range(3)]
    return rel_pos, qkv


def _reference(rel_pos, q, k, v):
    """fp64 definition, with the bias read entry by entry from the table."""
    height, width = FEAT
    table = rel_pos.bias_table.double()
    coords = [(i, j) for i in range(height) for j in range(width)]
    bias = torch.stack([torch.stack([table[:, i - a + height - 1, j - b + width - 1] for a, b in coords], -1)
                        for i, j in coords], -2)  # (heads, N, N)
    scores = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5 + bias
    return scores.softmax(-1) @ v.double()


def _grads(fn, rel_pos, qkv, grad_out):
    rel_pos.bias_table.grad = None
    for t in qkv:
        t.grad = None
    out = fn(rel_pos, *qkv)
    out.backward(grad_out.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in (*qkv, rel_pos.bias_table)]


@pytest.mark.parametrize("name", ["sdpa", "math", "auto"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_output_and_gradients_match_the_definition(impl, name, dtype, tol):
    impl(name)
    rel_pos, qkv = _problem(dtype)
    grad_out = torch.randn(qkv[0].shape, dtype=torch.float64)
    got = _grads(lambda r, q, k, v: attention.relative_attention(q, k, v, r), rel_pos, qkv, grad_out)
    want = _grads(_reference, rel_pos, qkv, grad_out)
    for label, a, b in zip(["out", "dq", "dk", "dv", "dtable"], got, want):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= tol * max(scale, 1.0), f"{name} {dtype} {label}"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_matches_the_definition_on_cpu(impl):
    impl("flex")
    rel_pos, qkv = _problem(torch.float32)
    with torch.no_grad():
        got = attention.relative_attention(*(t.detach() for t in qkv), rel_pos)
        want = _reference(rel_pos, *qkv)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_unknown_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="attention_impl"):
        attention.set_attention_impl("fast")


def test_padded_bias_is_the_bias_with_aligned_rows():
    rel_pos, _ = _problem(torch.float32)
    n = FEAT[0] * FEAT[1]
    padded = rel_pos(pad_to=16)
    assert padded.shape[-1] == 32 and torch.equal(padded[..., :n], rel_pos())


def test_evaluation_bias_is_cached_until_the_table_changes():
    rel_pos, _ = _problem(torch.float32)
    with torch.no_grad():
        first = rel_pos(torch.bfloat16)
        assert rel_pos(torch.bfloat16) is first and first.dtype == torch.bfloat16
        rel_pos.bias_table.add_(1.0)  # an optimizer step: the version counter moves
        second = rel_pos(torch.bfloat16)
        assert second is not first and torch.equal(second, (rel_pos().to(torch.bfloat16)))
        rel_pos.train()
        assert rel_pos(torch.bfloat16) is not second  # a train/eval switch drops the cache
    built = rel_pos()  # with autograd: a fresh, differentiable gather every call
    assert built.requires_grad and built is not rel_pos()


def test_resolve_precision_passes_names_through_and_rejects_unknown():
    assert [resolve_precision(p, "cpu") for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")
    assert resolve_precision("auto", "mps") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")


def test_auto_precision_is_fp32_when_torch_runs_avx2_kernels():
    code = "from core.units import resolve_precision; print(resolve_precision('auto', 'cpu'))"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32"


@pytest.mark.slow
def test_compiled_flex_compiles_once_per_stage_whatever_the_batch_size(impl, monkeypatch):
    """Batch sizes 4, 3, 2, 5 share one graph (the batch dimension is dynamic) and 1 adds at most one: the
    partial last evaluation batch no longer counts towards the recompile limit, past which flex went eager.
    Compiled flex runs on CPU for inference, which is what this counts (~1.5 min of compilation here)."""
    from torch._dynamo.utils import counters

    impl("flex")
    monkeypatch.setattr(attention, "compile_flex_on_cpu", True)
    monkeypatch.setattr(attention, "_compiled_flex", None)
    torch._dynamo.reset()
    counters.clear()
    try:
        for batch in (4, 3, 2, 5, 1, 3):
            rel_pos, qkv = _problem(torch.float32, batch=batch)
            with torch.no_grad():
                got = attention.relative_attention(*(t.detach() for t in qkv), rel_pos)
                want = _reference(rel_pos, *qkv)
            assert torch.allclose(got.double(), want, atol=1e-5), batch
        assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
        assert not counters["recompiles"].get("recompile_limit_hit"), dict(counters["recompiles"])
    finally:
        torch._dynamo.reset()


def test_flex_inside_a_compiled_model_traces_into_its_graph(impl, monkeypatch):
    """train.compile compiles the whole model: flex must not compile itself again nor mark_dynamic there (dynamo
    refuses to trace mark_dynamic, which ended such a run at its first step)."""
    impl("flex")
    monkeypatch.setattr(attention, "compile_flex_on_cpu", True)
    monkeypatch.setattr(attention, "_compiled_flex", None)
    torch._dynamo.reset()
    try:
        rel_pos, qkv = _problem(torch.float32, batch=2)
        with torch.no_grad():
            got = torch.compile(lambda q, k, v: attention.relative_attention(q, k, v, rel_pos), backend="eager")(
                *(t.detach() for t in qkv))
            want = _reference(rel_pos, *qkv)
        assert torch.allclose(got.double(), want, atol=1e-5)
    finally:
        torch._dynamo.reset()
