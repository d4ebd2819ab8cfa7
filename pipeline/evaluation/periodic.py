"""Evaluation inside a training run: data.val with the live model and, when enabled, the EMA weights (swapped
into the engine's own parameters and back: no second model per GPU)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from pipeline.runtime import distributed as D
from pipeline.config import Config
from pipeline.train.state import TrainState


@contextmanager
def _rng_untouched(device: torch.device):
    """Evaluation must not consume the training RNG (exact resume after an in-training evaluation)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


class Evaluator:
    """pipeline.evaluation.loop on data.val with the live model (and the EMA weights when enabled), logged."""

    def __init__(self, cfg: Config, info: D.DistInfo, num_classes: int, logger):
        from pipeline.evaluation.loop import build_eval_loader

        self.info, self.num_classes, self.logger = info, num_classes, logger
        self.loader, self.shards = build_eval_loader(
            cfg.data.val, cfg.data.val_split, cfg.image_hw, batch_size=cfg.train.micro_batch_size * 2,
            num_workers=min(cfg.data.num_workers, 2), rank=info.rank, world_size=info.world_size,
            center_crop=cfg.data.center_crop, crop_ratio=cfg.data.crop_ratio, in_training=True)

    def _evaluate(self, module: torch.nn.Module) -> dict:
        from pipeline.evaluation.loop import evaluate

        return evaluate(module, self.loader, self.num_classes, self.info.device, multi_label=self.shards.multi_label)

    def __call__(self, engine, state: TrainState) -> dict:
        """Evaluate the live weights, then the EMA swapped into the same engine (pipeline.train.ema.ShardedEMA.swapped_in:
        no second model on any GPU); every rank calls it."""
        from pipeline.evaluation.loop import LOGGED_KEYS, headline

        D.sync_batchnorm_stats(engine.module)
        with _rng_untouched(self.info.device):
            res = self._evaluate(engine.module)
            out = {f"eval/{k}": v for k, v in res.items() if k in LOGGED_KEYS}
            console = f"eval step {state.step}: {headline(res)} ({res['count']} images)"
            if state.ema is not None:
                with state.ema.swapped_in() as module:
                    res = self._evaluate(module)
                out.update({f"eval_ema/{k}": v for k, v in res.items()
                            if k in LOGGED_KEYS and not k.startswith("per_")})
                console += f" | EMA {headline(res)}"
        self.logger.log(state.step, out, console=console)
        return out
