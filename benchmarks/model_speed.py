"""Training-step throughput of our CoAtNet-0 against timm's `coatnet_0_224`, side by side.

    .venv/bin/pip install timm     # only this benchmark needs it (make bench installs it)
    .venv/bin/python benchmarks/model_speed.py [--batch 16 --steps 4 --rounds 3 --size 224 --dtype bf16]
        [--attention auto|sdpa|math|flex] [--channels-last auto|on|off] [--profile]
    .venv/bin/python benchmarks/model_speed.py --attention-shapes [--batch 4 --heads 24 --dtype bf16]

One training step = forward, loss, backward, AdamW step, under bf16 autocast on CPU (or CUDA if
present). The two models alternate round by round in the same process so that load from other
processes and thermal drift hit both alike; the reported figure per model is the median round, with the
training TFLOP/s it means (pipeline.train.flops: 3 forward passes of 2 FLOPs per multiply-add) and, on a GPU
of known peak, the MFU. Ours runs as the trainer runs it: `prepare_for_speed`, channels-last where
`channels_last_default` says so (--channels-last), with the attention kernel --attention. --profile
prints, per model, the ops that took the most time in one profiled training step.

--attention-shapes times only relative attention, forward + backward (gradients to q, k, v and the table)
at stage-3 token counts N = 196, 576, 1024 (14x14, 24x24, 32x32), for each kernel and for PyTorch's SDPA
fed a bias that needs a gradient (the pre-issue-10 path), and sums the bytes autograd keeps for backward.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.units import precision_dtype  # noqa: E402
from model import channels_last_default, create_model, param_groups, prepare_for_speed, set_attention_impl  # noqa: E402
from pipeline.train.flops import device_peak_tflops, tflops_per_device, train_flops_per_image  # noqa: E402


def train_steps(model, optimizer, images, labels, steps, dtype, device) -> float:
    """Seconds for `steps` training steps (after the caller's warm-up)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def forward_macs(model, size: int, device) -> int:
    """Multiply-adds of one image's forward, counted the way model.count_macs counts (any nn.Module)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size, device=device))
    model.train()
    return counter.get_total_flops() // 2


def profile_step(name, model, optimizer, images, labels, dtype, device, rows: int = 15) -> None:
    """Print the ops with the most self time in one training step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_steps(model, optimizer, images, labels, 1, dtype, device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- {name}: top ops by self time, one step")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48))


def attention_kernels(device) -> dict:
    """name -> kernel(q, k, v, rel_pos): each of our implementations, plus PyTorch's SDPA fed a bias that needs a
    gradient (the pre-issue-10 path). flex only on CUDA (PyTorch has no flex backward on CPU)."""
    from model import attention

    def torch_sdpa(q, k, v, rel_pos):  # the old path: on CPU PyTorch's math fallback, the bias needs a gradient
        return F.scaled_dot_product_attention(q, k, v, attn_mask=rel_pos().to(q.dtype).unsqueeze(0))

    kernels = {"torch-sdpa(old)": torch_sdpa}
    for impl in ["sdpa", "math"] + (["flex"] if device.type == "cuda" else []):
        kernels[impl] = lambda q, k, v, r, impl=impl: (attention.set_attention_impl(impl),
                                                     attention.relative_attention(q, k, v, r))[1]
    return kernels


def time_attention(kernel, batch: int, heads: int, side: int, dtype, device, repeats: int = 3,
                   head_dim: int = 32) -> tuple[float, int]:
    """(best-of-`repeats` seconds of forward + backward, bytes autograd keeps for backward) of relative attention
    over a side x side feature map (gradients to q, k, v and the table)."""
    from model.blocks import RelativePositionBias

    rel_pos = RelativePositionBias(heads, (side, side)).to(device)
    qkv = [torch.randn(batch, heads, side * side, head_dim, device=device, dtype=dtype, requires_grad=True)
           for _ in range(3)]
    saved, times = {}, []

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for _ in range(repeats):
        saved.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = kernel(*qkv, rel_pos)
        out.float().square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), sum(saved.values())


def attention_shapes(batch: int, heads: int, dtype, device, repeats: int = 3) -> None:
    """Per kernel and N: best-of-`repeats` forward + backward time and bytes saved for backward."""
    from model import attention

    kernels = attention_kernels(device)
    for side in (14, 24, 32):
        for name, kernel in kernels.items():
            seconds, saved = time_attention(kernel, batch, heads, side, dtype, device, repeats)
            print(f"N={side * side:5d} heads={heads} batch={batch} {str(dtype)[6:]:8s} {name:16s} "
                  f"fwd+bwd {seconds * 1e3:9.1f} ms  saved for backward {saved / 2**20:8.1f} MiB", flush=True)
    attention.set_attention_impl("auto")


def side_by_side(models: dict, images, labels, steps: int, rounds: int, dtype, device) -> dict:
    """name -> median images/s of training steps, the models alternating round by round (after one warm-up
    step each) so that other load and clock drift hit all alike. Each model gets torch's AdamW (fused on CUDA)."""
    runs = {}
    for name, model in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, fused=device.type == "cuda" or None)
        train_steps(model, optimizer, images, labels, 1, dtype, device)  # warm-up: allocator, kernels
        runs[name] = (model, optimizer, [])
    for _ in range(rounds):
        for model, optimizer, seconds in runs.values():
            seconds.append(train_steps(model, optimizer, images, labels, steps, dtype, device))
    return {name: images.shape[0] * steps / statistics.median(seconds) for name, (_, _, seconds) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--attention", choices=["auto", "sdpa", "math", "flex"], default="auto",
                        help="our attention kernel (model.attention.attention_impl)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="our convolutions' memory format (auto: model.channels_last_default)")
    parser.add_argument("--profile", action="store_true", help="profile one training step of each model")
    parser.add_argument("--attention-shapes", action="store_true",
                        help="time relative attention alone (see above)")
    parser.add_argument("--heads", type=int, default=24, help="heads for --attention-shapes (CoAtNet-3 S3: 24)")
    args = parser.parse_args()
    if args.attention_shapes:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"device={device} threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()}")
        return attention_shapes(args.batch, args.heads, precision_dtype(args.dtype), device)
    try:
        import timm
    except ImportError:
        sys.exit("benchmarks/model_speed.py: timm is not installed; run `.venv/bin/pip install timm` (or `make bench`)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision_dtype(args.dtype)
    torch.manual_seed(0)
    set_attention_impl(args.attention)
    ours = create_model("coatnet-0", num_classes=1000, image_size=args.size)
    channels_last = (channels_last_default(device.type, args.dtype) if args.channels_last == "auto"
                     else args.channels_last == "on")
    prepare_for_speed(ours, channels_last)
    models = {
        "ours coatnet-0": ours,
        f"timm {timm.__version__} coatnet_0_224": timm.create_model("coatnet_0_224", num_classes=1000, img_size=args.size),
    }
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    runs = {}
    for name, model in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
        train_steps(model, optimizer, images, labels, 1, dtype, device)  # warm-up: allocator, kernels
        runs[name] = (model, optimizer, [])
    if args.profile:
        for name, (model, optimizer, _) in runs.items():
            profile_step(name, model, optimizer, images, labels, dtype, device)
    for _ in range(args.rounds):
        for model, optimizer, seconds in runs.values():
            seconds.append(train_steps(model, optimizer, images, labels, args.steps, dtype, device))

    print(f"device={device} dtype={args.dtype} batch={args.batch} size={args.size} "
          f"threads={torch.get_num_threads()} steps/round={args.steps} rounds={args.rounds} "
          f"cpu={torch.backends.cpu.get_cpu_capability()} ours: attention={args.attention} "
          f"channels_last={channels_last}")
    rates = {}
    peak = device_peak_tflops(device)
    for name, (model, _, seconds) in runs.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rates[name] = args.batch * args.steps / statistics.median(seconds)
        tflops = tflops_per_device(rates[name], train_flops_per_image(forward_macs(model, args.size, device)).model, 1)
        mfu = f"  MFU {100 * tflops / peak:.1f}%" if peak else ""
        print(f"{name:32s} {params:6.2f}M params  {rates[name]:8.2f} images/s (training step)  "
              f"{tflops:.3f} TFLOP/s{mfu}")
    ours, theirs = rates.values()
    print(f"ratio ours/timm = {ours / theirs:.3f}  (targets: >= 1.5 in fp32, >= 1.0 in bf16)")


if __name__ == "__main__":
    main()
