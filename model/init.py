"""Build a CoAtNet where it will live, in the dtype it will train in, with weights that depend only on a seed.

    model = build_initialised("coatnet-7", seed=0, device=torch.device("cuda", 0), dtype=torch.bfloat16,
                              num_classes=1000, image_size=512)

Why not `create_model` (fp32 on the CPU, then moved): at CoAtNet-7's 2.44B parameters that is 9.8 GB of fp32
per rank before DeepSpeed even casts it, 78 GB on a node of 8 ranks. Here the model is created on the meta
device (no memory), given empty storage on the target device in the training dtype (`to_empty`), and every
tensor is then initialised from its own generator, seeded from (seed, the tensor's name): a 16-bit model costs
half the fp32 size and nothing is copied.

Why a generator per name rather than one stream (or rank 0 initialising and broadcasting): the values do not
depend on the order tensors are visited, on the world size, on the rank, or on anything else that drew from
the global RNG before; no communication and no second copy is needed at any size. The random draws are made in
fp32 on the CPU, one tensor at a time (at most the largest layer, 151 MB for CoAtNet-7), and copied into the
parameter, so the values are also the same on CPU and GPU (a CUDA generator draws other numbers than the CPU's
for the same seed), and a 16-bit parameter holds exactly the rounding of the fp32 draw that DeepSpeed's cast of
an fp32 model would have produced. The distributions are model.coatnet._init_weights's.

`only` initialises just the named tensors (plus every derived non-persistent buffer): a fine-tune whose
pretrained weights overwrite everything else draws only its new head.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Optional

import torch
from torch import nn

from .blocks import RelativePositionBias, relative_position_index
from .coatnet import CoAtNet, create_model


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (run seed, tensor name): stable across processes and Python versions
    (Python's hash() of a str is salted per process)."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _draw(param: torch.Tensor, seed: int, name: str, kind: str, std: float) -> None:
    """Fill `param` (any device and dtype) with an fp32 CPU draw from its own generator."""
    generator = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))
    draw = torch.empty(param.shape, dtype=torch.float32)
    if kind == "trunc_normal":
        nn.init.trunc_normal_(draw, std=std, generator=generator)
    else:
        nn.init.normal_(draw, 0.0, std, generator=generator)
    with torch.no_grad():
        param.copy_(draw)


def init_weights(model: CoAtNet, seed: int, only: Optional[Iterable[str]] = None) -> CoAtNet:
    """Initialise `model` in place (any device and dtype, e.g. straight after `to_empty`), tensor by tensor.

    Linear weights and relative-position tables: truncated normal, std 0.02; convolutions: He normal over
    fan-out; biases zero; norms weight 1, bias 0, BatchNorm statistics (0, 1, 0). `only`: names (parameter or
    buffer, as in named_parameters/named_buffers) to initialise; the others keep their values, except
    non-persistent buffers (the attention's index), which are always recomputed. Every tensor of the model
    must be covered by a rule here: a new module type raises instead of silently keeping empty memory.
    """
    wanted = None if only is None else set(only)
    done: set[str] = set()

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    for prefix, module in model.named_modules():
        full = (lambda leaf, p=prefix: f"{p}.{leaf}" if p else leaf)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if isinstance(module, nn.Linear):
                kind, std = "trunc_normal", 0.02
            else:
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                kind, std = "normal", math.sqrt(2.0 / fan_out)
            if want(full("weight")):
                _draw(module.weight, seed, full("weight"), kind, std)
            if module.bias is not None and want(full("bias")):
                with torch.no_grad():
                    module.bias.zero_()
            done.update(full(n) for n, _ in module.named_parameters(recurse=False))
        elif isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._NormBase)):
            own = [full(n) for n, _ in module.named_parameters(recurse=False)]
            own += [full(n) for n, _ in module.named_buffers(recurse=False)]
            if any(want(n) for n in own):
                module.reset_parameters()  # weight 1, bias 0 (and BatchNorm's statistics 0, 1, 0): no randomness
            done.update(own)
        elif isinstance(module, RelativePositionBias):
            if want(full("bias_table")):
                _draw(module.bias_table, seed, full("bias_table"), "trunc_normal", 0.02)
            height, width = module.feat_size
            module.index = relative_position_index(height, width).to(module.index.device)
            module._cache = {}
            done.update((full("bias_table"), full("index")))
    left = [n for n, _ in (*model.named_parameters(), *model.named_buffers()) if n not in done]
    if left:
        raise TypeError(f"init_weights has no rule for {left[0]} ({len(left)} tensor(s) uncovered); add one")
    return model


def build_initialised(name: str, seed: int, device: torch.device, dtype: torch.dtype = torch.float32,
                      only: Optional[Iterable[str]] = None, **kwargs) -> CoAtNet:
    """`create_model(name, **kwargs)` built on the meta device, materialised on `device` in `dtype` (BatchNorm
    statistics stay fp32, see model.blocks.BatchNorm2d) and initialised by `init_weights(model, seed, only)`."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    model = model.to(dtype=dtype)  # on meta: free; the storage comes next, already in the training dtype
    model.to_empty(device=device)
    return init_weights(model, seed, only)
