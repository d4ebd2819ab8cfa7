"""CoAtNet's building blocks, named as the paper names them.

Layouts: convolution blocks (stem, MBConv) take and return NCHW; Transformer blocks take and return
NHWC so LayerNorm and Linear act on the last dimension without permutes inside the block. The model
converts between the two once where the block kind changes.

Every residual block is pre-norm, `x = shortcut(x) + DropPath(f(Norm(x)))`, with a pooled and
projected shortcut in the first (downsampling) block of a stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation, StochasticDepth

from .attention import flex_relative_attention, relative_attention

_LOW = (torch.bfloat16, torch.float16)
_STATS = ("running_mean", "running_var")


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose running statistics stay fp32 and whose statistics are computed in fp32.

    Why: in bf16 (8 mantissa bits) a momentum-0.1 update of a running statistic rounds away once the batch
    value is within ~2% of it, so bf16 buffers stall. `_apply` (`.to(bf16)`, `.half()`, DeepSpeed's module
    cast) therefore leaves the running buffers fp32, and forward upcasts any that arrive in 16 bits. Forward
    uses PyTorch's mixed-dtype kernel (16-bit input, fp32 weight/bias/statistics, fp32 accumulation, output in
    the input's dtype; the path autocast takes), so no fp32 copy of the activation is kept for backward.
    State-dict keys, parameters and the _BatchNorm base class are nn.BatchNorm2d's.
    """

    def _apply(self, fn, recurse=True):
        kept = {k: self._buffers[k] for k in _STATS if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for key, old in kept.items():
            new = self._buffers[key]
            if new.dtype in _LOW:
                self._buffers[key] = old.detach().to(device=new.device, dtype=torch.float32)
        return self

    def _fp32_stats(self) -> None:
        for key in _STATS:
            buf = self._buffers.get(key)
            if buf is not None and buf.dtype in _LOW:  # e.g. cast by DeepSpeed's data_types.buffer_dtype
                buf.data = buf.data.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        self._fp32_stats()
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        weight, bias, inp = self.weight, self.bias, x
        if x.dtype in _LOW:  # fp32 weight/bias with the 16-bit input selects the mixed-dtype kernel
            weight = None if weight is None else weight.float()
            bias = None if bias is None else bias.float()
            if x.device.type not in ("cpu", "cuda", "meta"):  # no mixed-dtype kernel known there: compute in fp32
                inp = x.float()
        y = F.batch_norm(inp, self.running_mean if track else None, self.running_var if track else None,
                         weight, bias, use_batch, factor, self.eps)
        return y.to(x.dtype)


class Stem(nn.Module):
    """S0: conv 3x3 stride 2, then conv 3x3 (the paper's two-layer conv stem)."""

    layout = "nchw"

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim, 3, stride=2, padding=1, bias=False)
        self.norm1 = BatchNorm2d(dim)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.norm1(self.conv1(x))))


