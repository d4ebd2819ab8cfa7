"""Every GPU figure the project tracks, from one run on one GPU inside a fixed time budget.

Parts, most valuable first (each in its own try: a part that fails prints its error and the next one runs):

  trainer    the real trainer on the GPU (benchmarks/gpu_check_parts/trainer.py): bf16, deterministic=false, loader
             workers, N steps then save, resume from it, and N steps with model.compile; steps/s, host syncs
             per step under torch.cuda.set_sync_debug_mode("warn"), graph breaks and recompiles (TORCH_LOGS),
             the SDPA kernel each attention stage ran
  speed      training images/s of coatnet-0..3 against timm's same-size coatnet_N_224, same batch, bf16
             autocast, torch's fused AdamW, the two alternating round by round (benchmarks/model_speed.py);
             our parameters as the trainer holds them (contiguous: ZeRO needs that) against timm's own NCHW model;
             TFLOP/s and MFU of each (pipeline.train.flops against the device's bf16 peak; coatnet-3 at 224 px is
             the headline MFU)
  attention  forward + backward of relative attention at coatnet-3's own stage shapes (S3 14x14, 24 heads;
             S4 7x7, 48 heads at 224 px) for each kernel (sdpa, math, flex; model/attention.py): the fastest
  decode     images/s of the real training input pipeline (pipeline.data.loader, shards, RandAugment, <= 8
             workers) with data.decode=cpu and data.decode=gpu (nvJPEG and the augmentation on the GPU), against
             coatnet-3's training images/s from `speed`: does each keep up? (decode=gpu runs the batched
             augmentation, the next batch on a side stream.) Plus `augment`: one batch decoded + augmented on
             the device, batched (pipeline.data.batch_augment) vs the per-image reference, images/s each.
  memory     peak device memory of coatnet-3 training steps through the real DeepSpeed engine (ZeRO-2,
             bf16, the trainer's DeepSpeed config) against launch.plan.rank_peak's estimate of that step;
             with a plain torch step if DeepSpeed is not importable (then said so in the figures)
  compile    coatnet-3 training images/s eager vs torch.compile (inductor), if time is left for compiling

It prints one summary table last and writes every figure to OUT/gpu_check.json (--out, default $OUT or
runs/gpu_check) after every part, so a run cut short keeps the figures of the parts that finished.
--budget-s (default 360) bounds the whole run: a part starts only if its minimum time is left, and loops stop
early when the budget runs out, so with a machine's start it ends well inside half of a 15-minute device
lease, leaving time for a second try.
--tiny is a CPU smoke run of every part (tiny model, few iterations, under a minute; tests/test_gpu_check.py).

On the lent H100/H200 (torch 2.11, torchvision 0.26 and timm are there; DeepSpeed, webdataset and their small
dependencies are not, and Ray, which makes shards, is too large to carry), prepare here once, in the repo root:

    echo /.whl/ >> .git/info/exclude; echo /.gpucheck/ >> .git/info/exclude
    .venv/bin/pip wheel --no-deps -w .whl deepspeed==0.19.8      # PyPI has an sdist only: a pure-Python wheel
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \\
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    .venv/bin/python benchmarks/gpu_check.py --make-shards .gpucheck/shards   # 8 classes x 128 JPEGs, 256 px

(typing_extensions: the version pydantic 2.14 was tested with here, in place of the image's; the rest the
trainer imports, py-cpuinfo, msgpack, ninja, einops, safetensors, tensorboard, psutil, PyYAML and tqdm, is in
the image: /work/.library/device/KINDS.md.) Then the device call (tool `run`, carry [".whl",
".gpucheck"], timeout_s 420: the 360 s budget, the install and the final summary):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --shards .gpucheck/shards --out $OUT

A second try, if the first was cut: the same call with `--only` naming the parts whose figures are missing
from the first call's gpu_check.json.

or, on any CUDA machine with the project's venv: `make gpu-check` (shards are made on the spot when Ray is
installed, else pass --shards).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from model import channels_last_default, count_macs, create_model, get_config, prepare_for_speed  # noqa: E402
from pipeline.train.flops import device_peak_tflops, tflops_per_device, train_flops_per_image, utilization  # noqa: E402
from gpu_check_parts.report import summary  # noqa: E402

PARTS = ("trainer", "speed", "memory", "attention", "decode", "compile")
MIN_S = {"trainer": 90, "speed": 50, "attention": 20, "decode": 30, "memory": 30, "compile": 120}  # needed to start


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def settings(tiny: bool, device: torch.device) -> dict:
    """Sizes of each part: the full GPU run, or the CPU smoke run (--tiny)."""
    if tiny:
        return {"tiny": True, "models": [("coatnet-tiny", None)], "headline": "coatnet-tiny", "size": 64,
                "batch": 4, "steps": 1, "rounds": 2, "attn_repeats": 1, "attn_batch": 2, "loader_batches": 4,
                "loader_batch": 8, "workers": 1, "memory_batch": 4, "memory_steps": 1, "trainer_model": "coatnet-nano",
                "trainer_size": 32, "trainer_batch": 4, "trainer_steps": 4, "trainer_min_s": 5}
    return {"tiny": False, "models": [(f"coatnet-{n}", f"coatnet_{n}_224") for n in range(4)], "headline": "coatnet-3",
            "size": 224, "batch": 64, "steps": 5, "rounds": 3, "attn_repeats": 5, "attn_batch": 64,
            "loader_batches": 30, "loader_batch": 64, "workers": min(8, os.cpu_count() or 1),
            "memory_batch": 64, "memory_steps": 3, "trainer_model": "coatnet-3", "trainer_size": 224,
            "trainer_batch": 64, "trainer_steps": 30, "trainer_min_s": 30}


def ours(name: str, size: int, device: torch.device, weights: bool = True):
    """Our model as the trainer runs it (channels-last activations where that is the default); `weights=False`
    keeps the parameters contiguous, as DeepSpeed needs them (pipeline.train.build)."""
    model = create_model(name, num_classes=1000, image_size=size)
    prepare_for_speed(model, channels_last_default(device.type, "bf16"), weights=weights)
    return model


# ---------------------------------------------------------------------------------------------- parts
def part_speed(s: dict, device, budget: Budget) -> dict:
    from model_speed import side_by_side

    try:
        import timm
    except ImportError:
        timm = None
    if s["tiny"]:
        timm = None  # CI has no timm, and a timm model of the same size does not exist
    out = {}
    peak = device_peak_tflops(device)
    images = torch.randn(s["batch"], 3, s["size"], s["size"], device=device)
    labels = torch.randint(0, 1000, (s["batch"],), device=device)
    for name, timm_name in s["models"]:
        if budget.left() < 20:
            out[name] = {"skipped": "time budget"}
            continue
        models = {"ours": ours(name, s["size"], device, weights=False)}  # as the trainer holds them
        if timm is not None:
            models["timm"] = timm.create_model(timm_name, num_classes=1000, img_size=s["size"])
        rates = side_by_side(models, images, labels, s["steps"], s["rounds"], torch.bfloat16, device)
        flops = train_flops_per_image(count_macs(name, (s["size"], s["size"]))).model
        row = {"ours_images_per_s": rates["ours"], "batch": s["batch"], "size": s["size"],
               "ours_tflops": tflops_per_device(rates["ours"], flops, 1),
               "mfu": utilization(rates["ours"], flops, 1, peak) if peak else None}
        if "timm" in rates:
            row.update(timm_model=f"timm {timm.__version__} {timm_name}", timm_images_per_s=rates["timm"],
                       ratio_ours_timm=rates["ours"] / rates["timm"])
        else:
            row["timm_model"] = "none (--tiny)" if s["tiny"] else "timm not installed"
        out[name] = row
        print(f"  speed {name}: {row}", flush=True)
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["peak_tflops"] = peak
    return out


def part_attention(s: dict, device, budget: Budget) -> dict:
    from model import attention
    from model_speed import attention_kernels, time_attention

    cfg = get_config(s["headline"])
    out = {}
    kernels = attention_kernels(device)
    try:
        for stage, stride in ((3, 16), (4, 32)):
            (_, _, dim), = [seg for seg in cfg.stages[stage - 1] if seg[0] == "T"][-1:]
            heads, side = dim // cfg.head_dim, s["size"] // stride
            shape = f"S{stage} {side}x{side} heads {heads} batch {s['attn_batch']}"
            times = {}
            for name, kernel in kernels.items():
                if budget.left() < 10:
                    times[name] = "skipped: time budget"
                    continue
                try:
                    kernel_s, saved = time_attention(kernel, s["attn_batch"], heads, side, torch.bfloat16, device,
                                                     s["attn_repeats"] + 1, cfg.head_dim)  # the first compiles flex
                    times[name] = {"ms": kernel_s * 1e3, "saved_mib": saved / 2**20}
                except Exception as err:  # one kernel failing (flex on an old triton) leaves the others
                    times[name] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            timed = {k: v["ms"] for k, v in times.items() if isinstance(v, dict) and k != "torch-sdpa(old)"}
            out[shape] = {"kernels": times, "fastest": min(timed, key=timed.get) if timed else None}
            print(f"  attention {shape}: {out[shape]}", flush=True)
    finally:
        attention.set_attention_impl("auto")
    return out


def make_shards(root: Path, classes: int, per_class: int, size: int) -> Path:
    """Shards from generated JPEGs through data_prep (which needs Ray: make them where Ray is)."""
    from loader_speed import make_data

    return make_data(root, classes, per_class, size)[1]


def part_decode(s: dict, device, budget: Budget, shards: Path | None, speed: dict) -> dict:
    """The input pipeline with data.decode=cpu and =gpu, each against the headline model's training rate."""
    out = {}
    for decode in ("cpu", "gpu"):
        if decode == "gpu" and device.type != "cuda":
            out[decode] = {"skipped": "data.decode=gpu needs a CUDA device"}
            continue
        if budget.left() < 15:
            out[decode] = {"skipped": "time budget"}
            continue
        try:
            out[decode] = part_loader(s, device, budget, shards, speed, decode)
        except Exception as err:  # nvJPEG missing leaves the cpu figure
            out[decode] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"  decode {decode}: {out[decode]}", flush=True)
    if shards is not None and budget.left() >= 15:
        try:
            out["augment"] = augment_batched_vs_per_image(s, device, shards)
        except Exception as err:
            out["augment"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"  decode augment: {out['augment']}", flush=True)
    return out


