"""Exponential moving average of the fp32 master weights, sharded like them, kept inside a DeepSpeed run.

Why not timm's ModelEma: under DeepSpeed the module holds bf16/fp16 copies (an EMA of those loses the small
updates that decay 0.9999 averages) and, with ZeRO, the fp32 master weights are partitioned over ranks. So
each rank averages only the slice of every parameter whose fp32 master it owns, and nothing else:

* ZeRO-1/2 and the bf16 optimizer: DeepSpeed's `_hp_mapping` (the fragment of the flattened parameter this
  rank's partition holds, and a view of its fp32 master);
* ZeRO-3: the parameter's partition (`ds_tensor`): rank r owns [r x partition, (r+1) x partition) of the
  flattened parameter (the last rank's partition is padded), its fp32 master a view of DeepSpeed's flat group;
* no DeepSpeed master (plain fp32): the whole parameter.

All of a rank's fragments live in ONE flat fp32 buffer, ordered like the optimizer's own flat partitions, so
one step is a single fused `torch._foreach_lerp_` over a handful of coalesced runs (usually one per parameter
group): no communication, no per-parameter Python loop, no full copy on any rank (CoAtNet-7 under ZeRO-3 on 64 GPUs:
157 MB of EMA per GPU, where a full copy took 10 GB).

On disk each rank writes its buffer as `<tag>/ema_rank<r:05d>.safetensors` next to DeepSpeed's shards, before
the checkpoint is marked complete (pipeline.checkpoint.checkpointer); an index in its metadata names each fragment's
(parameter, start, numel, shape, offset). Only export and consolidation (pipeline.weights.files) assemble the full
EMA. Resume with the same layout reads this rank's own file; after a world-size change (universal checkpoint)
each rank reads from every file only the byte ranges that overlap its new fragments (safetensors slices:
no full copy on any rank). Checkpoints written before this format (a full EMA in the client state) still resume
and export.

Evaluation with the EMA swaps it into the engine's own parameters and back (`swapped_in`): the bf16 module
copies are rewritten from the EMA, evaluated, then rewritten from the fp32 master, as DeepSpeed does after
every step; so no second model is ever built (the one transient is a swap buffer of at most SWAP_CHUNK values).

Floating-point buffers (BatchNorm running statistics) are averaged too, as timm's ModelEmaV2 does with the
whole state dict: each rank keeps its own (they are small) and writes them into its file; assembly and
evaluation average them over ranks.

Optional decay warm-up (`train.ema_warmup`) follows TensorFlow's ExponentialMovingAverage(num_updates):
decay_t = min(decay, (1+t)/(10+t)), so short runs (the demo's fine-tuning) do not average in the random
initial head for long. Off by default: with it a 30-epoch fine-tune never reaches the paper's 0.9999.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

FORMAT = "coatnet-ema-fragments/1"
SWAP_CHUNK = 1 << 24  # values swapped at a time between the EMA and the fp32 master for evaluation (64 MB)


def fragment_file(rank: int) -> str:
    return f"ema_rank{rank:05d}.safetensors"


@dataclass
class Fragment:
    """The values [start, start+numel) of the flattened parameter `name` that this rank averages."""
    name: str
    start: int
    numel: int
    shape: tuple
    offset: int = 0                         # where they sit in the rank's flat EMA buffer
    master: Optional[torch.Tensor] = None   # a 1-D view of the fp32 master values (None: convert `param`)
    low: Optional[torch.Tensor] = None      # the module's (low-precision) copy of the same values, 1-D
    kind: str = "full"                      # "hp" (ZeRO-1/2, bf16 optimizer), "z3", or "full"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _z3_master(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's fp32 partition of a ZeRO-3 parameter, as a VIEW of DeepSpeed's flat fp32 group.

    DeepSpeed's public `safe_get_local_fp32_param` returns the same values but copies them to the accelerator
    when the optimizer is offloaded; the EMA averages in place against the master, wherever it lives."""
    optimizer = p._z3_optimizer
    if hasattr(optimizer, "_get_fp32_opt_state_partition"):
        return optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=True)[0]
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(p)


