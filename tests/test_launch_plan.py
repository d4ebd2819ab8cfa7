"""launch.plan: memory and time figures for CoAtNet-7 at 512 px on 64 x 80 GB and CoAtNet-0 on one GPU.

The asserted ranges are derived here from first principles, not copied from the planner's output:

Model states (mixed-precision AdamW, DeepSpeed's accounting): 2 bytes 16-bit weights + 2 bytes 16-bit
gradients + 4 fp32 gradients + 4 fp32 master weights + 8 Adam moments = 20 bytes per parameter.
- ZeRO-1 with fp32 gradient accumulation (the trainer's default) is DeepSpeed's BF16_Optimizer: 16-bit weights
  and a full fp32 gradient buffer on every rank, the 12 bytes of fp32 master weights and moments split:
  2 + 4 + 12/N bytes/param;
- ZeRO-2 splits everything but the 16-bit weights: 2 + 18/N;
- ZeRO-3 splits all of it: 18/N (DeepSpeed counts the 16-bit weights inside its 18) + the largest layer
  gathered whole in fp32 (4 bytes per parameter of that layer);
- one GPU without ZeRO: all 20 bytes.
For CoAtNet-7 (2.44e9 parameters, N = 64): ZeRO-1 (6 + 0.19) * 2.44e9 = 15.1 GB = 14.1 GiB; ZeRO-2
(2 + 0.28) * 2.44e9 = 5.6 GB = 5.2 GiB; ZeRO-3 0.28 * 2.44e9 = 0.69 GB plus a <= 40M-parameter largest
layer (the 3072-wide Transformer MLP: 3072 x 12288 = 37.7M, 0.15 GB) = 0.84 GB = 0.78 GiB.
Each adds the EMA's fp32 fragment (4 B x P / 64 = 0.14 GiB) and DeepSpeed's communication buffers: ZeRO-1
the engine's fp32 all-reduce buffer of 5e8 elements (fixed in DeepSpeed: 1.86 GiB); ZeRO-2 two bf16 reduce
buckets of the trainer's deepspeed.bucket_elements = 5e7 (overlap_comm on GPUs) and one bucket's fp32 cast
for the fp32 reduction (0.37 GiB); ZeRO-3 a reduce
bucket of 5e7 in the fp32 accumulation dtype (0.19 GiB) and a bf16 prefetch bucket of 5e7 (0.09 GiB).

Activations (bf16, 2 bytes) follow Korthikanti et al.'s count for a Transformer layer with fused
attention: 34 * s * h bytes per image (s tokens, h width). CoAtNet-7 at 512 px: S3 has 32 x 32 = 1024
tokens of width 2048 in 42 layers = 3.0 GB; an MBConv block keeps ~7 tensors of its expanded width:
S1 (128^2 px, 1024 ch, 2 blocks) 0.47 GB, S2 (64^2, 2048, 4) 0.47 GB, S3's 8 MBConv blocks (32^2, 4096) 0.47 GB;
stem and S4 ~0.15 GB: ~4.6 GB = 4.3 GiB per image. Checkpointing keeps only block inputs
(42 x 1024 x 2048 x 2 bytes = 0.18 GB for S3, a bit more for the conv stages) plus one block's
recompute (~0.1 GB): well under a quarter. CoAtNet-0 at 224 px: S3 196 x 384 x 34 x 5 layers = 13 MB,
S1 2 x 7 x 384 x 56^2 x 2 = 34 MB, S2 3 x 7 x 768 x 28^2 x 2 = 25 MB, stem ~6 MB, S4 3 MB: ~80 MB = 77 MiB.

Time: 6 FLOPs per multiply-add per training image (forward + backward = 3 forward passes).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.plan import GIB, format_table, plan
from pipeline.config import load_config
from pipeline.train.flops import peak_tflops_for_name, train_flops_per_image, train_seconds, utilization
from pipeline.train.metrics import Throughput, console_line

REPO = Path(__file__).resolve().parents[1]
C7_512 = "configs/finetune/jft_coatnet-7_512.yaml"
C0 = "configs/pretrain/in1k_coatnet-0.yaml"
IMAGENET_TRAIN = 1_281_167


def _row(result, stage, ckpt=False, offload=False):
    return next(o for o in result["options"] if o["zero_stage"] == stage and o["activation_checkpointing"] == ckpt
                and o["offload_optimizer"] == offload and not o["offload_param"])


@pytest.fixture(scope="module")
def c7():
    res = subprocess.run([sys.executable, "-m", "launch.plan", "--config", C7_512, "--nodes", "8", "--gpus-per-node",
                          "8", "--gpu-mem-gb", "80", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_coatnet7_512_on_64_gpus_model_figures(c7):
    assert abs(c7["parameters"] - 2.44e9) / 2.44e9 < 0.01
    assert 2.4e12 < c7["macs_per_image"] < 2.75e12  # paper: 2586B multiply-adds at 512 px
    assert 20e6 < c7["largest_layer_parameters"] < 40e6
    assert 15.5 < _row(c7, 1)["states_gib"] < 16.6  # 14.1 + 0.14 + 1.86
    assert 5.3 < _row(c7, 2)["states_gib"] < 5.8  # 5.2 + 0.14 + 0.37
    assert 1.05 < _row(c7, 3)["states_gib"] < 1.35  # 0.78 + 0.14 + 0.28
    assert _row(c7, 2, offload=True)["states_gib"] < _row(c7, 2)["states_gib"]  # only the 16-bit weights stay
    assert 3.5 < c7["activation_gib_per_image"] < 5.5
    assert 0.25 < c7["activation_gib_per_image_checkpointed"] < c7["activation_gib_per_image"] / 4


def test_coatnet7_512_on_64_gpus_plan(c7):
    assert c7["gpus"] == 64 and c7["fits"], c7["reason"]
    chosen = c7["chosen"]
    # 512 images over 64 GPUs: 8 per GPU per step, no offload needed with ~79 GiB usable.
    assert chosen["micro_batch_size"] * chosen["accumulation"] * 64 == 512
    assert not chosen["offload_optimizer"] and not chosen["offload_param"]
    assert chosen["total_gib"] <= c7["usable_gib"] < 80
    # ZeRO-0 is never offered on many GPUs; with everything partitioned and checkpointing it fits easily.
    assert all(o["zero_stage"] > 0 for o in c7["options"])
    assert _row(c7, 3, ckpt=True)["fits"]
    assert c7["as_written"]["fits"], "the config's own DeepSpeed settings must fit the cluster it names"
    assert f"train.micro_batch_size={chosen['micro_batch_size']}" in c7["overrides"]
    # one epoch of ImageNet-1K at MFU 0.4 of 989 TFLOP/s on 64 GPUs
    expected_h = IMAGENET_TRAIN * 6 * c7["macs_per_image"] / (64 * 989e12 * 0.4) / 3600
    assert c7["images_per_epoch"] == IMAGENET_TRAIN
    assert c7["epoch_hours"] == pytest.approx(expected_h, rel=1e-6) and 0.15 < expected_h < 0.3


def test_table_output_reads_like_the_json(c7):
    out = format_table(c7)
    assert "PLAN: ZeRO-" in out and "<= chosen" in out and " ".join(c7["overrides"]) in out
    assert "2,44" in out.split("parameters", 1)[1].splitlines()[0]  # "2,442.8 M"
    assert len([line for line in out.splitlines() if line.strip().startswith("ZeRO-")]) == len(c7["options"])


def test_coatnet0_on_one_gpu():
    r = plan(load_config(REPO / C0), nodes=1, gpus_per_node=1, gpu_mem_gb=80)
    assert abs(r["parameters"] - 25e6) / 25e6 < 0.02
    assert 4.0e9 < r["macs_per_image"] < 4.4e9  # paper: 4.2B
    assert 60 < r["activation_gib_per_image"] * 1024 < 120  # MiB per image, ~77 by hand
    zero0 = _row(r, 0)
    # 20 bytes of model states + the engine's fp32 all-reduce buffer (the whole model: 25M < 5e8 elements)
    assert zero0["states_gib"] * GIB == pytest.approx(24 * r["parameters"], rel=1e-6)
    c = r["chosen"]
    # One GPU: no ZeRO, no offload, no checkpointing; 4096 images per step by accumulation.
    assert r["fits"] and (c["zero_stage"], c["offload_optimizer"], c["activation_checkpointing"]) == (0, False, False)
    assert c["micro_batch_size"] * c["accumulation"] == 4096
    # 79 GiB usable / (~0.1 GiB per image x 1.1) fits ~700 images: the largest divisor of 4096 is 512.
    assert 256 <= c["micro_batch_size"] <= 1024
    epoch_s = r["epoch_hours"] * 3600
    assert epoch_s == pytest.approx(IMAGENET_TRAIN * 6 * r["macs_per_image"] / (989e12 * 0.4), rel=1e-6)
    assert 60 < epoch_s < 100
    assert r["total_steps"] == 300 * (IMAGENET_TRAIN // 4096)


def test_a_setting_that_cannot_fit_says_so():
    cfg = load_config(REPO / C7_512)
    # 2.44e9 x 20 bytes does not fit 16 GiB, and ZeRO-Infinity's CPU side (18 bytes/param x 1.5) needs ~61 GiB.
    r = plan(cfg, nodes=1, gpus_per_node=1, gpu_mem_gb=16, cpu_mem_gb=32)
    assert not r["fits"] and r["chosen"] is None
    assert r["reason"].startswith("cannot fit") and "GiB per GPU" in r["reason"]
    uneven = plan(load_config(REPO / C0), nodes=3, gpus_per_node=8, gpu_mem_gb=80)
    assert not uneven["fits"] and "not divisible by 24 GPUs" in uneven["reason"]


def test_bad_input_is_one_line_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "launch.plan", "--config", C0, "--nodes", "0", "--gpus-per-node", "8",
                          "--gpu-mem-gb", "80", "train.stepz=3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "train.stepz" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = subprocess.run([sys.executable, "-m", "launch.plan", "--config", C0, "--nodes", "0", "--gpus-per-node", "8",
                          "--gpu-mem-gb", "80"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == "error: --nodes must be >= 1, got 0"


def test_flops_mfu_and_hfu_are_counted_once():
    # 2 FLOPs per multiply-add, forward + backward = 3 forwards; checkpointing recomputes one more forward.
    plain, ckpt = train_flops_per_image(10**9), train_flops_per_image(10**9, recompute=True)
    assert (plain.model, plain.hardware) == (6e9, 6e9) and (ckpt.model, ckpt.hardware) == (6e9, 8e9)
    # 1000 img/s of 6 GFLOP on 2 devices of 10 TFLOP/s: 3 TFLOP/s each = MFU 0.3 (HFU 0.4 with recompute).
    assert utilization(1000, ckpt.model, 2, 10.0) == pytest.approx(0.3)
    assert utilization(1000, ckpt.hardware, 2, 10.0) == pytest.approx(0.4)
    assert train_seconds(1000, ckpt.model, 2, 10.0, 0.3) == pytest.approx(1.0)  # the inverse
    assert peak_tflops_for_name("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops_for_name("NVIDIA A100-SXM4") == 312.0
    assert peak_tflops_for_name("NVIDIA GH200 480GB") == 989.0 and peak_tflops_for_name("Radeon") is None


def test_trainer_logs_mfu_of_model_flops_and_hfu_with_recompute():
    meter = Throughput(global_batch=100, macs_per_image=10**9, device=torch.device("cpu"), recompute=True)
    assert meter.peak is None and "perf/mfu" not in meter.window(1, 10, 0)  # no known peak on CPU
    meter.peak = 10.0
    meter.t0 -= 1.0  # one step of 100 images in about one second
    out = meter.window(2, 10, 0)
    assert out["perf/hfu"] == pytest.approx(out["perf/mfu"] * 4 / 3)
    assert out["perf/mfu"] == pytest.approx(out["perf/tflops_per_device"] / 10.0)
    line = console_line(2, 10, 0.1, {"loss": 1.0, "lr": 1e-3, **out})
    assert "MFU " in line and "HFU " in line


def test_rank_peak_names_every_term_and_counts_them_per_phase():
    """CoAtNet-2 at the memory benchmark's setting (2 CPU ranks, ZeRO-1, bf16, 64 px, micro-batch 2)."""
    from launch.plan import rank_peak

    r = rank_peak("coatnet-2", 64, 2, 2, 1, device="cpu", num_classes=4)
    t = r["terms"]
    p = t["parameters"]
    assert (t["weights"], t["gradients"], t["master"], t["moments"], t["ema"]) == (2 * p, 4 * p, 2 * p, 4 * p, 2 * p)
    assert t["buckets"] == 4 * p and t["cuda_context"] == 0  # the whole fp32 gradient, flattened once
    assert r["phase"] == "step" and r["peak"] == r["phases"]["step"] > r["phases"]["eval"] > r["phases"]["build"]
    gpu = rank_peak("coatnet-2", 64, 2, 2, 2, device="cuda", num_classes=4)
    # on a GPU the two bf16 reduce buckets (deepspeed.bucket_elements = 5e7) are allocated whole, plus one
    # bucket's fp32 cast for the fp32 reduction, and the context is counted
    assert gpu["terms"]["buckets"] == (2 * 2 + 4) * 50_000_000 and gpu["terms"]["cuda_context"] > 0
    z2 = rank_peak("coatnet-2", 64, 2, 2, 2, device="cpu", num_classes=4)
    t2 = z2["terms"]
    # ZeRO-2 frees its fp32 gradient partition at the end of each step: a save does not hold it
    assert z2["phases"]["save"] == t2["weights"] + t2["master"] + t2["moments"] + t2["ema"]
    assert z2["phases"]["step"] - z2["phases"]["save"] >= t2["gradients"] == 4 * p // 2
    assert t2["buckets"] == 10_000_000 * (2 + 4)  # a CPU's default bucket: one bf16 copy (no overlap_comm) + fp32
    small = rank_peak("coatnet-2", 64, 2, 2, 2, device="cpu", num_classes=4,
                      overrides=("precision=bf16", "deepspeed.bucket_elements=1000",
                                 "deepspeed.communication_dtype=bf16"))
    assert small["terms"]["buckets"] == 1000 * 2  # a bf16 reduction needs no cast


