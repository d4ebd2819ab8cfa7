"""The sharded EMA (pipeline.train.ema): per-rank fragments, fused update, fragment files, re-slicing, evaluation swap.

One real ZeRO-3 run on 2 CPU ranks (deepspeed launcher, bf16, coatnet-nano) with EMA decay 0.3 and a checkpoint
after every step is the reference: its fragment files add up to one copy of the model, the EMA that export
assembles equals the EMA recomputed from DeepSpeed's own consolidation of each step's fp32 master weights, a
same-world resume repeats its losses and EMA (while the reference evaluated with the EMA swapped in at a step
the resumed run did not evaluate), and a resume on one rank through a universal checkpoint continues the EMA.
Decay 0.3 makes the EMA differ from the weights (a resume that dropped it would show) while the initial weights,
which no checkpoint holds, weigh 0.3^6 < 1e-3 in the step-6 EMA.
A one-rank DeepSpeed process checks the arithmetic and the swap bit for bit under the BF16 optimizer and ZeRO-3.
"""
import json
import shutil
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.test_pipeline_train import REPO, _env, base_overrides, deepspeed_cmd, metrics, run

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

DECAY, STEPS = 0.3, 6


def tag(step: int) -> str:
    return f"step_{step:08d}"


def z3_overrides(shards, run_dir, **extra) -> list[str]:
    values = {"deepspeed.zero_stage": 3, "train.ema_decay": DECAY, "train.steps": STEPS, "checkpoint.every_steps": 1,
              "checkpoint.keep": 10, "train.eval_every": 5, **extra}
    return base_overrides(shards, run_dir, **values)


def consolidated(ckpt: Path, step: int) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag(step))