class Downsample(nn.Module):
    """The shortcut of a stage's first block: Proj(Pool(x)).

    Pool is a 2x2 max-pool with stride 2 (the paper says max-pool stride 2 and leaves the window
    open; 2x2 is exact for every input size divisible by 32). Proj is a 1x1 conv (NCHW) or a
    linear layer (NHWC), present only where the channel count changes.
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int, layout: str):
        super().__init__()
        self.stride = stride
        self.layout = layout
        if in_dim == out_dim:
            self.proj = nn.Identity()
        elif layout == "nchw":
            self.proj = nn.Conv2d(in_dim, out_dim, 1)
        else:
            self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = max_pool_2x2(x, self.layout)
        return self.proj(x)


def max_pool_2x2(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return F.max_pool2d(x, 2)
    return F.max_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)


class MBConv(nn.Module):
    """Inverted bottleneck with squeeze-excitation, pre-norm with BatchNorm.

    x = Proj(Pool(x)) + Conv1x1(SE(DepthConv3x3(Conv1x1(BN(x)))))
    The expansion (rate 4) is of the block's output width. On a downsampling block the stride sits
    on the first 1x1 conv (paper default) or on the depthwise conv (`stride_on="depthwise"`, the
    dagger variant of Tables 5 and 9).
    """

    layout = "nchw"

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1, expand_ratio: int = 4,
                 se_ratio: float = 0.25, stride_on: str = "pointwise", drop_path: float = 0.0):
        super().__init__()
        mid = out_dim * expand_ratio
        pw_stride, dw_stride = (stride, 1) if stride_on == "pointwise" else (1, stride)
        self.shortcut = Downsample(in_dim, out_dim, stride, "nchw") if (stride > 1 or in_dim != out_dim) else nn.Identity()
        self.norm = BatchNorm2d(in_dim)
        self.conv_expand = nn.Conv2d(in_dim, mid, 1, stride=pw_stride, bias=False)
        self.norm_expand = BatchNorm2d(mid)
        self.conv_depthwise = nn.Conv2d(mid, mid, 3, stride=dw_stride, padding=1, groups=mid, bias=False)
        self.norm_depthwise = BatchNorm2d(mid)
        self.act = nn.GELU()
        # The SE bottleneck is sized from the block input, as in EfficientNet's MBConv.
        self.se = SqueezeExcitation(mid, max(1, int(in_dim * se_ratio)), activation=nn.GELU)
        self.conv_project = nn.Conv2d(mid, out_dim, 1)
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        y = self.act(self.norm_expand(self.conv_expand(y)))
        y = self.act(self.norm_depthwise(self.conv_depthwise(y)))
        y = self.conv_project(self.se(y))
        return self.shortcut(x) + self.drop_path(y)


def relative_position_index(height: int, width: int) -> torch.Tensor:
    """(N, N) index into a flattened (2H-1) x (2W-1) table: query (i, j), key (i', j') ->
    (i - i' + H - 1) * (2W - 1) + (j - j' + W - 1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + height - 1) * (2 * width - 1) + (rel[1] + width - 1)


class RelativePositionBias(nn.Module):
    """One learned scalar per relative offset per head, added to the logits before softmax.

    The table `bias_table` has shape (heads, 2H-1, 2W-1) for an H x W feature map: input-independent,
    not shared across layers, no bucketing. `model.resize_rel_pos_tables` resizes it for another
    resolution. Calling the module gathers the dense (heads, N, N) bias with `index_select` (its backward
    is an index_add, several times cheaper on CPU than advanced indexing's). Without autograd (evaluation)
    the gathered bias is cached per dtype until the table changes (its version or storage) or the module
    switches between train and eval. `flex` runs flex attention inside this module's call, so ZeRO-3's
    hooks gather the table for it (read from outside, it is the rank's empty partition).
    """

    def __init__(self, num_heads: int, feat_size: tuple[int, int]):
        super().__init__()
        height, width = feat_size
        self.feat_size = (height, width)
        self.bias_table = nn.Parameter(torch.zeros(num_heads, 2 * height - 1, 2 * width - 1))
        self.register_buffer("index", relative_position_index(height, width), persistent=False)
        self._cache: dict = {}
        self._padded: dict = {}  # pad_to -> the padded index, made once instead of every forward

    def train(self, mode: bool = True):
        self._cache = {}  # weights may have changed in ways the version counter misses (e.g. DeepSpeed all-gathers)
        return super().train(mode)

    def forward(self, dtype: torch.dtype | None = None, pad_to: int = 1, flex_qkv=None) -> torch.Tensor:
        """The (heads, N, N) bias in `dtype` (default: the table's); with `pad_to`, a (heads, N, N') tensor
        whose rows are padded to a multiple of `pad_to` (slice [..., :N] for an aligned view). With
        `flex_qkv` = (q, k, v): their flex attention with this bias instead."""
        table = self.bias_table
        if flex_qkv is not None:
            return flex_relative_attention(*flex_qkv, table, self.feat_size)
        dtype = dtype or table.dtype
        # The cache's key reads data_ptr/_version, a graph break under torch.compile: compiled code gathers
        # afresh (inductor fuses it) instead.
        if (torch.is_grad_enabled() and table.requires_grad) or torch.compiler.is_compiling():
            return _GatherBias.apply(table, self._index(pad_to), dtype)
        key = (dtype, pad_to, table.device, table.data_ptr(), table._version)
        if self._cache.get(dtype, (None,))[0] != key:
            self._cache[dtype] = (key, _GatherBias.apply(table, self._index(pad_to), dtype))
        return self._cache[dtype][1]

    def _index(self, pad_to: int) -> torch.Tensor:
        extra = -self.index.shape[1] % pad_to
        if not extra:
            return self.index
        if torch.compiler.is_compiling():  # traced into the graph; no Python-side cache there
            return F.pad(self.index, (0, extra))
        padded = self._padded.get(pad_to)
        if padded is None or padded.device != self.index.device:  # padding columns read entry 0, sliced off later
            padded = self._padded[pad_to] = F.pad(self.index, (0, extra))
        return padded


