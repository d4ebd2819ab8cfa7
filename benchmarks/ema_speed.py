"""EMA update time per step: pipeline.train.ema's fused update against the per-parameter loop it replaced, side by side.

    python benchmarks/ema_speed.py                        # coatnet-2 parameter shapes on the CPU
    python benchmarks/ema_speed.py --model coatnet-3 --device cuda --repeats 50

Both run on the same parameters (the model's own shapes, fp32, as the fp32 master fragments of one rank):
* baseline: the loop the EMA had before, one `mul_` and one `add_` per parameter (2 kernels each);
* fused: `ShardedEMA.update`, one `torch._foreach_lerp_` over the coalesced runs of one flat buffer.
The baseline's masters are separate tensors (as `get_hp_fragment()` returned them one by one); the fused one
reads them as ONE flat fp32 buffer, as DeepSpeed's ZeRO partitions hold them, so its update is one lerp.
Prints milliseconds per update for each and the ratio, and checks that both give the same EMA (rtol 1e-5).
Also prints the per-rank EMA bytes of a full copy and of a ZeRO fragment for the model at --gpus ranks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> int:
    from model import create_model
    from pipeline.train.ema import ShardedEMA

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="coatnet-2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--gpus", type=int, default=64, help="ranks for the bytes-per-rank line (default 64)")
    parser.add_argument("--decay", type=float, default=0.9999)
    args = parser.parse_args()
    device = torch.device(args.device)

    with torch.device("meta"):
        shapes = [(n, p.shape) for n, p in create_model(args.model, num_classes=1000).named_parameters()]
    total = sum(s.numel() for _, s in shapes)
    print(f"{args.model}: {len(shapes)} parameter tensors, {total / 1e6:.1f}M values on {device}")

    # The module: parameters as views of one flat fp32 buffer (DeepSpeed's flat partition), same values.
    torch.manual_seed(0)
    master = torch.randn(total, device=device)
    module = torch.nn.Module()
    offset = 0
    for i, (_, shape) in enumerate(shapes):
        view = master.narrow(0, offset, shape.numel()).view(shape)
        module.register_parameter(f"p{i}", torch.nn.Parameter(view))
        offset += shape.numel()
    fused = ShardedEMA(module, args.decay)
    assert fused.runs == 1, fused.runs

    # The baseline: the old per-parameter loop over separate master tensors and separate shadows.
    masters = [master.narrow(0, f.offset, f.numel).clone() for f in fused.fragments]
    shadows = [m.clone() for m in masters]

    @torch.no_grad()
    def loop():
        d = args.decay
        for s, cur in zip(shadows, masters):
            s.mul_(d).add_(cur, alpha=1.0 - d)

    baseline_ms = timed(loop, device, args.repeats)
    fused_ms = timed(fused.update, device, args.repeats)
    after_loop = torch.cat([s.flatten() for s in shadows])
    # The same EMA up to rounding (lerp keeps an EMA equal to its input exactly; mul+add drifts by an ulp a step).
    assert torch.allclose(after_loop, fused.flat, atol=1e-6, rtol=1e-5), (after_loop - fused.flat).abs().max()
    print(f"per-parameter loop: {baseline_ms:9.2f} ms/update  ({2 * len(shapes)} kernels)")
    print(f"fused (pipeline.train.ema): {fused_ms:7.2f} ms/update  ({fused.runs} lerp)")
    print(f"ratio loop / fused: {baseline_ms / fused_ms:.2f}x")

    full = 4 * total
    print(f"EMA bytes per rank at {args.gpus} ranks: full copy {full / 1e9:.2f} GB, fragment "
          f"{full / args.gpus / 1e6:.1f} MB (ratio {args.gpus}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