def exported(source: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    from pipeline import export as export_cli

    assert export_cli.main([str(source), str(out), "--ema"]) == 0
    return load_file(out / "model.safetensors")


def fragments(tag_dir: Path) -> list[torch.Tensor]:
    out = []
    for path in sorted(tag_dir.glob("ema_rank*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.append(f.get_tensor("fragments"))
    return out


@pytest.fixture(scope="module")
def zero3_run(demo_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ema_zero3") / "run"
    run(deepspeed_cmd(z3_overrides(demo_shards, run_dir)))
    return run_dir


@pytest.mark.slow
def test_zero3_fragments_are_one_copy_and_export_equals_the_consolidated_ema(zero3_run, tmp_path):
    from model import create_model
    from pipeline.weights.files import ema_fragment_files

    ckpt = zero3_run / "checkpoints"
    net = create_model("coatnet-nano", num_classes=4, image_size=32)
    params = dict(net.named_parameters())
    total = sum(p.numel() for p in params.values())
    files = ema_fragment_files(str(ckpt / tag(STEPS)))
    assert [f["rank"] for f in files] == [0, 1] and all(f["world_size"] == 2 and f["updates"] == STEPS for f in files)
    held = {}
    for f in files:  # each rank holds about half, together exactly one copy: every value once
        numel = sum(entry[2] for entry in f["index"])
        assert numel < 0.6 * total, (numel, total)
        for name, start, count, shape, _ in f["index"]:
            assert list(params[name].shape) == shape
            held.setdefault(name, []).append((start, count))
    assert sum(count for pieces in held.values() for _, count in pieces) == total
    for name, pieces in held.items():
        assert sorted(pieces)[0][0] == 0 and sum(c for _, c in pieces) == params[name].numel(), name
    marker = json.loads((ckpt / tag(STEPS) / "complete.json").read_text())
    assert {"ema_rank00000.safetensors", "ema_rank00001.safetensors"} <= set(marker["files"])  # checksummed
    client = torch.load(ckpt / tag(STEPS) / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    assert client["ema"]["format"] == "coatnet-ema-fragments/1" and client["ema_updates"] == STEPS

    # The EMA recomputed from DeepSpeed's consolidation of every step's fp32 master weights (from step 1's).
    reference = consolidated(ckpt, 1)
    for step in range(2, STEPS + 1):
        weights = consolidated(ckpt, step)
        reference = {k: DECAY * reference[k] + (1 - DECAY) * weights[k] for k in params}
    ema = exported(zero3_run, tmp_path / "export")
    net.load_state_dict(ema, strict=True)
    for key in params:
        torch.testing.assert_close(ema[key], reference[key], rtol=0, atol=1e-5, msg=key)
    assert max((ema[k] - weights[k]).abs().max().item() for k in params) > 3e-5  # the EMA is not the weights

    _, evals = metrics(zero3_run)  # evaluation with the EMA swapped into the ZeRO-3 engine, on both ranks
    assert [e["step"] for e in evals] == [5, STEPS]
    assert all(e["eval/count"] == 32 and e["eval_ema/count"] == 32 for e in evals)


@pytest.mark.slow
def test_zero3_resume_continues_losses_and_ema_exactly(zero3_run, demo_shards, tmp_path):
    """Resumed from step 4 without evaluation: the reference evaluated with the EMA swapped in at step 5, so
    equal step-6 losses also show the swap gave the trained weights back exactly."""
    run_dir = tmp_path / "run"
    shutil.copytree(zero3_run, run_dir)
    for step in (5, 6):
        shutil.rmtree(run_dir / "checkpoints" / tag(step))
    res = run(deepspeed_cmd(z3_overrides(demo_shards, run_dir, **{"data.val": None})))
    assert "at step 4" in res.stdout + res.stderr
    reference, resumed = metrics(zero3_run)[0], metrics(run_dir)[0]
    for step in (5, 6):
        assert abs(resumed[step]["loss"] - reference[step]["loss"]) <= 1e-6, (step, resumed[step], reference[step])
    for ours, theirs in zip(fragments(run_dir / "checkpoints" / tag(STEPS)),
                            fragments(zero3_run / "checkpoints" / tag(STEPS)), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_zero3_two_ranks_resume_on_one_rank_keeps_the_ema(zero3_run, demo_shards, tmp_path):
    """World size 2 -> 1 through a universal checkpoint: step 5's EMA is decay x step 4's EMA (the 2-rank
    fragments, re-sliced) + (1 - decay) x step 5's fp32 master weights."""
    run_dir = tmp_path / "run"
    shutil.copytree(zero3_run, run_dir)
    for step in (5, 6):
        shutil.rmtree(run_dir / "checkpoints" / tag(step))
    res = run([sys.executable, "-m", "pipeline.pretrain",
               *z3_overrides(demo_shards, run_dir, **{"data.val": None, "train.steps": 5})])
    out = res.stdout + res.stderr
    assert "universal" in out and "at step 4" in out and "extract" in out
    assert len(list((run_dir / "checkpoints" / tag(5)).glob("ema_rank*.safetensors"))) == 1
    before = exported(zero3_run / "checkpoints" / tag(4), tmp_path / "ema4")
    after = exported(run_dir / "checkpoints" / tag(5), tmp_path / "ema5")
    weights = consolidated(run_dir / "checkpoints", 5)
    for key, value in weights.items():
        if key in before and "running_" not in key and value.is_floating_point() and "num_batches" not in key:
            torch.testing.assert_close(after[key], DECAY * before[key] + (1 - DECAY) * value, rtol=0, atol=1e-6)
    step4 = consolidated(zero3_run / "checkpoints", 4)  # an EMA restarted from these would be this far off
    restarted = max((before[k] - step4[k]).abs().max().item() for k in step4 if "running_" not in k
                    and step4[k].is_floating_point())
    assert restarted > 1e-4


# One process, one rank, real DeepSpeed engines (BF16 optimizer: ZeRO-1 + fp32 accumulation; ZeRO-3): the fused
# update against the per-parameter formula on DeepSpeed's fp32 masters, the fragment file, re-slicing from a
# 3-rank layout, and the evaluation swap (module copies = EMA inside, bit-for-bit the trained ones after).
ONE_RANK = textwrap.dedent('''
    import json, os, socket, sys
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    out = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    import model
    from pipeline.train.ema import FORMAT, ShardedEMA
    from pipeline.weights.files import read_ema_fragments

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for stage in (1, 3):
        torch.manual_seed(stage)
        net = model.create_model("coatnet-tiny", num_classes=3, image_size=32)
        zero = {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
        data_types = {"buffer_dtype": "bf16", "grad_accum_dtype": "fp32"} if stage == 1 else {"buffer_dtype": "bf16"}
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": zero,
                  "bf16": {"enabled": True}, "data_types": data_types,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
        ema = ShardedEMA(engine.module, 0.5, optimizer=engine.optimizer)

        def master():
            return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in engine.module.named_parameters()}

        def module_copies():
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
                return {n: p.detach().clone() for n, p in engine.module.named_parameters()}

        expected = master()
        for _ in range(3):
            x, y = torch.randn(4, 3, 32, 32, dtype=torch.bfloat16), torch.randint(0, 3, (4,))
            engine.backward(F.cross_entropy(engine(x).float(), y))
            engine.step()
            ema.update()
            now = master()
            expected = {n: 0.5 * expected[n] + 0.5 * now[n] for n in expected}
        folder = os.path.join(out, f"zero{stage}")
        os.makedirs(folder)
        ema.save_fragments(folder)
        full = read_ema_fragments(folder)
        r = {"runs": ema.runs, "fragments": len(ema.fragments),
             "update_error": max((full[n] - expected[n]).abs().max().item() for n in expected),
             "buffers": sorted(k for k in full if k not in expected) == sorted(engine.module.state_dict().keys()
                                                                              - set(expected))}
        low, fp32 = module_copies(), master()
        with ema.swapped_in() as module:
            assert module is engine.module
            inside = module_copies()
        r["inside_is_ema"] = all(torch.equal(inside[n], full[n].to(inside[n].dtype)) for n in expected)
        r["restored"] = all(torch.equal(low[n], v) for n, v in module_copies().items()) and all(
            torch.equal(fp32[n], v) for n, v in master().items())
        r["ema_kept"] = all(torch.equal(read_ema_fragments(folder)[n], full[n]) for n in expected)

        # 3 ranks of another layout: every parameter flattened end to end, cut in 3 uneven contiguous pieces.
        names = list(expected)
        flat = torch.cat([full[n].flatten() for n in names])
        cuts = [0, flat.numel() // 5, flat.numel() * 3 // 5, flat.numel()]
        other = os.path.join(out, f"other{stage}")
        os.makedirs(other)
        for rank in range(3):
            lo, hi, index, offset = cuts[rank], cuts[rank + 1], [], 0
            for n in names:
                s = sum(full[m].numel() for m in names[:names.index(n)])
                a, b = max(lo, s), min(hi, s + full[n].numel())
                if a < b:
                    index.append([n, a - s, b - a, list(full[n].shape), offset])
                    offset += b - a
            buffers = {f"buffer/{k}": full[k] + rank for k in full if k not in expected and full[k].is_floating_point()}
            save_file({"fragments": flat[lo:hi].contiguous(), **buffers}, os.path.join(other, f"ema_rank{rank:05d}.safetensors"),
                      metadata={"format": FORMAT, "rank": str(rank), "world_size": "3", "updates": "7",
                                "index": json.dumps(index)})
        fresh = ShardedEMA(engine.module, 0.5, optimizer=engine.optimizer)
        fresh.load_fragments(other, 7)
        r["resliced"] = fresh.updates == 7 and torch.equal(fresh.flat, ema.flat) and all(
            torch.allclose(s, full[k] + 1) for k, s in fresh.buffer_shadow.items())
        results[stage] = r
        engine.destroy()
    print("RESULT " + json.dumps(results))
''')


@pytest.mark.slow
def test_one_rank_update_files_reslicing_and_evaluation_swap(tmp_path):
    proc = subprocess.run([sys.executable, "-c", ONE_RANK, str(tmp_path)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    for stage, r in results.items():
        assert r["update_error"] < 1e-6, (stage, r)  # fused lerp == the per-parameter formula on the fp32 masters
        assert r["runs"] == 1 < r["fragments"], (stage, r)  # one parameter group: one fused run
        assert r["buffers"] and r["inside_is_ema"] and r["restored"] and r["ema_kept"] and r["resliced"], (stage, r)


def test_loading_keeps_no_reference_to_what_was_loaded():
    """A checkpoint's full EMA (the pre-fragment format) is copied into the EMA and dropped from the client
    state: after the load nothing refers to the loaded tensors. Also on a plain module (no DeepSpeed)."""
    from pipeline.runtime.distributed import DistInfo
    from pipeline.train.ema import ShardedEMA
    from pipeline.train.state import TrainState

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = ShardedEMA(net, 0.5)
    assert ema.runs == 4 and ema.bytes_per_rank() == 4 * (15 + 3 + 3 + 3 + 3)  # weights, biases, BN stats
    loaded = {k: torch.full_like(v, 2.0) if v.is_floating_point() else v.clone() for k, v in net.state_dict().items()}
    refs = [weakref.ref(v) for v in loaded.values()]
    client = {"step": 3, "world_size": 2, "rng": {}, "data_state": {}, "ema": loaded, "ema_updates": 3}
    del loaded
    state = TrainState(0, DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo"), 4, 2, ema=ema)
    state.load_state_dict(client)
    assert client["ema"] is None and all(r() is None for r in refs)
    assert ema.updates == 3 and torch.equal(ema.flat, torch.full_like(ema.flat, 2.0))
    with torch.no_grad():
        net[0].weight.zero_()
    ema.update()  # fused: 0.5 x 2 + 0.5 x the new weights
    assert torch.equal(ema.views[[f.name for f in ema.fragments].index("0.weight")], torch.ones(12))
    with ema.swapped_in() as module:
        assert torch.equal(module[0].weight, torch.ones(3, 4))
    assert torch.equal(net[0].weight, torch.zeros(3, 4))


def test_ranks_wait_for_the_universal_conversion_by_marker_and_heartbeat(tmp_path):
    """The ranks other than 0 poll the conversion's marker (no collective with a timeout): done when it is
    there, an error naming rank 0's failure, or one when rank 0's heartbeat goes silent."""
    import os
    import threading
    import time

    from pipeline.checkpoint.layout import CheckpointInfo, write_marker
    from pipeline.checkpoint.checkpointer import _heartbeat, _universal_dir, conversion_workers, wait_for_universal
    from core.files import atomic_write_json

    info = CheckpointInfo(str(tmp_path), "step_00000004", 4, 2, 3, {})
    out = _universal_dir(info)
    os.makedirs(out)
    with pytest.raises(RuntimeError, match="no sign of life"):  # nothing ever started
        wait_for_universal(info, stale_after_s=0.3, poll_s=0.05)
    with _heartbeat(out + ".converting", every_s=0.05):  # alive and slower than the staleness limit: still waits
        threading.Timer(0.6, write_marker, (out, {"step": 4})).start()
        start = time.monotonic()
        wait_for_universal(info, stale_after_s=0.3, poll_s=0.05)
        assert time.monotonic() - start >= 0.5
    assert not os.path.exists(out + ".converting")
    os.remove(os.path.join(out, "complete.json"))
    atomic_write_json(out + ".failed", {"reason": "OSError: No space left on device"})
    with pytest.raises(RuntimeError, match="No space left on device"):
        wait_for_universal(info, stale_after_s=10, poll_s=0.05)
    extract, merge = conversion_workers(files=2)
    assert 1 <= extract <= 2 and 1 <= merge <= 8