def augment_batched_vs_per_image(s: dict, device, shards: Path) -> dict:
    """decode=gpu's decode + augmentation of one loader batch on `device`: batched (what the loader runs) vs
    the per-image reference it replaced, images/s each (median of 3, synchronised)."""
    import webdataset as wds
    from pipeline.data.batch_augment import BatchedTrainAugment
    from pipeline.data.device_augment import augment_on_device, device_train_transform

    urls = [str(p) for p in sorted(Path(shards).glob("train-*.tar"))]
    jpegs = [sample["jpg"] for sample, _ in zip(wds.WebDataset(urls, shardshuffle=False, empty_check=False),
                                                  range(s["loader_batch"]))]
    seeds = list(range(len(jpegs)))
    out = {"batch": len(jpegs), "size": s["size"]}
    for name, transform in (("per_image", device_train_transform(s["size"])),
                            ("batched", BatchedTrainAugment(s["size"]))):
        augment_on_device(jpegs, seeds, device, transform)  # warm-up (nvJPEG handles, kernels)
        times = []
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            augment_on_device(jpegs, seeds, device, transform)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[f"{name}_images_per_s"] = len(jpegs) / sorted(times)[1]
    return out


def part_loader(s: dict, device, budget: Budget, shards: Path | None, speed: dict, decode: str = "cpu") -> dict:
    from loader_speed import measure
    from pipeline.config import load_config
    from pipeline.data.loader import build_train_loader
    from pipeline.data.shards import open_shards

    workers = s["workers"]
    cfg = load_config(None, [f"data.train={shards}", "data.val=null", f"data.image_size={s['size']}",
                             f"data.num_workers={workers}", f"train.micro_batch_size={s['loader_batch']}",
                             f"data.decode={decode}",
                             f"train.global_batch_size={s['loader_batch']}", "train.steps=1000"])
    split = open_shards(cfg.data.train, cfg.data.train_split)

    def make_iterator():
        loader = build_train_loader(cfg, split, 0, 1, len(split.classes or []) or 1000, state=None,
                                    pin_memory=device.type == "cuda", device=device)
        return iter(loader), loader.close

    wall, per_cpu = measure(make_iterator, s["loader_batches"])
    out = {"workers": workers, "batch": s["loader_batch"], "images_per_s": wall, "images_per_cpu_s": per_cpu}
    need = speed.get(s["headline"], {}).get("ours_images_per_s") if isinstance(speed, dict) else None
    out["model_images_per_s"] = need
    out["sustains"] = None if need is None else wall >= need
    out["cpu_cores"] = os.cpu_count()
    return out


