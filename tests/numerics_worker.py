"""Rank worker for tests/test_numerics.py: `deepspeed --num_gpus 2 --module tests.numerics_worker OUT`.

Every check builds its DeepSpeed engine from pipeline.train.optim.deepspeed_config (the config the trainer uses), on
real ranks with gloo, and writes its figures to OUT/rank<r>.json for the test to judge:
  accum:  the gradient accumulated over ACCUM micro-batches and averaged over ranks, against its exact value,
          for ZeRO 1/2/3 with the pipeline's dtypes (fp32) and with the old ones (bf16, DeepSpeed's defaults);
  bn:     coatnet-nano under bf16 ZeRO-2: BatchNorm running statistics are fp32 after the engine is built and
          after a step, and the first update equals the fp32 mean of the BN input the step saw.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

ACCUM = 64


def _cfg(stage: int, accum_dtype: str, world: int, extra: list[str] = (), micro: int = 1, accum: int = ACCUM):
    from pipeline.config import load_config

    return load_config(None, [f"deepspeed.zero_stage={stage}", "precision=bf16", f"train.micro_batch_size={micro}",
                              f"train.global_batch_size={micro * world * accum}",
                              f"deepspeed.grad_accum_dtype={accum_dtype}",
                              f"deepspeed.communication_dtype={accum_dtype}", *extra])


def _engine(net: nn.Module, cfg, world: int):
    import deepspeed

    from pipeline.train.optim import deepspeed_config

    ds_config = deepspeed_config(cfg, world, on_cpu=True)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=ds_config)
    return engine, ds_config


def accumulation_error(stage: int, accum_dtype: str, rank: int, world: int) -> dict:
    """Relative max error of the accumulated, rank-averaged gradient of a bf16 linear layer.

    Micro-batch i on rank r contributes x[r, i] / ACCUM (batch of one, inputs exactly representable in bf16,
    loss scaled by a power of two), so the exact gradient is known in float64 on every rank.
    """
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(0)
    net = nn.Linear(256, 4, bias=False)
    engine, ds_config = _engine(net, _cfg(stage, accum_dtype, world), world)
    xs = [(1 + torch.rand(ACCUM, 1, 256, generator=torch.Generator().manual_seed(r))).bfloat16() for r in range(world)]
    grad = None
    for i in range(ACCUM):
        engine.backward(engine(xs[rank][i]).float().sum())
        if i == ACCUM - 1:  # the boundary backward has reduced; read before step() clips and clears
            grad = safe_get_full_grad(engine.module.weight).detach().clone()
        engine.step()
    exact = sum(x.double().sum(0).squeeze(0) for x in xs) / (ACCUM * world)
    error = ((grad.double() - exact).abs().max() / exact.abs().max()).item()
    result = {"rel_error": error, "grad_dtype": str(grad.dtype), "optimizer": type(engine.optimizer).__name__,
              "data_types": ds_config.get("data_types"), "comm": ds_config.get("communication_data_type")}
    engine.destroy()
    return result


def _stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var"))}


def batchnorm_under_deepspeed(world: int) -> dict:
    import model

    torch.manual_seed(0)
    net = model.create_model("coatnet-nano", num_classes=4, image_size=32)
    engine, ds_config = _engine(net, _cfg(2, "fp32", world, micro=4, accum=1), world)
    built = {n: str(b.dtype) for n, b in _stats(engine.module).items()}
    seen = {}
    norm = engine.module.stem.norm1
    hook = norm.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach().clone()))
    x, y = torch.randn(4, 3, 32, 32).bfloat16(), torch.randint(0, 4, (4,))
    engine.train()
    engine.backward(F.cross_entropy(engine(x).float(), y))
    engine.step()
    hook.remove()
    expected = norm.momentum * seen["x"].double().mean(dim=(0, 2, 3))  # from the initial running_mean 0
    got = norm.running_mean.double()
    result = {"buffer_dtype_in_config": (ds_config.get("data_types") or {}).get("buffer_dtype"),
              "param_dtype": str(engine.module.stem.conv1.weight.dtype), "input_dtype": str(seen["x"].dtype),
              "after_build": built, "after_step": {n: str(b.dtype) for n, b in _stats(engine.module).items()},
              "first_update_rel_error": ((got - expected).abs().max() / expected.abs().max()).item(),
              "finite": all(bool(torch.isfinite(b).all()) for b in _stats(engine.module).values())}
    engine.destroy()
    return result


def main(out: str) -> None:
    from pipeline.runtime.distributed import setup

    info = setup(deterministic=False)  # the trainer's own start: DeepSpeed's CPU accelerator, gloo
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    rank, world = info.rank, info.world_size
    results: dict = {"world": world, "accum": {}}
    for stage in (1, 2, 3):
        for dtype in ("fp32", "bf16"):
            results["accum"][f"zero{stage}_{dtype}"] = accumulation_error(stage, dtype, rank, world)
    results["bn"] = batchnorm_under_deepspeed(world)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])  # the launcher adds --local_rank
