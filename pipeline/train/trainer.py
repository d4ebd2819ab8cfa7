"""The training loop shared by pretraining and fine-tuning: DeepSpeed engine, streaming data, exact resume.

    cfg = load_config("configs/demo/pretrain.yaml"); summary = run(cfg)

The recipe, top to bottom in `run`: check the config against the data (user mistakes before any process
group), build the model, the DeepSpeed engine, the EMA and the training state, restore the newest complete
checkpoint (pipeline.checkpoint.checkpointer; through a universal checkpoint after a world-size change), build the data
loader from the restored positions, then loop: step, log, evaluate, maybe save.

One optimizer step = `accumulation` micro-batches per rank (global = micro x world x accumulation). The
step's loss is the mean of its micro-batch losses, averaged over ranks when logged. Everything random (data
order, augmentation, stochastic depth) is restored or re-derived (pipeline.train.state), so a resumed run
repeats the losses of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from core.errors import UserError
from core.files import atomic_write_json
from core.units import precision_dtype
from pipeline.runtime import distributed as D
from pipeline.checkpoint.layout import FINISHED
from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.checkpoint.trust import require_key
from pipeline.config import Config, save_config
from pipeline.data.shards import ShardSet, open_shards
from pipeline.data.sources import describe, open_train, source_line
from pipeline.data.corrupt import check_corrupt_fraction
from pipeline.data.loader import build_train_loader, multi_hot_targets
from pipeline.train.build import build_engine, build_model
from pipeline.train.ema import build_ema
from pipeline.evaluation.periodic import Evaluator
from pipeline.faults.step_guard import StepGuard
from pipeline.faults.watchdog import EXIT_TERMINATED, StopPoll, collective_timeout_s, start as start_watchdog
from pipeline.train.state import TrainState, check_config_change
from pipeline.train.profiling import RankTimes

log = logging.getLogger("pipeline.train")

# A file in run_dir that asks the trainer to save a checkpoint at the next step and stop (a preemption
# notice: launch/slurm/pretrain.sbatch touches it on SIGUSR1, a user may too).
SAVE_REQUEST = ".save_now"


@dataclass
class RunPlan:
    """What the config and the train split fix before any process exists: classes, batches, step counts."""
    shards: ShardSet
    num_classes: int
    classes: Optional[list]
    accumulation: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    macs_per_image: int


def plan_run(cfg: Config) -> RunPlan:
    """Check the config against the data: one UserError line, on every rank alike, before anything starts."""
    from model import count_macs

    accumulation = _check_batches(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    shards = open_train(cfg.data.train, cfg.data.train_split)  # one folder, or a mixture's sources as one
    multi_hot_targets(cfg, shards)  # softmax on a multi-label split: one line, before any process group
    if cfg.data.val:
        open_shards(cfg.data.val, cfg.data.val_split)  # a wrong val path fails now, not after hours of training
    num_classes = _num_classes(cfg, shards)
    classes = shards.classes if shards.classes and len(shards.classes) == num_classes else None
    global_batch = cfg.train.global_batch_size
    steps_per_epoch = max(1, shards.num_samples // global_batch)
    total_steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    if shards.num_samples < global_batch:
        log.warning("the train split has %d samples, fewer than one global batch (%d): an epoch is 1 step",
                    shards.num_samples, global_batch)
    return RunPlan(shards, num_classes, classes, accumulation, global_batch, steps_per_epoch, total_steps,
                   count_macs(cfg.model.name, cfg.image_hw))


def _check_batches(cfg: Config, world: int) -> int:
    t = cfg.train
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
                        f"{t.micro_batch_size} x world size {world} = {per_step}; pick a global batch that is a "
                        f"multiple of {per_step}")
    return t.global_batch_size // per_step


def _num_classes(cfg: Config, shards: ShardSet) -> int:
    classes = shards.classes
    if cfg.model.num_classes is None:
        if not classes:
            raise UserError(f"model.num_classes is null but {describe(cfg.data.train)} records no class list "
                            f"(_info.json); set model.num_classes")
        return len(classes)
    if classes and cfg.model.num_classes < len(classes):
        raise UserError(f"model.num_classes={cfg.model.num_classes} is smaller than the {len(classes)} classes of "
                        f"{describe(cfg.data.train)}; set it to >= {len(classes)} or null")
    return cfg.model.num_classes


def resolved_config(cfg: Config, plan: RunPlan, resume, info: D.DistInfo) -> dict:
    """The config as checkpoints record it (model.num_classes resolved from the data), checked against the one
    the resumed checkpoint recorded: a UserError for a key that cannot change, a warning line per other key."""
    out = cfg.to_dict()
    out["model"]["num_classes"] = plan.num_classes
    if resume is not None:
        check_config_change(resume.checkpoint.meta.get("config"), out, resume.checkpoint.step, info.is_main)
    return out


def resolve_run_precision(cfg: Config, info: D.DistInfo) -> None:
    """precision: auto -> bf16 where this device computes it natively, else fp32 (said once, in the log)."""
    from core.units import resolve_precision

    chosen = resolve_precision(cfg.precision, info.device.type)
    if cfg.precision == "auto" and info.is_main:
        log.info("precision auto -> %s on %s (%s)", chosen, info.device.type,
                 torch.backends.cpu.get_cpu_capability() if info.device.type == "cpu" else "GPU")
    cfg.precision = chosen


def write_run_files(cfg: Config, plan: RunPlan, info: D.DistInfo) -> None:
    """run_dir/config.yaml (the resolved config of this launch) and classes.json (the head's row order)."""
    if info.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        atomic_write_json(os.path.join(cfg.run_dir, "classes.json"), {"classes": plan.classes}, indent=None)


def train_step(engine, loader, criterion, accumulation: int, dtype: torch.dtype, guard: StepGuard,
               step: int, times=None) -> tuple[float, torch.Tensor]:
    """Optimizer step `step` (1-based) over `accumulation` micro-batches: (the LR it applied, its loss averaged
    over ranks, a device scalar). A bad step (pipeline.faults.step_guard) is not applied: the guard's verdict, taken
    before the last backward, makes its gradients NaN and DeepSpeed's overflow check skips the update.

    Nothing here waits for the device (issue 10): the loss stays on it until a log step reads it, the guard's
    verdict too (`guard.readout` at the trainer's sync points). Only the plain torch optimizer (fp32 ZeRO-0,
    which has no overflow check) needs the verdict on the host at once. `times` (profiling.RankTimes) gets this
    rank's host time in the loader and the forward."""
    lr_used = float(engine.optimizer.param_groups[0]["lr"])  # DeepSpeed steps the schedule after this step
    guard.snapshot_buffers(engine.module)
    losses = []
    for micro in range(accumulation):
        start = time.perf_counter()
        images, targets = next(loader)
        logits = engine(images.to(dtype))  # the loader delivers normalised float32 on the device
        loss = guard.inject(criterion(logits, targets), step, micro)
        if times is not None:
            times.add(time.perf_counter() - start)
        losses.append(loss.detach().float())
        if micro == accumulation - 1:
            loss, mean, bad = guard.verdict(loss, losses)
        engine.backward(loss)
        plain = not hasattr(engine.optimizer, "overflow")
        if micro == accumulation - 1 and plain and bool(bad):  # a host sync, for this optimizer only
            engine.zero_grad()  # a plain torch optimizer (fp32, ZeRO-0) skips parameters without gradients
        engine.step()
    applied = engine.was_step_applied()  # DeepSpeed's host-side overflow flag: a bad step's NaN gradients
    if plain and applied:
        applied = not bool(bad)  # read above already; no further sync
    if not applied and engine.lr_scheduler is not None:
        # fp16 overflow or a bad step: DeepSpeed skipped the update and the schedule step, but this step counts,
        # so the schedule advances too and the LR stays Schedule.lr_at(step) (resume recomputes it that way).
        engine.lr_scheduler.step()
    guard.note(step, mean, bad, applied)
    if not applied:
        guard.restore_buffers()  # BatchNorm statistics as before the step
    return lr_used, mean


def skip_step(engine, loader, accumulation: int, samples: int, guard: StepGuard,
              step: int) -> tuple[float, torch.Tensor]:
    """Step `step` after a rollback that skips it: consume its batches, advance the schedule, train nothing."""
    lr_used = float(engine.optimizer.param_groups[0]["lr"])
    for _ in range(accumulation):
        next(loader)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
    guard.skipped(step, samples)
    return lr_used, torch.tensor(float("nan"), dtype=torch.float64)


def roll_back(cfg: Config, plan: RunPlan, info: D.DistInfo, checkpointer: Checkpointer, engine, state: TrainState,
              logger) -> bool:
    """Back to the newest complete checkpoint after bad steps (pipeline.faults.step_guard): model, optimizer, state and
    a loader rebuilt from its data positions; metrics after it are dropped. False when there is none."""
    resume = checkpointer.find_resume()
    if resume is None:
        state.guard.no_checkpoint()  # a UserError unless it was a spike
        return False
    state.loader.close()
    engine._config.load_universal_checkpoint = resume.universal  # DeepSpeed reads it in load_checkpoint
    checkpointer.restore(engine, state, resume)
    state.guard.rolled_back(state.step, plan.global_batch)
    state.attach_loader(build_train_loader(cfg, plan.shards, info.rank, info.world_size, plan.num_classes,
                                           state=state.data_state, pin_memory=info.device.type == "cuda",
                                           device=info.device, samples_seen=state.samples_seen))
    logger.close()
    logger.__init__(cfg.run_dir, info.is_main, resume_step=state.step)  # same object: StepLog and Evaluator hold it
    return True


class StepLog:
    """The logged scalars of a step: loss over ranks, LR, grad norm, loss scale, progress, speed, memory."""

    def __init__(self, cfg: Config, plan: RunPlan, info: D.DistInfo, logger, start_step: int):
        from pipeline.train.metrics import Throughput

        self.cfg, self.plan, self.info, self.logger, self.start_step = cfg, plan, info, logger, start_step
        recompute = cfg.model.activation_checkpointing
        if isinstance(recompute, list):  # selective recompute: HFU counts the share of the forward run again
            from model import recompute_fraction
            recompute = recompute_fraction(cfg.model.name, recompute, cfg.image_hw)
        self.throughput = Throughput(plan.global_batch, plan.macs_per_image, info.device, recompute=recompute)
        self.rank_times = RankTimes(cfg.run_dir, info)  # per-rank busy time, .profile_now

    def due(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.plan.total_steps

    def __call__(self, engine, state: TrainState, lr: float, loss: torch.Tensor) -> None:
        """`loss`: the step's loss already averaged over ranks (the guard's all-reduce), read here."""
        from pipeline.train.metrics import console_line, memory_gb

        counts = [state.loader.corrupt_count, *state.loader.read_since_launch(), *state.loader.drawn]
        summed = D.all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
        corrupt, launch_corrupt, launch_seen, *drawn = summed  # drawn: per source of a mixture, all ranks
        check_corrupt_fraction(int(launch_corrupt), int(launch_seen), self.cfg.data.max_corrupt_fraction)
        grad_norm = engine.get_global_grad_norm()
        scale = getattr(engine.optimizer, "cur_scale", None) if self.cfg.precision == "fp16" else 1.0
        scalars = {"loss": float(loss), "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "loss_scale": float(scale) if scale is not None else None,
                   "epoch": state.epoch, "samples_seen": state.samples_seen, "data/corrupt_skipped": int(corrupt),
                   "bad_steps": state.guard.bad_total if state.guard is not None else 0}
        scalars.update({f"data/source_fraction/{name}": n / max(1.0, sum(drawn))  # drawn so far, all ranks
                        for name, n in zip(state.loader.source_names or [], drawn)})
        scalars.update(self.throughput.window(state.step, self.plan.total_steps, self.start_step))
        scalars.update(memory_gb(self.info.device))
        scalars.update(self.rank_times.at_log_step(state.step))  # a collective: every rank logs at this step
        self.logger.log(state.step, scalars,
                        console=console_line(state.step, self.plan.total_steps, state.epoch, scalars))


def settle_guard(cfg: Config, plan: RunPlan, info: D.DistInfo, checkpointer: Checkpointer, engine, state: TrainState,
                 logger) -> bool:
    """At a sync point: read the guard's queued verdicts; True when that rolled the run back."""
    while state.guard.readout():
        if roll_back(cfg, plan, info, checkpointer, engine, state, logger):
            return True
    return False


def compile_engine(engine, cfg: Config) -> None:
    """torch.compile through DeepSpeed's own route, after deepspeed.initialize: `engine.compile` compiles the
    module in place (nn.Module.compile), so the state-dict keys, and so checkpoints, stay the plain model's,
    and DeepSpeed knows it is compiled (it keeps its hooks out of the graph: nvtx ranges off, its
    DeepCompile passes where configured). `model.compile_backend`: inductor on GPUs; aot_eager or eager to
    debug a capture problem (and in the CPU tests: inductor's C++ code generation fails on some CPUs)."""
    if engine.global_rank == 0:
        log.info("compiling the model through DeepSpeed (engine.compile, backend %s)", cfg.model.compile_backend)
    engine.compile(backend=cfg.model.compile_backend)


def _due(step: int, every: int, total: int) -> bool:
    return bool(every) and step % every == 0 and step < total


def _announce(cfg: Config, plan: RunPlan, info: D.DistInfo) -> None:
    if info.is_main:
        log.info("training %s (%d classes, %s px) for %d steps (%d per epoch) on %d rank(s): micro %d x world %d x "
                 "accumulation %d = global %d; ZeRO-%d, %s", cfg.model.name, plan.num_classes, cfg.image_hw,
                 plan.total_steps, plan.steps_per_epoch, info.world_size, cfg.train.micro_batch_size,
                 info.world_size, plan.accumulation, plan.global_batch, cfg.deepspeed.zero_stage, cfg.precision)
        if plan.shards.mixture:
            log.info(source_line(plan.shards))


def run(cfg: Config, mode: str = "pretrain") -> dict:
    """Train according to `cfg` under whatever launcher started this process. Returns a summary (all ranks)."""
    from pipeline.train.loss import build_loss
    from pipeline.train.metrics import MetricsLogger

    plan = plan_run(cfg)
    watchdog = start_watchdog(cfg)  # hangs, SIGTERM, a dead launcher: from before the process group exists
    info = D.setup(deterministic=cfg.train.deterministic, timeout_s=collective_timeout_s(cfg.train.hang_timeout_s))
    resolve_run_precision(cfg, info)
    write_run_files(cfg, plan, info)
    require_key(info.is_main)  # the key that signs this run's checkpoints, now rather than at the first save
    checkpointer = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint.keep, info,
                                cfg.deepspeed.zero_stage, watchdog=watchdog, trust=cfg.checkpoint.trust,
                                async_save=cfg.checkpoint.async_save)
    resume = checkpointer.find_resume()  # before the engine: a universal checkpoint changes its config
    checkpointer.run_config = resolved_config(cfg, plan, resume, info)  # a key that cannot change: one line

    # ---- build: model, engine, EMA, training state; restore; then the data from the restored positions
    model = build_model(cfg, plan, info, from_pretrained=resume is None)
    engine = build_engine(cfg, plan, info, model, universal=resume is not None and resume.universal)
    if cfg.model.compile:
        compile_engine(engine, cfg)
    guard = StepGuard(cfg.train.max_bad_steps, cfg.train.spike_factor, fp16=cfg.precision == "fp16", rank=info.rank,
                      device=info.device)
    state = TrainState(cfg.seed, info, plan.global_batch, plan.steps_per_epoch, ema=build_ema(cfg, engine),
                       run_meta={"model_config": engine.module.config.to_dict(), "classes": plan.classes,
                                 "world_size": info.world_size, "zero_stage": cfg.deepspeed.zero_stage, "mode": mode},
                       guard=guard)
    if resume is not None:
        checkpointer.restore(engine, state, resume)
    loader = build_train_loader(cfg, plan.shards, info.rank, info.world_size, plan.num_classes,
                                state=state.data_state, pin_memory=info.device.type == "cuda", device=info.device,
                                samples_seen=state.samples_seen)
    state.attach_loader(loader)
    criterion = build_loss(cfg)
    logger = MetricsLogger(cfg.run_dir, info.is_main, resume_step=state.step)
    log_step = StepLog(cfg, plan, info, logger, start_step=state.step)
    evaluate = Evaluator(cfg, info, plan.num_classes, logger) if cfg.data.val else None
    _announce(cfg, plan, info)
    if info.is_main and state.step < plan.total_steps:  # training on: not finished until this launch ends
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(cfg.run_dir, FINISHED))

    # ---- the loop: step, then at sync points only: read the guard, log, evaluate, save, poll for a stop.
    # A step that is none of these makes no host sync of ours (tests/test_no_sync.py counts them).
    dtype, total = precision_dtype(cfg.precision), plan.total_steps
    poll = StopPoll(cfg.train.stop_check_s, os.path.join(cfg.run_dir, SAVE_REQUEST), info.is_main, watchdog)
    poll.restart(state.step)
    pause = log_step.throughput.paused  # evaluation, saves and rollbacks are not training time (MFU)
    last_eval: dict = {}
    stopped_on_request = False
    engine.train()
    while state.step < total:
        watchdog.beat(step=state.step)
        step = state.step + 1
        if guard.skip(step):  # a rollback skips the batches of the bad steps
            lr, loss = skip_step(engine, loader, plan.accumulation, plan.global_batch, guard, step)
        else:
            lr, loss = train_step(engine, loader, criterion, plan.accumulation, dtype, guard, step,
                                  log_step.rank_times)
        state.advance(applied=guard.applied)
        log_step.rank_times.after_step(step)
        save_due = _due(step, cfg.checkpoint.every_steps, total)
        polls = step < total and (log_step.due(step) or poll.due(step))
        if log_step.due(step) or save_due or polls or step == total:
            with pause():
                rolled_back = settle_guard(cfg, plan, info, checkpointer, engine, state, logger)
            if rolled_back:
                loader = state.loader
                poll.restart(state.step)
                log_step.throughput.restart(state.step)
                continue
        if log_step.due(step):
            log_step(engine, state, lr, loss)
        if evaluate is not None and _due(step, cfg.train.eval_every, total):
            with watchdog.phase("evaluation"), pause():
                last_eval = evaluate(engine, state)
        if save_due:
            with pause():
                checkpointer.save(engine, state)
        stop = poll(step, checkpointer.last_save_s) if polls else None
        if stop is not None:
            stopped_on_request = True
            _stop(stop, cfg, info, checkpointer, engine, state)  # after SIGTERM the process exits 143 here
            break
    if evaluate is not None and not stopped_on_request:
        with watchdog.phase("evaluation"):
            last_eval = evaluate(engine, state)
    checkpointer.save(engine, state)  # unless this step is saved already
    checkpointer.wait()  # checkpoint.async_save: the run ends with its last checkpoint marked
    if info.is_main and not stopped_on_request:
        atomic_write_json(os.path.join(cfg.run_dir, FINISHED), {"step": state.step, "total_steps": total})
    log_step.rank_times.close()
    logger.close()
    loader.close()
    watchdog.close()
    if info.is_main:
        log.info("done: %d steps, run folder %s", state.step, cfg.run_dir)
    return {"step": state.step, "samples_seen": state.samples_seen, "run_dir": cfg.run_dir, **last_eval,
            "stopped_on_request": stopped_on_request, "corrupt_skipped": loader.corrupt_count}


def _stop(reason: str, cfg: Config, info: D.DistInfo, checkpointer: Checkpointer, engine, state: TrainState) -> None:
    """Stop after this step: save it unless SIGTERM left no time for that; after SIGTERM exit 143 right here."""
    if reason.startswith("sigterm"):
        if reason == "sigterm-save":
            checkpointer.save(engine, state)
        checkpointer.wait()  # a save in flight is finished, not cut off half-written
        if info.is_main:
            what = (f"saved step {state.step}" if reason == "sigterm-save" else
                    f"no time to save (the last save took {checkpointer.last_save_s} s)")
            log.warning("SIGTERM: %s; exiting %d: the same command resumes from the newest complete checkpoint",
                        what, EXIT_TERMINATED)
        raise SystemExit(EXIT_TERMINATED)
    checkpointer.save(engine, state)
    checkpointer.wait()
    if info.is_main:
        path = os.path.join(cfg.run_dir, SAVE_REQUEST)
        os.remove(path)
        log.info("saved step %d on request (%s); launch the same command again to continue", state.step, path)
