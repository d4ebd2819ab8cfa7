"""Process-group set-up and the few collectives the trainer needs, the same under every launcher.

`python -m pipeline.pretrain` (one process), `deepspeed --num_gpus N` / `--hostfile`, and `torchrun` all end
up here: the launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, a bare process
gets a one-rank world on a free 127.0.0.1 port. DeepSpeed picks the backend for the accelerator (NCCL on
GPUs; gloo, or oneCCL when installed, with its CPU accelerator).
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import numpy as np
import torch

from core.errors import UserError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(deterministic: bool = True, timeout_s: Optional[float] = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed and return this process's place in the world.

    `timeout_s`: every collective's timeout (the trainer passes train.hang_timeout_s plus a minute, so its
    watchdog dumps the stacks first); DEEPSPEED_TIMEOUT (minutes) overrides it.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 0)) or 0)
    if not local_world:
        local_world = world if world <= (os.cpu_count() or 1) else 1

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # Fixed thread counts: CPU kernels split reductions by thread, so bit-exact reruns need the same split.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    set_precision(deterministic)
    if not torch.distributed.is_initialized():
        # A collective that waits longer than this is a hang (a frozen or dead peer). The one legitimately long
        # wait, the others waiting while rank 0 converts a checkpoint to a universal one, polls the conversion's
        # marker and heartbeat instead (pipeline.checkpoint.checkpointer.wait_for_universal).
        if "DEEPSPEED_TIMEOUT" in os.environ or timeout_s is None:
            timeout = timedelta(minutes=int(os.environ.get("DEEPSPEED_TIMEOUT", 60)))
        else:
            timeout = timedelta(seconds=timeout_s)
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False, timeout=timeout)
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    return DistInfo(rank, world, local_rank, local_world, device, accel.communication_backend_name())


def set_precision(deterministic: bool) -> None:
    """Deterministic kernels, or the fast ones (cuDNN autotuning, TF32 tensor cores) for `deterministic=false`.

    TF32 goes through the legacy setters on purpose: once torch's new `fp32_precision` API is set, every read
    of the legacy flags raises ("mix of the legacy and new APIs"), and inductor still reads them
    (pytorch#166387), so a compiled GPU run would die in compilation. Set the legacy way, both APIs read back.
    """
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode would also NaN-fill every torch.empty; ZeRO allocates large gradient buckets with
        # it on every hook (seconds per step on CPU) and overwrites them before use.
        from torch.utils import deterministic as torch_deterministic
        torch_deterministic.fill_uninitialized_memory = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed training shapes: pick the conv algorithms once
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True      # and convolutions


def teardown() -> None:
    """Destroy the process group: a process that leaves with it alive (e.g. after a user error on every
    rank) aborts in the collective library's threads at interpreter exit instead of exiting 2."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    from pipeline.runtime.cpu_shm import release_own_buffer

    release_own_buffer()  # DeepSpeed's CPU all-reduce segment: it never unlinks it (pipeline/runtime/cpu_shm.py)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64/int64 tensor over ranks (a copy; the input is left alone)."""
    out = values.clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        backend_device = _collective_device()
        moved = out.to(backend_device)
        torch.distributed.all_reduce(moved)
        out = moved.to(values.device)
    return out


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj):
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def raise_on_every_rank(is_main: bool, check: Callable[[], Optional[str]],
                        error: Callable[[str], Exception] = UserError,
                        catch: tuple[type[Exception], ...] = (UserError,)) -> None:
    """Run `check` (a problem as one line, or None; or it raises one of `catch`) on rank 0 only, and raise
    `error(problem)` on every rank: a folder's state is judged once (ranks on other nodes may see a shared folder
    at another moment), and no rank is left waiting in a collective while another one stops."""
    problem = None
    if is_main:
        try:
            problem = check()
        except catch as err:
            problem = str(err)
    problem = broadcast_object(problem)
    if problem:
        raise error(problem)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and accelerator) in a torch.load(weights_only)-safe form."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sync_batchnorm_stats(module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (before evaluation and checkpointing).

    Why not SyncBatchNorm: training-mode BN uses per-rank batch statistics either way for the loss; only
    the running estimates used at evaluation would drift apart between ranks, and one all-reduce of those
    buffers before they are used or saved makes every rank (and the checkpoint) agree, without a collective
    in every forward pass.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    world = torch.distributed.get_world_size()
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                if buf is None:
                    continue
                t = buf.detach().float().to(_collective_device())
                torch.distributed.all_reduce(t)
                buf.copy_((t / world).to(buf.device, buf.dtype))