class _GatherBias(torch.autograd.Function):
    """bias[h, q, k] = table[h].flatten()[index[q, k]], gathered straight into `dtype`.

    Gathering from a 16-bit copy of the (small) table writes the (heads, N, N) bias once, in 16 bits, instead
    of an fp32 gather plus a cast; backward sums each offset's gradient in fp32 (index_add), so up to N
    terms per entry do not round in bf16.
    """

    @staticmethod
    def forward(ctx, table, index, dtype):
        ctx.save_for_backward(index)
        ctx.table_shape, ctx.table_dtype = table.shape, table.dtype
        heads, n = table.shape[0], index.shape[0]
        return table.to(dtype).reshape(heads, -1).index_select(1, index.reshape(-1)).reshape(heads, n, -1)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        heads = ctx.table_shape[0]
        flat = torch.zeros(heads, ctx.table_shape[1] * ctx.table_shape[2], dtype=torch.float32, device=grad.device)
        flat.index_add_(1, index.reshape(-1), grad.reshape(heads, -1).float())
        return flat.reshape(ctx.table_shape).to(ctx.table_dtype), None, None


class RelativeAttention(nn.Module):
    """Global multi-head self-attention over the whole feature map with a relative-position bias.

    The kernel is chosen in model/attention.py (`attention_impl`: fused SDPA by default, flex attention
    or the written-out math). The output width may differ from the input width (a stage's first block
    maps in_dim -> out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, head_dim: int, feat_size: tuple[int, int]):
        super().__init__()
        self.num_heads = out_dim // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(in_dim, 3 * out_dim)
        self.proj = nn.Linear(out_dim, out_dim)
        self.rel_pos = RelativePositionBias(self.num_heads, feat_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = relative_attention(q, k, v, self.rel_pos)  # (B, heads, N, head_dim)
        return self.proj(y.transpose(1, 2).reshape(batch, height, width, -1))


class TransformerBlock(nn.Module):
    """TFM_Rel: pre-norm relative attention then a 4x GELU FFN, LayerNorm, NHWC.

    Downsampling block: x = Proj(Pool(x)) + Attention(Pool(Norm(x))).
    """

    layout = "nhwc"

    def __init__(self, in_dim: int, out_dim: int, stride: int, head_dim: int, mlp_ratio: int,
                 feat_size: tuple[int, int], drop_path: float = 0.0):
        super().__init__()
        self.stride = stride
        self.shortcut = Downsample(in_dim, out_dim, stride, "nhwc") if (stride > 1 or in_dim != out_dim) else nn.Identity()
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = RelativeAttention(in_dim, out_dim, head_dim, feat_size)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(nn.Linear(out_dim, out_dim * mlp_ratio), nn.GELU(), nn.Linear(out_dim * mlp_ratio, out_dim))
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.stride > 1:
            y = max_pool_2x2(y, "nhwc")
        x = self.shortcut(x) + self.drop_path(self.attn(y))
        return x + self.drop_path(self.mlp(self.norm2(x)))
