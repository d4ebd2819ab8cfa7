"""A training step that does not log, poll or save makes no host synchronisation of ours (issue 10).

On a GPU, reading a device tensor on the host (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`, `float(t)`, ...)
waits for every kernel queued before it: the CPU stops running ahead of the GPU, and the GPU idles while the
next step's first kernels are launched. CPU torch has no sync-debug mode, so this test counts the calls that
WOULD sync on a GPU: it wraps them (each still does its work: nothing is mocked) in a real one-rank
DeepSpeed bf16 ZeRO-2 run of the real trainer, attributes each call to the first frame outside torch (our
code, DeepSpeed or other), and checks that the steps which are not sync points have none from our code.

DeepSpeed's own calls are reported, not asserted: its ZeRO optimizer reads the overflow flag (and the
global gradient norm) on the host in every step (`python -m tests.test_no_sync OUT.json` prints them).
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = tuple(str(REPO / d) + os.sep for d in ("pipeline", "model", "core"))

# Tensor methods that copy device data to the host (a sync on a GPU). Tensor.to("cpu") is not wrapped: on the
# CPU test machine every tensor is on the CPU, so it cannot tell a device-to-host copy from a no-op.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "nonzero")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier",
               "reduce_scatter_tensor", "all_gather_into_tensor")


def overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    values = {"run_dir": str(run_dir), "data.train": str(shards), "data.val": None, "data.image_size": 32,
              "data.num_workers": 1, "data.shuffle_buffer": 64, "data.randaugment_layers": 0,
              "model.name": "coatnet-nano", "train.global_batch_size": 8, "train.micro_batch_size": 4,
              "train.steps": 12, "train.log_every": 6, "checkpoint.every_steps": 0, "deepspeed.zero_stage": 2,
              "precision": "bf16", "train.stop_check_s": 1e6, "train.hang_timeout_s": 600}
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


class SyncCounter:
    """Counts host reads and collectives per training step, by caller: ours, deepspeed or other."""

    def __init__(self):
        import torch

        self.torch_dir = os.path.dirname(torch.__file__) + os.sep
        self.step = 0
        self.reads: dict = collections.defaultdict(collections.Counter)        # step -> "who: what" -> n
        self.collectives: dict = collections.defaultdict(collections.Counter)  # step -> "who: what" -> n
        self.ours: dict = collections.defaultdict(list)                        # step -> ["file:line what"]
        self.where: dict = collections.defaultdict(collections.Counter)        # step -> "who file:line what" -> n
        self._busy = False

    def _caller(self) -> tuple[str, str]:
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith(self.torch_dir)
                                     or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        path = frame.f_code.co_filename if frame is not None else "?"
        where = f"{os.path.relpath(path, REPO)}:{frame.f_lineno if frame else 0}"
        who = "ours" if path.startswith(OURS) else "deepspeed" if f"{os.sep}deepspeed{os.sep}" in path else "other"
        return who, where

    def _note(self, table: dict, what: str) -> None:
        if self._busy:  # a wrapped call made inside our own bookkeeping
            return
        self._busy = True
        try:
            who, where = self._caller()
            table[self.step][f"{who}: {what}"] += 1
            if table is self.reads:
                self.where[self.step][f"{who} {where} {what}"] += 1
                if who == "ours":
                    self.ours[self.step].append(f"{where} {what}")
        finally:
            self._busy = False

    def install(self) -> None:
        import torch
        import torch.distributed as dist

        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def wrapped(self_tensor, *args, _original=original, _name=name, **kwargs):
                self._note(self.reads, _name)
                return _original(self_tensor, *args, **kwargs)
            setattr(torch.Tensor, name, wrapped)
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def wrapped_collective(*args, _original=original, _name=name, **kwargs):
                blocking = "" if kwargs.get("async_op") else " (async_op=False)"
                self._note(self.collectives, _name + blocking)
                return _original(*args, **kwargs)
            setattr(dist, name, wrapped_collective)

    def report(self) -> dict:
        return {"reads": {s: dict(c) for s, c in self.reads.items()},
                "collectives": {s: dict(c) for s, c in self.collectives.items()},
                "ours": dict(self.ours), "where": {s: dict(c) for s, c in self.where.items()}}


def probe(out_json: str, argv: list[str]) -> None:
    """Run the trainer with `argv` overrides, counting per step (a step runs from its train_step call to the
    next one: the trainer's work after the step, logging and polling included, belongs to it)."""
    counter = SyncCounter()
    counter.install()
    import pipeline.train.trainer as T
    from pipeline.config import load_config

    original = T.train_step

    def counted_step(engine, loader, criterion, accumulation, dtype, guard, step, *rest):
        counter.step = step
        return original(engine, loader, criterion, accumulation, dtype, guard, step, *rest)

    T.train_step = counted_step
    T.run(load_config(None, argv))
    Path(out_json).write_text(json.dumps(counter.report(), indent=1, sort_keys=True))


@pytest.mark.slow
@pytest.mark.timeout(600)  # the session's demo_shards fixture may be built inside it
@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_steps_between_sync_points_make_no_host_sync_of_ours(demo_shards, tmp_path):
    out = tmp_path / "syncs.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    res = subprocess.run([sys.executable, "-m", "tests.test_no_sync", str(out),
                          *overrides(demo_shards, tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    report = json.loads(out.read_text())
    ours = {int(s): calls for s, calls in report["ours"].items()}
    # Sync points: steps 1 and 2 poll for a stop (the step time is measured there), 6 and 12 log, 12 is the
    # last (final save). Every other step must make no host read of ours.
    plain = [3, 4, 5, 7, 8, 9, 10, 11]
    assert {s: ours.get(s) for s in plain if ours.get(s)} == {}, ours
    assert ours.get(6) and ours.get(12), ours  # the counter sees our reads where they are expected
    # The guard's one small all-reduce per step; a 1-rank world makes no collective call at all.
    collectives = {int(s): c for s, c in report["collectives"].items()}
    assert not any(k.startswith("ours") for s in plain for k in collectives.get(s, {})), collectives
    deepspeed = {k: n for k, n in report["where"]["5"].items() if k.startswith("deepspeed")}
    print(f"host reads in plain step 5: ours 0, DeepSpeed {sum(deepspeed.values())}: {deepspeed}")


def _guard_step(guard, step: int, loss: float):
    """One step through the guard as train_step drives it (one rank, no process group): verdict, then note.
    A bad step's NaN gradients make DeepSpeed skip it, which is what `applied` says here."""
    import torch

    loss_t = torch.tensor(loss)
    _, mean, bad = guard.verdict(loss_t, [loss_t])
    applied = bool(torch.isfinite(mean)) and not bool(bad)  # the test reads it; DeepSpeed's flag in a run
    guard.note(step, mean, bad, applied)
    return applied


def test_guard_decides_on_the_device_and_reads_out_in_step_order():
    from pipeline.faults.step_guard import MIN_HISTORY, StepGuard

    guard = StepGuard(max_bad_steps=2, spike_factor=10.0)
    for step in range(1, MIN_HISTORY + 1):
        assert _guard_step(guard, step, 1.0)
    assert not _guard_step(guard, 11, 50.0)              # a spike: 50 > 10 x mean 1.0, decided without the host
    assert _guard_step(guard, 12, 1.0)
    assert guard.bad_total == 0 and not guard.losses      # nothing read yet
    assert guard.readout() and "loss spike at step 11" in guard.rollback_reason
    assert len(guard.losses) == MIN_HISTORY and guard.bad_total == 1
    guard.no_checkpoint()                                 # a spike without a checkpoint carries on ...
    assert not guard.readout() and guard.losses[-1] == (12, 1.0)  # ... and step 12, queued behind it, is read
    assert not _guard_step(guard, 13, float("nan")) and not _guard_step(guard, 14, float("nan"))
    assert _guard_step(guard, 15, 1.0)
    assert guard.readout() and guard.rollback_reason.startswith("2 bad steps in a row (steps 13-14)")
    guard.rolled_back(to_step=12, samples_per_step=8)     # step 15, read after the request, is dropped
    assert guard.skip_steps == {13, 14} and guard._pending == [] and guard._filled == MIN_HISTORY + 1


if __name__ == "__main__":
    probe(sys.argv[1], sys.argv[2:])
