"""The training loop shared by pretraining and fine-tuning: DeepSpeed engine, streaming data, exact resume.

    cfg = load_config("configs/demo/pretrain.yaml"); summary = run(cfg)

One optimizer step = `accumulation` micro-batches per rank (global = micro x world x accumulation). The
step's loss is the mean of its micro-batch losses, averaged over ranks when logged. Resume is automatic from
the newest complete checkpoint in run_dir/checkpoints (see pipeline.checkpoint); with a different world size
it goes through a universal checkpoint. Everything random (data order, augmentation, stochastic depth) is
restored or re-derived, so a resumed run repeats the losses of an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from typing import Optional

import torch

from pipeline import checkpoint as ckpt
from pipeline import distributed as D
from pipeline.config import Config, UserError, save_config
from pipeline.data import ShardSet, build_train_loader, derive_seed, open_shards

log = logging.getLogger("pipeline.train")

# A file in run_dir that asks the trainer to save a checkpoint at the next step and stop (a preemption
# notice: launch/slurm/pretrain.sbatch touches it on SIGUSR1, a user may too).
SAVE_REQUEST = ".save_now"

_TAG_RANK_SEED = 11


def _precision_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


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
            raise UserError(f"model.num_classes is null but {cfg.data.train} records no class list "
                            f"(_info.json); set model.num_classes")
        return len(classes)
    if classes and cfg.model.num_classes < len(classes):
        raise UserError(f"model.num_classes={cfg.model.num_classes} is smaller than the {len(classes)} classes of "
                        f"{cfg.data.train}; set it to >= {len(classes)} or null")
    return cfg.model.num_classes


@contextmanager
def _rng_untouched(device: torch.device):
    """Evaluation must not consume the training RNG (exact resume after an in-training evaluation)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


class _Evaluator:
    """Runs pipeline.evaluation on data.val with the live model (and the EMA weights when enabled)."""

    def __init__(self, cfg: Config, info: D.DistInfo, num_classes: int):
        from pipeline.evaluation import build_eval_loader, evaluate

        self.evaluate = evaluate
        self.cfg, self.info, self.num_classes = cfg, info, num_classes
        self.loader, self.shards = build_eval_loader(
            cfg.data.val, cfg.data.val_split, cfg.image_hw, batch_size=cfg.train.micro_batch_size * 2,
            num_workers=min(cfg.data.num_workers, 2), rank=info.rank, world_size=info.world_size,
            center_crop=cfg.data.center_crop, crop_ratio=cfg.data.crop_ratio)
        self.ema_model = None

    def __call__(self, module: torch.nn.Module, ema_state: Optional[dict]) -> dict:
        out = {}
        with _rng_untouched(self.info.device):
            res = self.evaluate(module, self.loader, self.num_classes, self.info.device)
            out.update({f"eval/{k}": v for k, v in res.items() if k in ("top1", "top5", "count", "per_class_top1")})
            if ema_state is not None:
                if self.ema_model is None:
                    from model import create_model
                    base = module.config
                    self.ema_model = create_model(base.name, **{k: v for k, v in base.to_dict().items()
                                                                 if k != "name"}).to(self.info.device)
                self.ema_model.load_state_dict(ema_state, strict=True)
                res = self.evaluate(self.ema_model, self.loader, self.num_classes, self.info.device)
                out.update({f"eval_ema/{k}": v for k, v in res.items() if k in ("top1", "top5", "count")})
        return out