def part_memory(s: dict, device, budget: Budget) -> dict:
    from launch.plan import rank_peak

    name, size, micro = s["headline"], s["size"], s["memory_batch"]
    estimate = rank_peak(name, size, micro, ranks=1, zero_stage=2, device=device.type, num_classes=1000,
                         ema=False, precision="bf16")
    est_step = estimate["phases"]["step"] - estimate["terms"]["cuda_context"]  # the allocator's share
    out = {"model": name, "micro_batch": micro, "estimate_step_gib": est_step / 2**30,
           "estimate_terms_gib": {k: v / 2**30 for k, v in estimate["terms"].items() if k != "parameters"}}
    model = ours(name, size, device, weights=False).to(device)
    images = torch.randn(micro, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (micro,), device=device)
    try:
        engine = _deepspeed_engine(model, micro, device)
        out["measured_with"] = "DeepSpeed ZeRO-2 bf16 engine (the trainer's config)"
    except ImportError as err:
        engine = None
        out["measured_with"] = f"plain torch AdamW step, bf16 autocast (DeepSpeed not importable: {err})"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(s["memory_steps"]):
        if engine is not None:
            loss = F.cross_entropy(engine(images.to(torch.bfloat16)).float(), labels)
            engine.backward(loss)
            engine.step()
        else:
            _plain_step(model, images, labels, out)
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["measured_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["measured_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        out["measured_over_estimate"] = out["measured_peak_reserved_gib"] / out["estimate_step_gib"]
    else:
        out["measured_peak_allocated_gib"] = None  # no device-memory counter on CPU
    return out


def _deepspeed_engine(model, micro: int, device):
    import deepspeed

    from model import param_groups
    from pipeline.runtime import distributed as D
    from pipeline.config import load_config
    from pipeline.train.optim import deepspeed_config

    D.setup(deterministic=False)
    cfg = load_config(None, [f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}",
                             "precision=bf16", "deepspeed.zero_stage=2"])
    ds_config = deepspeed_config(cfg, 1, on_cpu=device.type == "cpu", load_universal=False)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05), config=ds_config)
    return engine