def _fragments(module: torch.nn.Module, names: list[str]) -> list[Fragment]:
    params = dict(module.named_parameters())
    out = []
    for name in names:
        p = params[name]
        if hasattr(p, "ds_id"):  # ZeRO-3
            group = getattr(p, "ds_process_group", None)
            rank = dist.get_rank(group=group) if dist.is_initialized() else 0
            part = p.ds_tensor.ds_numel
            start = rank * part
            numel = max(0, min(part, p.ds_numel - start))
            if numel:
                out.append(Fragment(name, start, numel, tuple(p.ds_shape), master=_z3_master(p).narrow(0, 0, numel),
                                    low=p.ds_tensor.view(-1).narrow(0, 0, numel), kind="z3"))
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, BF16_Optimizer
            if p._hp_mapping is not None:  # else this rank holds no fragment of p
                addr = p._hp_mapping.lp_fragment_address
                out.append(Fragment(name, addr.start, addr.numel, tuple(p.shape),
                                    master=p._hp_mapping.get_hp_fragment().view(-1),
                                    low=p._hp_mapping.lp_fragment.view(-1), kind="hp"))
        else:
            flat = p.detach().view(-1)
            out.append(Fragment(name, 0, p.numel(), tuple(p.shape),
                                master=flat if p.dtype == torch.float32 else None, low=flat))
    return out


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.storage_offset()


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False, optimizer=None):
        self.module, self.optimizer = module, optimizer
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = set(dict(module.named_parameters()))
        # Persistent buffers only (BatchNorm statistics), as in the model's state dict.
        self.buffer_names = [k for k in module.state_dict().keys() if k not in params]
        self.buffers = {n: b for n, b in module.named_buffers() if n in set(self.buffer_names)}
        self.buffer_shadow = {n: b.detach().float().clone() for n, b in self.buffers.items() if b.is_floating_point()}
        self.fragments = self._layout()
        device = next((f.master.device for f in self.fragments if f.master is not None), None)
        device = device or next((f.low.device for f in self.fragments), torch.device("cpu"))
        self.flat = torch.empty(sum(f.numel for f in self.fragments), dtype=torch.float32, device=device)
        self.restart()

    # ------------------------------------------------------------------------------------------ layout
    def _layout(self) -> list[Fragment]:
        """This rank's fragments in the order of the optimizer's flat fp32 partitions (so neighbours in the
        EMA buffer are neighbours in the master too, and coalesce), then the whole-parameter ones."""
        found = _fragments(self.module, self.names)
        mastered = sorted((f for f in found if f.master is not None), key=lambda f: _storage_key(f.master))
        rest = [f for f in found if f.master is None]
        offset = 0
        for f in mastered + rest:
            f.offset, offset = offset, offset + f.numel
        return mastered + rest

    def _bind(self) -> None:
        """Views into the flat buffer, and the fused update's runs: maximal stretches where consecutive
        fragments are adjacent both in the EMA buffer and in one fp32 master storage."""
        self.views = [self.flat.narrow(0, f.offset, f.numel) for f in self.fragments]
        runs: list[list] = []  # [ema offset, numel, first master view]
        for f in self.fragments:
            if f.master is None:
                continue
            if runs:
                offset, numel, first = runs[-1]
                if (f.offset == offset + numel and _storage_key(f.master) ==
                        (first.untyped_storage().data_ptr(), first.storage_offset() + numel)):
                    runs[-1][1] += f.numel
                    continue
            runs.append([f.offset, f.numel, f.master])
        self._dst = [self.flat.narrow(0, offset, numel) for offset, numel, _ in runs]
        self._src = [first.as_strided((numel,), (1,), first.storage_offset()) for _, numel, first in runs]
        self._converted = [(view, f.low) for f, view in zip(self.fragments, self.views) if f.master is None]
        self._buffer_dst = list(self.buffer_shadow.values())
        self._buffer_src = [self.buffers[n] for n in self.buffer_shadow]

    def refresh(self) -> None:
        """Re-resolve the fp32 master views (after engine.load_checkpoint: DeepSpeed copies into its tensors in
        place, but a fresh look costs nothing next to a load), keeping the averaged values."""
        fresh = {(f.name, f.start): f for f in _fragments(self.module, self.names)}
        for f in self.fragments:
            new = fresh[(f.name, f.start)]
            f.master, f.low = new.master, new.low
        self._bind()

    @torch.no_grad()
    def restart(self) -> None:
        """Start averaging again from the current weights (a resume from a checkpoint without EMA)."""
        self.refresh()
        self.updates = 0
        for f, view in zip(self.fragments, self.views):
            view.copy_(f.master if f.master is not None else f.low)
        for n, s in self.buffer_shadow.items():
            s.copy_(self.buffers[n])

    @property
    def runs(self) -> int:
        """How many fused stretches one update lerps (1 per optimizer parameter group when fully coalesced)."""
        return len(self._dst) + len(self._converted)

    # ------------------------------------------------------------------------------------------ update
    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Call on every rank after each applied optimizer step: ema += (1 - decay) (master - ema), fused."""
        weight = 1.0 - self.current_decay()
        if self._dst:
            torch._foreach_lerp_(self._dst, self._src, weight)
        for view, low in self._converted:  # no fp32 master (plain fp16/bf16 module): average the module copy
            view.lerp_(low.float(), weight)
        if self._buffer_dst:
            torch._foreach_lerp_(self._buffer_dst, [b.detach().to(s.device, torch.float32)
                                                    for s, b in zip(self._buffer_dst, self._buffer_src)], weight)
        self.updates += 1

    # ------------------------------------------------------------------------------------------ files
    def describe(self) -> dict:
        """What the checkpoint's client state records (the values are in the per-rank files)."""
        return {"format": FORMAT, "world_size": _rank_world()[1], "updates": self.updates}

    def index(self) -> list:
        return [[f.name, f.start, f.numel, list(f.shape), f.offset] for f in self.fragments]

    @torch.no_grad()
    def save_fragments(self, folder: str) -> str:
        """Write this rank's EMA as `folder/ema_rank<r>.safetensors` (atomically); returns its path."""
        path, write = self.fragment_snapshot(folder, copy=False)
        write()
        return path

    def fragment_snapshot(self, folder: str, copy: bool = True):
        """(path, write): this rank's fragment file and a function writing it. With `copy` the tensors are copied
        now, so that the write can run in the background while training goes on (checkpoint.async_save)."""
        from safetensors.torch import save_file

        from core.files import atomic_path

        rank, world = _rank_world()
        tensors = {"fragments": self.flat.detach().cpu()}
        tensors.update({f"buffer/{n}": s.detach().cpu() for n, s in self.buffer_shadow.items()})
        if rank == 0:  # integer buffers (num_batches_tracked): the module's own, once
            tensors.update({f"int/{n}": b.detach().cpu().clone() for n, b in self.buffers.items()
                            if n not in self.buffer_shadow})
        if copy and self.flat.device.type == "cpu":  # .cpu() of a CPU tensor is the tensor itself; from a GPU, a copy
            tensors = {k: v.clone() for k, v in tensors.items()}
        metadata = {"format": FORMAT, "rank": str(rank), "world_size": str(world), "updates": str(self.updates),
                    "index": json.dumps(self.index(), separators=(",", ":"))}
        path = os.path.join(folder, fragment_file(rank))

        def write() -> None:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)

        return path, write

    @torch.no_grad()
    def load_fragments(self, folder: str, updates: int) -> None:
        """Restore from the fragment files in `folder`: this rank's own file when the layout is unchanged,
        else, for each of its fragments, only the overlapping slices of every rank's file."""
        from safetensors import safe_open

        from pipeline.weights.files import PretrainedError, ema_fragment_files

        self.refresh()
        self.updates = updates
        files = ema_fragment_files(folder)
        if not files:
            raise PretrainedError(f"{folder} has no EMA fragment files (ema_rank*.safetensors) although the checkpoint "
                                  f"records an EMA; the checkpoint is incomplete: resume from an earlier one")
        rank, world = _rank_world()
        own = [f for f in files if f["rank"] == rank and f["world_size"] == world]
        if own and own[0]["index"] == self.index():
            with safe_open(own[0]["path"], framework="pt", device="cpu") as handle:
                self.flat.copy_(handle.get_tensor("fragments"))
                for n, s in self.buffer_shadow.items():
                    s.copy_(handle.get_tensor(f"buffer/{n}"))
            return
        pieces: dict[str, list] = {}
        for file in files:
            for name, start, numel, shape, offset in file["index"]:
                pieces.setdefault(name, []).append((start, numel, offset, file["path"]))
        handles: dict = {}
        try:
            for f, view in zip(self.fragments, self.views):
                covered = 0
                for start, numel, offset, path in pieces.get(f.name, []):
                    lo, hi = max(start, f.start), min(start + numel, f.start + f.numel)
                    if lo >= hi:
                        continue
                    if path not in handles:
                        handles[path] = safe_open(path, framework="pt", device="cpu")
                    part = handles[path].get_slice("fragments")[offset + lo - start:offset + hi - start]
                    view.narrow(0, lo - f.start, hi - lo).copy_(part)
                    covered += hi - lo
                if covered != f.numel:
                    raise PretrainedError(f"{folder}: the EMA fragment files hold {covered} of the {f.numel} values "
                                          f"of {f.name} this rank needs; the checkpoint is incomplete")
            sums = {n: torch.zeros_like(s, device="cpu") for n, s in self.buffer_shadow.items()}
            for file in files:  # a new world: every rank starts from the ranks' average
                if file["path"] not in handles:
                    handles[file["path"]] = safe_open(file["path"], framework="pt", device="cpu")
                for n in sums:
                    sums[n] += handles[file["path"]].get_tensor(f"buffer/{n}")
            for n, s in self.buffer_shadow.items():
                s.copy_(sums[n] / len(files))
        finally:
            handles.clear()

    @torch.no_grad()
    def load_full(self, full: dict, updates: int) -> None:
        """Restore from a full fp32 EMA state dict (checkpoints written before the fragment files)."""
        self.refresh()
        self.updates = updates
        for n, s in self.buffer_shadow.items():
            if n in full:
                s.copy_(full[n].float())
        for f, view in zip(self.fragments, self.views):
            view.copy_(full[f.name].float().flatten().narrow(0, f.start, f.numel))

    # ------------------------------------------------------------------------------------------ evaluation
    @contextmanager
    def swapped_in(self):
        """The EMA in the engine's module for the block (collective: every rank). No copy of the model is made:
        * ZeRO-1/2 and the bf16 optimizer rebuild their module copies from the fp32 master with
          `update_lp_params` (an all-gather), so the EMA is swapped into the master for that call and back;
        * ZeRO-3: each rank writes its partitions (`ds_tensor`); DeepSpeed gathers them in the forward pass;
        * plain fp32 parameters are swapped with the EMA (a module without a master copy is backed up).
        Afterwards the module copies are rebuilt from the fp32 master exactly as DeepSpeed does after a step."""
        self.refresh()  # ZeRO-3 re-points each ds_tensor at its flat buffer every step: take today's views
        kinds = {f.kind for f in self.fragments}
        backups: dict = {}
        with torch.no_grad():
            if "hp" in kinds:
                self._swap_master("hp")
                try:
                    self.optimizer.update_lp_params()
                finally:
                    self._swap_master("hp")
            self._release_zero3()
            for f, view in zip(self.fragments, self.views):
                if f.kind == "z3":
                    f.low.copy_(view)
                elif f.kind == "full" and f.master is None:
                    backups[f.name] = f.low.clone()
                    f.low.copy_(view)
            self._swap_master("full")
            self._gather_persistent()
            buffer_backup = self._swap_buffers_in()
        try:
            yield self.module
        finally:
            with torch.no_grad():
                if "hp" in kinds:
                    self.optimizer.update_lp_params()
                self._release_zero3()
                for f in self.fragments:
                    if f.kind == "z3":
                        f.low.copy_(f.master)
                    elif f.kind == "full" and f.master is None:
                        f.low.copy_(backups.pop(f.name))
                self._swap_master("full")
                self._gather_persistent()
                for n, b in buffer_backup.items():
                    self.buffers[n].copy_(b)

    def _swap_master(self, kind: str) -> None:
        """Exchange the EMA and the fp32 master values of the `kind` fragments, SWAP_CHUNK values at a time."""
        chosen = [(f, view) for f, view in zip(self.fragments, self.views) if f.kind == kind and f.master is not None]
        if not chosen:
            return
        tmp = torch.empty(min(SWAP_CHUNK, max(f.numel for f, _ in chosen)), dtype=torch.float32, device=self.flat.device)
        for f, view in chosen:
            for lo in range(0, f.numel, SWAP_CHUNK):
                n = min(SWAP_CHUNK, f.numel - lo)
                a, b, t = f.master.narrow(0, lo, n), view.narrow(0, lo, n), tmp.narrow(0, 0, n)
                t.copy_(a)
                a.copy_(b)
                b.copy_(t)

    def _release_zero3(self) -> None:
        """ZeRO-3: release every gathered parameter (DeepSpeed may cache some between forward passes), so the
        next forward gathers them from the partitions written here."""
        if any(f.kind == "z3" for f in self.fragments) and hasattr(self.optimizer, "empty_partition_cache"):
            self.optimizer.empty_partition_cache()

    def _gather_persistent(self) -> None:
        """ZeRO-3 parameters kept whole on every rank (below stage3_param_persistence_threshold): rebuild them
        from the partitions just written, as DeepSpeed's checkpoint epilogue does."""
        persistent = getattr(self.optimizer, "persistent_parameters", None)
        if persistent and any(f.kind == "z3" for f in self.fragments):
            persistent[0].all_gather(persistent)

    def _swap_buffers_in(self) -> dict:
        """The ranks' averaged EMA buffers into the module; returns the module's own to put back."""
        if not self.buffer_shadow:
            return {}
        names = list(self.buffer_shadow)
        flat = torch.cat([self.buffer_shadow[n].view(-1) for n in names])
        _, world = _rank_world()
        if world > 1:
            from pipeline.runtime.distributed import all_reduce_sum

            flat = all_reduce_sum(flat) / world
        backup, offset = {}, 0
        for n in names:
            buf = self.buffers[n]
            backup[n] = buf.detach().clone()
            buf.copy_(flat.narrow(0, offset, buf.numel()).view_as(buf))
            offset += buf.numel()
        return backup

    def bytes_per_rank(self) -> int:
        """fp32 bytes of EMA state this rank holds (parameters and buffers)."""
        return 4 * (self.flat.numel() + sum(s.numel() for s in self.buffer_shadow.values()))


def build_ema(cfg, engine):
    """The run's EMA (train.ema_decay > 0), or None."""
    if cfg.train.ema_decay <= 0:
        return None
    return ShardedEMA(engine.module, cfg.train.ema_decay, warmup=cfg.train.ema_warmup, optimizer=engine.optimizer)