def run(cfg: Config, mode: str = "pretrain") -> dict:
    """Train according to `cfg` under whatever launcher started this process. Returns a summary (all ranks)."""
    # User mistakes first, before the process group and DeepSpeed: one line, every rank alike, no hang.
    accumulation = _check_batches(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    shards = open_shards(cfg.data.train, cfg.data.train_split)
    if cfg.data.val:
        open_shards(cfg.data.val, cfg.data.val_split)  # a wrong val path fails now, not after hours of training
    num_classes = _num_classes(cfg, shards)
    info = D.setup(deterministic=cfg.train.deterministic)
    classes = shards.classes if shards.classes and len(shards.classes) == num_classes else None
    global_batch = cfg.train.global_batch_size
    steps_per_epoch = max(1, shards.num_samples // global_batch)
    total_steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    if shards.num_samples < global_batch:
        log.warning("the train split has %d samples, fewer than one global batch (%d): an epoch is 1 step",
                    shards.num_samples, global_batch)

    run_dir = cfg.run_dir
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        with open(os.path.join(run_dir, "classes.json"), "w") as f:
            json.dump({"classes": classes}, f)

    # ---- which checkpoint to resume from (rank 0 decides; a universal conversion if the layout changed)
    resume = ckpt.latest_complete(ckpt_dir) if info.is_main else None
    universal = False
    if info.is_main and resume is not None:
        changed = resume.world_size != info.world_size or resume.zero_stage != cfg.deepspeed.zero_stage
        if changed and resume.zero_stage >= 1:
            log.warning("checkpoint %s was written by %d ranks with ZeRO-%d; now %d ranks with ZeRO-%d: resuming "
                        "through a universal checkpoint", resume.tag, resume.world_size, resume.zero_stage,
                        info.world_size, cfg.deepspeed.zero_stage)
            resume = ckpt.to_universal(resume)
            universal = True
    resume, universal = D.broadcast_object((resume, universal))

    # ---- model (identical initialisation on every rank), then per-rank RNG streams (stochastic depth)
    import deepspeed
    from model import create_model, count_macs, param_groups
    from pipeline.loss import build_loss
    from pipeline.optim import deepspeed_config, make_schedule

    D.seed_everything(cfg.seed)
    model = create_model(cfg.model.name, num_classes=num_classes, image_size=cfg.image_hw,
                         drop_path_rate=cfg.model.drop_path_rate, stride_on=cfg.model.stride_on,
                         grad_checkpointing=cfg.model.activation_checkpointing)
    init_report = None
    if cfg.pretrained and resume is None:
        from pipeline.pretrained import init_from_pretrained

        init_report = init_from_pretrained(model, cfg.pretrained, classes, trust_pickle=cfg.pretrained_trusted)
        if info.is_main:
            log.info("initialised from %s: head %s, %d head rows copied, %d tables resized", cfg.pretrained,
                     init_report.get("head"), init_report.get("head_rows_copied", 0),
                     len(init_report.get("resized_tables", {})))
    macs = count_macs(cfg.model.name, cfg.image_hw)
    D.seed_everything(derive_seed(cfg.seed, _TAG_RANK_SEED, info.rank))
    if cfg.model.compile:
        model.compile()  # in place: state-dict keys (and so checkpoints) stay those of the plain model

    on_cpu = info.device.type == "cpu"
    schedule = make_schedule(cfg, total_steps, steps_per_epoch)
    ds_config = deepspeed_config(cfg, info.world_size, on_cpu=on_cpu, load_universal=universal)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config,
        lr_scheduler=schedule.scheduler_factory())
    dtype = _precision_dtype(cfg.precision)

    ema = None
    if cfg.train.ema_decay > 0:
        from pipeline.ema import ShardedEMA
        ema = ShardedEMA(engine.module, cfg.train.ema_decay, warmup=cfg.train.ema_warmup)

    # ---- restore
    step, data_state = 0, None
    if resume is not None:
        load_path, client = engine.load_checkpoint(resume.dir, tag=resume.tag, load_module_strict=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {resume.path}")
        step = int(client["step"])
        same_layout = int(client.get("world_size", -1)) == info.world_size
        if same_layout:
            D.set_rng_state(client["rng"][str(info.rank)])
            data_state = client["data_state"][str(info.rank)]
        else:
            # A new world: per-rank RNG streams cannot be continued; derive fresh ones from the step.
            D.seed_everything(derive_seed(cfg.seed, _TAG_RANK_SEED, info.rank, step))
            data_state = {"layout": None, "positions": {
                f"{r}.{w}": p for r, s in client["data_state"].items() for w, p in s["positions"].items()}}
            if info.rank != 0:
                for p in data_state["positions"].values():
                    p["corrupt"] = 0
        if ema is not None and client.get("ema") is not None:
            ema.load_state_dict(client["ema"], int(client.get("ema_updates", step)))
        # The optimizer's LR must match the (restored) schedule, also after a universal load.
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        if info.is_main:
            log.info("resumed from %s at step %d (samples seen %d)%s", resume.path, step, int(client["samples_seen"]),
                     " via universal checkpoint" if universal else "")

    loader = build_train_loader(cfg, shards, info.rank, info.world_size, num_classes, state=data_state,
                                pin_memory=info.device.type == "cuda", device=info.device)
    criterion = build_loss(cfg)
    from pipeline.metrics import MetricsLogger, Throughput, console_line, memory_gb

    logger = MetricsLogger(run_dir, info.is_main, resume_step=step)
    throughput = Throughput(global_batch, macs, info.device, recompute=cfg.model.activation_checkpointing)
    evaluator = _Evaluator(cfg, info, num_classes) if cfg.data.val else None
    if info.is_main:
        log.info("training %s (%d classes, %s px) for %d steps (%d per epoch) on %d rank(s): micro %d x world %d x "
                 "accumulation %d = global %d; ZeRO-%d, %s", cfg.model.name, num_classes, cfg.image_hw, total_steps,
                 steps_per_epoch, info.world_size, cfg.train.micro_batch_size, info.world_size, accumulation,
                 global_batch, cfg.deepspeed.zero_stage, cfg.precision)

    def client_state() -> dict:
        rngs = D.all_gather_object(D.rng_state())
        datas = D.all_gather_object(loader.state_dict())
        return {"step": step, "epoch": step / steps_per_epoch, "samples_seen": step * global_batch,
                "data_state": {str(r): s for r, s in enumerate(datas)},
                "rng": {str(r): s for r, s in enumerate(rngs)},
                "ema": ema.state_dict() if ema is not None else None,
                "ema_updates": ema.updates if ema is not None else 0,
                "model_config": engine.module.config.to_dict(), "classes": classes,
                "world_size": info.world_size, "zero_stage": cfg.deepspeed.zero_stage, "mode": mode}

    def save() -> None:
        D.sync_batchnorm_stats(engine.module)
        state = client_state()
        tag = ckpt.save(engine, ckpt_dir, step, state, cfg.checkpoint.keep,
                        {"world_size": info.world_size, "zero_stage": cfg.deepspeed.zero_stage})
        if info.is_main:
            log.info("saved checkpoint %s", os.path.join(ckpt_dir, tag))

    def run_eval() -> dict:
        D.sync_batchnorm_stats(engine.module)
        ema_state = ema.state_dict() if ema is not None else None
        result = evaluator(engine.module, ema_state)
        scalars = {k: v for k, v in result.items()}
        logger.log(step, scalars, console=(f"eval step {step}: top1 {result['eval/top1']:.2f} top5 "
                                          f"{result['eval/top5']:.2f} ({result['eval/count']} images)" +
                                          (f" | EMA top1 {result['eval_ema/top1']:.2f}" if ema is not None else "")))
        return result

    save_request = os.path.join(run_dir, SAVE_REQUEST)
    stopped_on_request = False
    start_step = step
    engine.train()
    last_eval: dict = {}
    saved_at = step if resume is not None else -1
    while step < total_steps:
        losses = []
        lr_used = float(optimizer.param_groups[0]["lr"])  # the LR this step applies (DeepSpeed steps the schedule)
        for _ in range(accumulation):
            images, targets = next(loader)
            images = images.to(dtype)  # the loader delivers normalised float32 on info.device
            logits = engine(images)
            loss = criterion(logits, targets)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        step += 1
        if ema is not None:
            ema.update()
        step_loss = torch.stack(losses).mean().double().cpu()
        if step % cfg.train.log_every == 0 or step == total_steps:
            reduced = D.all_reduce_sum(torch.stack([step_loss, torch.tensor(float(loader.corrupt_count),
                                                                            dtype=torch.float64)]))
            grad_norm = engine.get_global_grad_norm()
            scale = getattr(engine.optimizer, "cur_scale", None) if cfg.precision == "fp16" else 1.0
            scalars = {"loss": float(reduced[0]) / info.world_size, "lr": lr_used,
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "loss_scale": float(scale) if scale is not None else None,
                       "epoch": step / steps_per_epoch, "samples_seen": step * global_batch,
                       "data/corrupt_skipped": int(reduced[1])}
            scalars.update(throughput.window(step, total_steps, start_step))
            scalars.update(memory_gb(info.device))
            logger.log(step, scalars, console=console_line(step, total_steps, step / steps_per_epoch, scalars))
        if evaluator is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            last_eval = run_eval()
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total_steps:
            save()
            saved_at = step
        # Preemption notice (launch/slurm/pretrain.sbatch touches the file on SIGUSR1): save now and stop.
        requested = torch.tensor([float(info.is_main and os.path.exists(save_request))], dtype=torch.float64)
        if step < total_steps and D.all_reduce_sum(requested).item() > 0:
            if saved_at != step:
                save()
                saved_at = step
            if info.is_main:
                os.remove(save_request)
                log.info("saved step %d on request (%s); launch the same command again to continue", step,
                         save_request)
            stopped_on_request = True
            break
    if evaluator is not None and not stopped_on_request:
        last_eval = run_eval()
    if saved_at != step:
        save()
    logger.close()
    loader.close()
    summary = {"step": step, "samples_seen": step * global_batch, "run_dir": run_dir, **last_eval,
               "stopped_on_request": stopped_on_request,
               "corrupt_skipped": loader.corrupt_count}
    if info.is_main:
        log.info("done: %d steps, run folder %s", step, run_dir)
    return summary