def _plain_step(model, images, labels, out):
    if "_opt" not in out:
        out["_opt"] = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=images.device.type == "cuda" or None)
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    out["_opt"].step()
    out["_opt"].zero_grad(set_to_none=True)


def part_compile(s: dict, device, budget: Budget) -> dict:
    from model_speed import side_by_side

    name = s["headline"]
    eager = ours(name, s["size"], device)
    compiled = ours(name, s["size"], device)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(backend="inductor" if device.type == "cuda" else "aot_eager")
    images = torch.randn(s["batch"], 3, s["size"], s["size"], device=device)
    labels = torch.randint(0, 1000, (s["batch"],), device=device)
    start = time.monotonic()
    rates = side_by_side({"eager": eager, "compiled": compiled}, images, labels, s["steps"], s["rounds"],
                         torch.bfloat16, device)
    return {"model": name, "eager_images_per_s": rates["eager"], "compiled_images_per_s": rates["compiled"],
            "speedup": rates["compiled"] / rates["eager"], "seconds_incl_compile": time.monotonic() - start,
            "backend": "inductor" if device.type == "cuda" else "aot_eager"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"))
    parser.add_argument("--budget-s", type=float, default=360.0)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of every part (tiny model, < 1 min)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--shards", type=Path, help="shard folder for the trainer and decode parts (else made "
                                                    "with data_prep, which needs Ray)")
    parser.add_argument("--make-shards", type=Path, metavar="DIR",
                        help="only write the loader's shards (8 classes x 128 JPEGs of 256 px) into DIR, and exit")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.make_shards:
        made = make_shards(args.make_shards, 8, 128, 256)
        print(f"shards in {made}")
        return 0
    started, budget = time.monotonic(), Budget(args.budget_s)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    s = settings(args.tiny, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    results: dict = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "budget_s": args.budget_s,
                     "settings": s}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    work = tempfile.TemporaryDirectory()  # checkpoints and made shards: never under --out, which comes back
    shards = [args.shards]

    def data() -> Path:
        if shards[0] is None:
            shards[0] = make_shards(Path(work.name) / "data", 8, 16 if s["size"] <= 64 else 128, max(64, s["size"] + 32))
        return shards[0]

    for part in [p for p in PARTS if p in args.only]:
        if budget.left() < (5 if args.tiny else MIN_S[part]):
            results[part] = {"skipped": f"time budget ({budget.left():.0f} s left, needs {MIN_S[part]})"}
            print(f"[{part}] skipped: time budget", flush=True)
            continue
        print(f"[{part}] ... ({budget.left():.0f} s left)", flush=True)
        t0 = time.monotonic()
        try:
            if part == "decode":
                results[part] = part_decode(s, device, budget, data(), results.get("speed", {}))
            elif part == "trainer":
                from gpu_check_parts.trainer import part_trainer
                results[part] = part_trainer(s, device, budget, data(), Path(work.name))
            else:
                results[part] = globals()[f"part_{part}"](s, device, budget)
            results[part].pop("_opt", None)
        except Exception as err:  # keep going: the other parts' figures still count
            results[part] = {"error": f"{type(err).__name__}: {err}"}
            print(f"[{part}] FAILED: {type(err).__name__}: {err}", flush=True)
            traceback.print_exc(limit=4)
        results[part]["seconds"] = round(time.monotonic() - t0, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["seconds"] = time.monotonic() - started
        write_json(path, results)  # after every part: a run killed later keeps these figures
    results["seconds"] = time.monotonic() - started
    write_json(path, results)
    work.cleanup()
    print(summary(results, s))
    print(f"figures: {path}")
    return 0


def write_json(path: str, results: dict) -> None:
    """Replace the figures file whole (a kill mid-write leaves the previous one, never half a file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
