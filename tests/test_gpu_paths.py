"""GPU-only code paths, shown on CPU where the behaviour does not need a GPU (issue 21)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model
from pipeline.data.transforms import multi_hot
from pipeline.faults.step_guard import StepGuard, batchnorm_buffers
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("deterministic", [False, True])
def test_precision_setup_leaves_the_legacy_tf32_flags_readable(deterministic):
    # A fresh process: the flags are process-global. Inductor reads the legacy ones (pytorch#166387).
    code = textwrap.dedent(f"""
        import torch
        from pipeline.runtime.distributed import set_precision
        set_precision({deterministic})
        print(torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.fp32_precision)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = "highest False True none" if deterministic else "high True True tf32"
    assert out.stdout.split()[-4:] == expected.split()


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_multi_hot_scatters_without_data_dependent_shapes():
    labels = torch.tensor([[3, 0, -1], [-1, -1, -1], [4, 4, 1]])
    with _Ops() as ops:
        out = multi_hot(labels, 5)
    expected = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.float32)
    assert torch.equal(out, expected) and out.is_contiguous()
    # boolean-mask indexing lowers to nonzero, whose output size needs a device->host sync on GPUs
    assert not ops.seen & {"nonzero", "masked_select", "index", "index_put", "index_put_"}, ops.seen


def test_step_guard_snapshots_only_the_batchnorm_statistics():
    net = model.create_model("coatnet-tiny", num_classes=3, image_size=32)
    guard = StepGuard(max_bad_steps=3, spike_factor=0.0)
    guard.snapshot_buffers(net)
    saved = {id(live) for live, _ in guard._buffers}
    expected = batchnorm_buffers(net)
    assert saved == {id(b) for b in expected} and len(expected) > 0
    assert all(b.dtype != torch.int64 or b.dim() == 0 for b in expected)  # no relative-position index
    assert any(name.endswith("rel_pos.index") for name, _ in net.named_buffers())
    before = [b.clone() for b in expected]
    net.train()
    net(torch.randn(2, 3, 32, 32))  # a (bad) step's forward moves the statistics
    assert not all(torch.equal(a, b) for a, b in zip(before, expected))
    guard.restore_buffers()
    assert all(torch.equal(a, b) for a, b in zip(before, expected))


ZERO3_FLEX = textwrap.dedent('''
    import json, os, sys
    import deepspeed, torch
    import model
    from model import attention

    out = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    net = model.create_model("coatnet-tiny", num_classes=3, image_size=64)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("rel_pos.bias_table"):
                p.copy_(torch.randn_like(p))  # zero tables would hide a missing bias
    plain = model.create_model("coatnet-tiny", num_classes=3, image_size=64)
    plain.load_state_dict(net.state_dict())
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    assert all(p.numel() == 0 for n, p in engine.module.named_parameters() if n.endswith("bias_table"))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    engine.module.eval(); plain.eval()
    result = {}
    with torch.no_grad():
        for impl in ("flex", "sdpa"):  # flex first: before any forward has gathered the tables
            attention.set_attention_impl(impl)
            result[impl] = engine.module(images).tolist()
        attention.set_attention_impl("sdpa")
        result["plain"] = plain(images).tolist()
    if int(os.environ["RANK"]) == 0:
        with open(out, "w") as f:
            json.dump(result, f)
''')


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_under_zero3_gathers_its_table(tmp_path):
    """Two real ranks, ZeRO-3 partitions (empty tables), flex first: its evaluation forward equals sdpa's.
    Eager, DeepSpeed 0.19.8 would also gather a table read from outside the module's call (its ZeROOrderedDict
    registers an external parameter on access), so this passes with the old code too; the module call is what
    holds under torch.compile, where that getter hands back the partition as it is."""
    script, out = tmp_path / "zero3_flex.py", tmp_path / "zero3_flex.json"
    script.write_text(ZERO3_FLEX)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # ~1 min on 2 idle cores
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = {k: torch.tensor(v) for k, v in json.loads(out.read_text()).items()}
    assert torch.equal(result["sdpa"], result["plain"])
    torch.testing.assert_close(result["flex"], result["sdpa"], rtol=1e-4, atol=1e-5)


