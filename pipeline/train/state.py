"""The training state a checkpoint carries besides DeepSpeed's model and optimizer: one owner, one format.

    state = TrainState(cfg.seed, info, global_batch, steps_per_epoch, ema=ema, run_meta={...})
    state.load_state_dict(client, ema_folder)  # after engine.load_checkpoint; then build the loader from
    loader = build_train_loader(..., state=state.data_state); state.attach_loader(loader)   # every rank's states
    client = state.state_dict()              # collective: every rank's RNG and data position
    state.ema.save_fragments(tag_dir)        # every rank its own EMA fragments (pipeline.checkpoint.checkpointer.save does)

The client state (`engine.save_checkpoint(client_state=...)`) has exactly the keys of CLIENT_KEYS:

    step, epoch, samples_seen     progress (samples_seen = step x global batch)
    rng, data_state               {"<rank>": ...}: every rank's RNG streams and data-loader positions
    ema, ema_updates              what the EMA's files hold (pipeline.train.ema.ShardedEMA.describe; None without EMA:
                                  the values are in each rank's <tag>/ema_rank<r>.safetensors) and its update count
    model_config, classes, world_size, zero_stage, mode     what wrote it (run_meta)
    step_guard                    bad steps counted, steps whose batches a rollback skips (pipeline.faults.step_guard)

Everything random is per rank: after the model's identical initialisation each rank seeds its own streams
(`seed_rank_streams`); a resume with the same world size continues them exactly, a different world size
derives fresh ones from the step, and the loader regroups the data positions itself
(`pipeline.data.loader.loader_state_for_rank`).
"""
from __future__ import annotations

from typing import Optional

from pipeline.runtime import distributed as D
from pipeline.data.loader import derive_seed

CLIENT_KEYS = ("step", "epoch", "samples_seen", "data_state", "rng", "ema", "ema_updates",
               "model_config", "classes", "world_size", "zero_stage", "mode", "step_guard")
RUN_META_KEYS = ("model_config", "classes", "world_size", "zero_stage", "mode")

_TAG_RANK_SEED = 11


def seed_rank_streams(seed: int, rank: int, step: Optional[int] = None) -> None:
    """Seed this rank's python/numpy/torch RNG (stochastic depth); `step` after a world-size change."""
    parts = (seed, _TAG_RANK_SEED, rank) if step is None else (seed, _TAG_RANK_SEED, rank, step)
    D.seed_everything(derive_seed(*parts))


class TrainState:
    """Step, samples seen, epoch, per-rank RNG streams and data positions, and the EMA of one run."""

    def __init__(self, seed: int, info: D.DistInfo, global_batch: int, steps_per_epoch: int, ema=None,
                 run_meta: Optional[dict] = None, guard=None):
        self.seed, self.info = seed, info
        self.global_batch, self.steps_per_epoch = global_batch, steps_per_epoch
        self.ema = ema
        self.guard = guard  # a pipeline.faults.step_guard.StepGuard, or None
        self.run_meta = dict(run_meta or {})
        self.step = 0
        self.data_state: Optional[dict] = None  # the loader state to start from (set by load_state_dict)
        self.loader = None

    @property
    def samples_seen(self) -> int:
        return self.step * self.global_batch

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def attach_loader(self, loader) -> None:
        """The train loader whose positions are saved (built from `data_state`)."""
        self.loader = loader

    def advance(self, applied: bool = True) -> None:
        """One optimizer step done: count it and update the EMA (not after a step that was not applied)."""
        self.step += 1
        if self.ema is not None and applied:
            self.ema.update()

    def state_dict(self) -> dict:
        """The checkpoint's client state. Collective: every rank must call it."""
        rngs = D.all_gather_object(D.rng_state())
        datas = D.all_gather_object(self.loader.state_dict())
        out = {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
               "data_state": {str(r): s for r, s in enumerate(datas)},
               "rng": {str(r): s for r, s in enumerate(rngs)},
               "ema": self.ema.describe() if self.ema is not None else None,
               "ema_updates": self.ema.updates if self.ema is not None else 0,
               **{k: self.run_meta.get(k) for k in RUN_META_KEYS},
               "step_guard": self.guard.state_dict() if self.guard is not None else None}
        assert tuple(out) == CLIENT_KEYS
        return out

    def load_state_dict(self, client: dict, ema_folder: Optional[str] = None) -> None:
        """Restore from a checkpoint's client state (before the loader is built from `data_state`); the EMA from
        the fragment files in `ema_folder` (the checkpoint's tag folder), or from an older checkpoint's full copy
        in the client state. The client state's EMA entry is dropped once loaded (resume keeps no copy)."""
        self.step = int(client["step"])
        if int(client.get("world_size", -1)) == self.info.world_size:
            D.set_rng_state(client["rng"][str(self.info.rank)])
        else:  # a new world: per-rank RNG streams cannot be continued; derive fresh ones from the step
            seed_rank_streams(self.seed, self.info.rank, self.step)
        self.data_state = client["data_state"]  # every rank's; the loader picks or regroups its own
        recorded = client.get("ema")
        if self.ema is not None and recorded is not None:
            updates = int(client.get("ema_updates", self.step))
            if isinstance(recorded, dict) and "format" in recorded:
                if ema_folder is None:
                    raise ValueError("the checkpoint's EMA is in fragment files: pass their folder")
                self.ema.load_fragments(ema_folder, updates)
            else:  # written before the fragment files: a full fp32 copy
                self.ema.load_full(recorded, updates)
        elif self.ema is not None:  # EMA switched on at this resume: it starts from the restored weights
            self.ema.restart()
        client["ema"] = None
        if self.guard is not None:
            self.guard.load_state_dict(client.get("step_guard"))


# Keys a relaunch cannot change in the same run_dir: the checkpoint's weights would not fit (or would silently
# mean something else). Everything else may change; the new value applies from the resumed step.
FIXED_ON_RESUME = ("model.name", "model.num_classes", "model.stride_on", "data.image_size")
_NOT_REPORTED = ("run_dir",)  # a copied or moved run folder is the same run


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value) -> str:
    """0.0 as 0, 1e-05 as 1e-05: how one types it on the command line."""
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"
    return repr(value)


def check_config_change(saved: Optional[dict], new: dict, step: int, is_main: bool) -> list[str]:
    """Compare the resolved config a checkpoint was written with to this launch's: a UserError naming a key
    that cannot change; one warning line per other changed key (rank 0). Returns those lines."""
    import logging

    from core.errors import UserError

    if not saved:
        return []
    old_flat, new_flat = _flat(saved), _flat(new)
    lines = []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key), new_flat.get(key)
        if before == after or key in _NOT_REPORTED:
            continue
        if key in FIXED_ON_RESUME:
            raise UserError(f"{key} changed from {before!r} to {after!r}, but the checkpoint at step {step} was "
                            f"trained with {before!r}: keep {key}={before!r} to resume, or use a new run_dir")
        lines.append(f"config change on resume: {key} {_show(before)} -> {_show(after)} "
                     f"(the new value applies from the resumed step {step})")
    if is_main:
        for line in lines:
            logging.getLogger("pipeline.train").warning(line)
    return lines
