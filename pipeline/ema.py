"""Exponential moving average of the fp32 master weights, kept inside a DeepSpeed run.

Why not timm's ModelEma: under DeepSpeed the module holds bf16/fp16 copies (an EMA of those loses the small
updates that decay 0.9999 averages) and, with ZeRO, the fp32 master weights are sharded over ranks. So
each rank averages only ITS fp32 fragment of every parameter (DeepSpeed's `_hp_mapping`, ZeRO 1/2 and the
bf16 optimizer): no communication per step; the full EMA is assembled with one reduction per parameter
when it is saved or evaluated. ZeRO-3 (and plain fp32 without DeepSpeed's master copy) fall back to a full
copy on every rank, updated from `safe_get_full_fp32_param` (a gather per step: costly for big models).

Floating-point buffers (BatchNorm running statistics) are averaged too, as timm's ModelEmaV2 does with the
whole state dict; ranks' buffer averages are themselves averaged when the full EMA is assembled.

Optional decay warm-up (`train.ema_warmup`) follows TensorFlow's ExponentialMovingAverage(num_updates):
decay_t = min(decay, (1+t)/(10+t)), so short runs (the demo's fine-tuning) do not average in the random
initial head for long. Off by default: with it a 30-epoch fine-tune never reaches the paper's 0.9999.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False):
        self.module = module
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = dict(module.named_parameters())
        # Persistent buffers only (BatchNorm statistics), as in the model's state dict.
        self.buffer_names = [k for k in module.state_dict().keys() if k not in self.params]
        self.buffers = {n: b for n, b in module.named_buffers() if n in set(self.buffer_names)}
        self.buffer_shadow = {n: b.detach().float().clone() for n, b in self.buffers.items() if b.is_floating_point()}
        self.shadow: dict[str, torch.Tensor] = {}
        for name in self.names:
            p = self.params[name]
            self.shadow[name] = self._current(p).detach().clone().float()

    def _current(self, p: torch.nn.Parameter) -> torch.Tensor:
        if hasattr(p, "_hp_mapping") and not hasattr(p, "ds_id"):
            if p._hp_mapping is None:  # this rank holds no fragment of p
                return torch.zeros(0, dtype=torch.float32, device=p.device)
            return p._hp_mapping.get_hp_fragment().detach().flatten()
        full = safe_get_full_fp32_param(p)
        return (full if full is not None else p).detach().float()

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Call on every rank after each optimizer step."""
        d = self.current_decay()
        for name in self.names:
            cur = self._current(self.params[name])
            s = self.shadow[name]
            if s.numel():
                s.mul_(d).add_(cur.to(s.device, torch.float32), alpha=1.0 - d)
        for name, s in self.buffer_shadow.items():
            s.mul_(d).add_(self.buffers[name].detach().to(s.device, torch.float32), alpha=1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights (+ the module's current buffers) on every rank. Collective: call on all ranks."""
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            p = self.params[name]
            if hasattr(p, "_hp_mapping") and not hasattr(p, "ds_id"):
                buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                if p._hp_mapping is not None:
                    addr = p._hp_mapping.lp_fragment_address
                    buf.narrow(0, addr.start, addr.numel).copy_(self.shadow[name])
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(buf, group=getattr(p, "_dp_group", None))
                out[name] = buf.reshape(p.shape).cpu()
            else:
                out[name] = self.shadow[name].cpu().clone()
        world = dist.get_world_size() if dist.is_initialized() else 1
        for name in self.buffer_names:
            if name in self.buffer_shadow:
                avg = self.buffer_shadow[name].clone()
                if world > 1:
                    dist.all_reduce(avg)
                    avg /= world
                out[name] = avg.cpu()
            else:  # integer buffers (num_batches_tracked): the module's own
                out[name] = self.buffers[name].detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, full: dict[str, torch.Tensor], updates: int) -> None:
        """Restore from a full fp32 state dict (as saved), taking this rank's fragments."""
        self.updates = updates
        for name, s in self.buffer_shadow.items():
            if name in full:
                self.buffer_shadow[name] = full[name].float().to(s.device).clone()
        for name in self.names:
            p = self.params[name]
            value = full[name].float()
            if hasattr(p, "_hp_mapping") and not hasattr(p, "ds_id"):
                if p._hp_mapping is None:
                    continue
                addr = p._hp_mapping.lp_fragment_address
                self.shadow[name] = value.flatten().narrow(0, addr.start, addr.numel).clone().to(self.shadow[name].device)
            else:
                self.shadow[name] = value.to(self.shadow[name].device).clone()


def build_ema(cfg, engine):
    """The run's EMA (train.ema_decay > 0), or None."""
    if cfg.train.ema_decay <= 0:
        return None
    return ShardedEMA(engine.module, cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