def test_zero3_persistence_threshold_is_deepspeeds_default_on_gpus():
    from pipeline.train.optim import deepspeed_config
    from tests.test_numerics import _cfg

    cfg = _cfg(**{"deepspeed.zero_stage": 3})
    gpu = deepspeed_config(cfg, world_size=8, on_cpu=False)["zero_optimization"]
    cpu = deepspeed_config(cfg, world_size=2, on_cpu=True)["zero_optimization"]
    assert "stage3_param_persistence_threshold" not in gpu  # DeepSpeed's 1e5: small tensors stay gathered
    assert cpu["stage3_param_persistence_threshold"] == 0   # the tiny CPU models are still partitioned


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_to_every_process_group_with_forkserver_workers_saves_and_resumes(demo_shards, tmp_path):
    """torchrun's SIGTERM reaches each rank's process group (it starts ranks in their own sessions and
    killpg's them), so the loader's forkserver and its workers get it too: they must hold it back while the
    ranks save. Two ranks, two forkserver workers each; signalled after a periodic save and three logged steps."""
    import signal

    from tests.test_faults import (assert_intact, complete_steps, kill_all, launch, logged_steps, overrides,
                                   ranks_of, run, torchrun, wait_for)

    run_dir = tmp_path / "run"
    ov = overrides(demo_shards, run_dir, **{"train.steps": 300, "data.num_workers": 2,
                                            "data.worker_start": "forkserver", "train.hang_timeout_s": 600})
    proc = launch(torchrun(ov))
    ranks = {}
    try:
        wait_for(lambda: 2 in complete_steps(run_dir) and logged_steps(run_dir) >= 3, proc, 400)
        ranks = ranks_of(proc.pid)
        groups = {os.getpgid(p.pid) for p in ranks.values()}
        workers = [c for p in ranks.values() for c in p.children(recursive=True)]
        assert len(workers) >= 2 * 3, [c.cmdline() for c in workers]  # a forkserver and 2 workers per rank
        for group in groups:  # what torchrun and slurmstepd do: the whole group of each rank at once
            os.killpg(group, signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        kill_all([*ranks.values(), proc])
    assert "SIGTERM: saved step" in out, out[-4000:]
    assert "DataLoader worker" not in out, out[-4000:]  # no worker died under the trainer
    assert_intact(run_dir)
    saved = complete_steps(run_dir)[-1]
    assert saved >= 3
    out = run(torchrun([*ov, f"train.steps={saved + 1}"]))
    assert f"at step {saved}" in out


FORKSERVER_WORKERS = textwrap.dedent('''
    import os, signal, sys, tempfile, time
    import psutil, torch
    from torch.utils.data import DataLoader, TensorDataset
    from pipeline.faults.watchdog import Watchdog

    if __name__ == "__main__":  # the forkserver imports this module too
        watchdog = Watchdog(tempfile.mkdtemp(), 0, 600, 30, orphan_check=False)  # as the trainer starts it
        loader = DataLoader(TensorDataset(torch.arange(64)), batch_size=4, num_workers=2, prefetch_factor=1,
                            multiprocessing_context="forkserver")
        it = iter(loader)
        seen = [next(it)[0]]
        workers = [psutil.Process(w.pid) for w in it._workers]
        forkserver = workers[0].parent()
        os.killpg(os.getpgid(0), signal.SIGTERM)  # what torchrun and slurmstepd do to a rank's process group
        time.sleep(1)
        alive = all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in [*workers, forkserver])
        seen += [batch[0] for batch in it]
        print("signalled", watchdog.signalled, "alive", alive, "batches", len(seen), flush=True)
''')


def test_forkserver_workers_outlive_a_process_group_sigterm(tmp_path):
    """The discriminating half of the test above: without the forkserver's shield its workers die of the
    group's SIGTERM, and the loader fails ("DataLoader worker ... exited unexpectedly") once the batches they
    had ready are used up; with it every batch still comes and the trainer's handler saw the signal."""
    script = tmp_path / "forkserver_workers.py"
    script.write_text(FORKSERVER_WORKERS)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "signalled True alive True batches 16" in proc.stdout, proc.stdout + proc.stderr[-2000:]
