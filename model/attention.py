"""Relative attention kernels: y = softmax(Q K^T / sqrt(d) + B) V, B read from a (heads, 2H-1, 2W-1) table.

The kernel is a module-level switch so that a GPU run can pick by measurement without touching the
model: `model.attention.set_attention_impl(name)` (or assign `attention_impl`) with

- "sdpa": `F.scaled_dot_product_attention` with the gathered bias as `attn_mask`. On CUDA the bias is laid
  out with its last dimension padded to a multiple of 16, so the memory-efficient kernel (which returns the
  bias gradient) takes it without a copy. On CPU PyTorch's fused kernel has no bias gradient and SDPA
  falls back to its slow math path when the bias needs one, so there the fused CPU flash kernel runs the
  forward and `_CPUFlashWithBias` a batch-sliced backward: no (B, heads, N, N) tensor is kept for backward.
- "math": the reference, softmax(Q K^T * scale + B) V written out (materialises the scores).
- "flex": `flex_attention` with a `score_mod` that reads the table by offset: no (heads, N, N) bias at all.
  Compiled on CUDA (eager flex is a slow reference there); PyTorch has no flex backward on CPU, so on
  CPU it serves inference only.
- "auto" (default): "math" for 16-bit CPU training, "sdpa" otherwise. Measured on 2 CPU cores under
  ATEN_CPU_CAPABILITY=avx2, forward + backward at batch 4, 24 heads, N = 196/576/1024
  (`benchmarks/model_speed.py --attention-shapes`), time in ms / MiB kept for backward:
      bf16: PyTorch SDPA + bias grad (old) 30/378/1307 ms, 21/144/428 MiB; "sdpa" 21/248/1335 ms,
            6.7/31/80 MiB; "math" 16/217/691 ms, 11/73/218 MiB.
      fp32: old 36/353/1082 ms, 21/144/428 MiB; "sdpa" 21/231/917 ms, 13/60/152 MiB; "math"
            24/277/1171 ms, 21/144/428 MiB.
  GPU figures are pending (benchmarks/gpu_check.py); "sdpa" (memory-efficient kernel) is the GPU default
  until then, "flex" the candidate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_IMPLS = ("auto", "sdpa", "math", "flex")
attention_impl = "auto"


def set_attention_impl(name: str) -> None:
    """Select the attention kernel for every RelativeAttention (see the module docstring)."""
    global attention_impl
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {name!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
    attention_impl = name


def resolved_impl(q: torch.Tensor) -> str:
    """"auto": the written-out math for 16-bit CPU training (fastest there, see above), else SDPA."""
    if attention_impl != "auto":
        return attention_impl
    cpu_16bit_training = q.device.type == "cpu" and torch.is_grad_enabled() and q.dtype in (torch.bfloat16, torch.float16)
    return "math" if cpu_16bit_training else "sdpa"


def relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos) -> torch.Tensor:
    """Attention of (B, heads, N, head_dim) q, k, v with the bias of `rel_pos` (a RelativePositionBias)."""
    impl = resolved_impl(q)
    if impl == "flex":
        return rel_pos(flex_qkv=(q, k, v))  # through the module: ZeRO-3 gathers its table for the call
    if impl == "math":
        return math_attention(q, k, v, rel_pos(q.dtype))
    n = q.shape[-2]
    if q.device.type == "cpu":
        bias = rel_pos(q.dtype)  # (heads, N, N), cached in evaluation
        if bias.requires_grad:  # PyTorch's fused CPU kernel gives no bias gradient: use ours
            return _CPUFlashWithBias.apply(q, k, v, bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
    bias = rel_pos(q.dtype, pad_to=16)  # (heads, N, N') with 16-aligned rows, sliced to N below
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0)[..., :n])


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The definition, softmax(Q K^T * scale + B) V. The scale goes on q (N x d, not N x N, elements); the
    softmax kernel accumulates 16-bit inputs in fp32, so no fp32 copy of the scores is made."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)) + bias
    return torch.matmul(scores.softmax(-1), v)


class _CPUFlashWithBias(torch.autograd.Function):
    """CPU attention whose bias gets a gradient, without keeping the attention matrix for backward.

    Forward is PyTorch's fused CPU flash kernel (saves only the output and the row log-sum-exp). Backward
    recomputes the probabilities one sample at a time, P = exp(S - lse), and returns dQ, dK, dV and
    dB = sum over the batch of P * (dP - rowsum(dO * O)): the softmax gradient, in fp32.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias):
        scale = q.shape[-1] ** -0.5
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=bias.unsqueeze(0), scale=scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, out, lse = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(dP * P)
        for b in range(q.shape[0]):  # one sample at a time: the (heads, N, N) temporaries stay small
            probs = torch.matmul(q[b], k[b].transpose(-2, -1)).float().mul_(scale).add_(bias)
            probs = probs.sub_(lse[b].unsqueeze(-1)).exp_()
            dv[b] = torch.matmul(probs.to(v.dtype).transpose(-2, -1), grad_out[b])
            dscores = torch.matmul(grad_out[b], v[b].transpose(-2, -1)).float().sub_(delta[b]).mul_(probs)
            dbias += dscores
            dscores = dscores.mul_(scale).to(q.dtype)
            dq[b] = torch.matmul(dscores, k[b])
            dk[b] = torch.matmul(dscores.transpose(-2, -1), q[b])
        return dq, dk, dv, dbias.to(bias.dtype) if ctx.needs_input_grad[3] else None


_compiled_flex = None


def flex_relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                            feat_size: tuple[int, int]) -> torch.Tensor:
    """flex_attention whose score_mod adds table[h, qi - ki + H - 1, qj - kj + W - 1]: the bias is never
    materialised and the table's gradient comes from the kernel."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    height, width = feat_size
    flat = table.reshape(table.shape[0], -1)
    row = 2 * width - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        offset = (q_idx // width - kv_idx // width + height - 1) * row + (q_idx % width - kv_idx % width + width - 1)
        return score + flat[h, offset]

    kernel = flex_attention
    # Inside an outer torch.compile (train.compile) flex is traced into that graph: no compile of its own, and
    # no mark_dynamic, which dynamo refuses to trace.
    if (q.device.type == "cuda" or compile_flex_on_cpu) and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        kernel = _compiled_flex
        mark_batch_dynamic(q, k, v)
    return kernel(q, k, v, score_mod=score_mod)


# Tests compile flex on CPU too (inference only there) to count its recompiles.
compile_flex_on_cpu = False


def mark_batch_dynamic(*tensors: torch.Tensor) -> None:
    """Compile flex once for every batch size of a stage and grad mode, not once per size.

    Why: with dynamic=False each new batch size (the partial last evaluation batch, a rank's filler batch) was
    a recompile, and past torch._dynamo's recompile limit flex fell back to eager, which materialises the
    scores. Only the batch dimension is marked (sequence length and head_dim stay static: the kernel's tiles
    are chosen for them). Size 1 is left static: dynamo specialises 0/1 sizes, so it is one more graph at most.
    """
    if tensors[0].shape[0] > 1:
        for tensor in tensors:
            torch._dynamo.mark_dynamic(tensor, 0)