C7_224 = "configs/pretrain/jft_coatnet-7.yaml"


@pytest.mark.parametrize("nodes", [8, 16])
def test_coatnet7_plan_counts_communication_and_prefers_zero2_when_zero1_waits(nodes):
    """Ring collectives, P = 2.53e9 (CoAtNet-7, 30K classes), N GPUs: ZeRO-1's BF16_Optimizer all-reduces the fp32
    gradient after backward, 2 (N-1)/N x 4P bytes sent per GPU (19.9 GB), not overlapped: ~0.5 s at 320 Gb/s
    (40 GB/s), against ~0.44 s (8x8) / 0.22 s (16x8) of compute at MFU 0.4 for 4096 / N images of 2.75 TFLOP.
    ZeRO-2 reduce-scatters half of that in backward; both all-gather the 16-bit weights after the step."""
    cmd = [sys.executable, "-m", "launch.plan", "--config", C7_224, "--nodes", str(nodes), "--gpus-per-node", "8",
           "--gpu-mem-gb", "80"]
    table = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    res = subprocess.run(cmd + ["--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and res.returncode == 0, table.stderr[-3000:] + res.stderr[-3000:]
    r = json.loads(res.stdout)
    gpus, params = 8 * nodes, r["parameters"]
    ring = (gpus - 1) / gpus
    zero1, zero2 = _row(r, 1), _row(r, 2)
    assert zero1["comm_gb"] == pytest.approx(ring * params * (2 * 4 + 2) / 1e9, rel=1e-3)
    assert zero2["comm_gb"] == pytest.approx(ring * params * (4 + 2) / 1e9, rel=1e-3)
    assert zero1["exposed_s"] == pytest.approx(zero1["comm_s"]) and zero1["comm_s"] == pytest.approx(
        zero1["comm_gb"] * 1e9 / 40e9, rel=1e-3)  # nothing of it overlapped
    assert zero2["exposed_s"] < zero2["comm_s"]    # the reduce-scatter hides (partly) behind backward
    compute = 4096 / gpus * r["train_flops_per_image"] / (989e12 * 0.4)
    assert zero1["compute_s"] == pytest.approx(compute, rel=1e-6)
    assert r["chosen"]["zero_stage"] == 2 and zero1["fits"] and zero1["comm_bound"]
    assert r["choice"].startswith("ZeRO-2 over ZeRO-1")
    out = table.stdout
    assert "why: ZeRO-2 over ZeRO-1" in out and "communication per step:" in out and "s of compute" in out
    # The run's time counts the chosen setting's communication that compute does not hide, every step.
    assert r["exposed_hours"] == pytest.approx(r["total_steps"] * r["chosen"]["exposed_s"] / 3600, rel=1e-6)
    assert r["exposed_hours"] > 0 and "+ communication not hidden by compute:" in out


def test_a_fast_network_keeps_the_lowest_stage_and_gpu_products_have_their_peaks():
    cfg = load_config(C7_224, [])
    fast = plan(cfg, 8, 8, 80, net_gbps=1e6)  # communication ~free: nothing is comm-bound
    assert fast["chosen"]["zero_stage"] == 1 and not fast["chosen"]["comm_bound"]
    assert "first fitting setting" in fast["choice"]
    assert peak_tflops_for_name("NVIDIA H100 PCIe") == 756 and peak_tflops_for_name("NVIDIA H100 NVL") == 835
    assert peak_tflops_for_name("NVIDIA H100 80GB HBM3") == 989 and peak_tflops_for_name("NVIDIA H200 NVL") == 835


def _pow2(n):
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("nodes", [8, 16])
def test_coatnet7_offload_host_memory_follows_the_rank_partition_not_deepspeeds_estimator(nodes):
    """ZeRO-2 + optimizer offload, CoAtNet-7 (P = 2.53e9), 8 GPUs per node, N = 8 x nodes: each rank keeps in host
    memory its 1/N partition: fp32 master 4 + fp32 gradient 4 + Adam moments 8 + a 16-bit copy 2 = 18 B x P / N,
    plus a 16-bit staging buffer of the largest parameter; the pinned ones (all but the moments) rounded up to a power
    of two by PyTorch's pinned allocator (the recipe pretrains without EMA: no fragment beside it). 8x8: 8 x (0.71 GB
    + 0.18 GB staging of the 92M-parameter head + rounding) = 9.4 GiB. DeepSpeed's estimator counts 4 B x P for every GPU of the cluster on each node (x 1.5): 905 GiB at
    8x8, twice that at 16x8. Measured against benchmarks/memory_scale.py --offload in tests/test_memory_scale.py."""
    cfg = load_config(C7_224, [])
    r = plan(cfg, nodes, 8, 80, cpu_mem_gb=128)  # a 128 GiB node: the estimator refused offload
    gpus, params = 8 * nodes, r["parameters"]
    part = -(-params // gpus)
    staging = 2 * r["largest_layer_parameters"]
    rank = _pow2(4 * part) * 2 + _pow2(2 * part) + _pow2(staging) + 8 * part
    assert cfg.train.ema_decay == 0
    expected = 8 * rank
    row = _row(r, 2, offload=True)
    assert row["cpu_per_node_gib"] * GIB == pytest.approx(expected, rel=1e-3)
    assert 8 * (18 * params / gpus + staging) < row["cpu_per_node_gib"] * GIB < 8 * 2 * (18 * params / gpus + staging)
    assert row["fits"], "the offload setting fits a 128 GiB node: each rank holds only its partition"
    estimator = params * 4 * gpus * 1.5
    note = r["offload_note"]
    assert note.startswith(f"host memory per node for offload: {row['cpu_per_node_gib']:.1f} GiB (measured model; ")
    assert f"DeepSpeed's estimator says {estimator / GIB:.1f} GiB" in note and f"cluster's {gpus} GPUs" in note
    assert note in format_table(r)
    # the plan's choice is unchanged: no offload fits the GPUs
    assert not r["chosen"]["offload_optimizer"]


def test_async_checkpoint_staging_is_counted_in_host_memory():
    from launch.model_states import ZeroSetting, staging_bytes

    p = 10 ** 9
    # ZeRO-2 on 64 GPUs, bf16: fp32 master + moments partitioned (12/64), the whole 16-bit model (rank 0), EMA 4/64
    assert staging_bytes(ZeroSetting(2), p, 64, "bf16", 0.9999) == 12 * p // 64 + 2 * p + 4 * p // 64
    assert staging_bytes(ZeroSetting(0), p, 1, "fp32", 0.0) == 16 * p
    assert staging_bytes(ZeroSetting(3), p, 64, "bf16", 0.0) == 12 * p // 64 + 2 * p // 64
    cfg = load_config(REPO / C0)
    sync = plan(cfg, nodes=1, gpus_per_node=8, gpu_mem_gb=80)
    both = plan(load_config(REPO / C0, ["checkpoint.async_save=true"]), nodes=1, gpus_per_node=8, gpu_mem_gb=80)
    a, b = sync["chosen"], both["chosen"]
    args = (ZeroSetting(b["zero_stage"]), both["parameters"], 8, both["precision"], cfg.train.ema_decay)
    rank0, other = staging_bytes(*args), staging_bytes(*args, rank0=False)
    assert other < rank0 and a["staging_gib"] == 0 and b["staging_gib"] * GIB == pytest.approx(rank0)
    assert (b["cpu_per_node_gib"] - a["cpu_per_node_gib"]) * GIB == pytest.approx(rank0 + 7 * other)
    assert "async checkpoint staging" in format_table({**both, "config": C0})
