"""Issue 25: sigmoid pretraining on multi-label images of real objects learns, and its weights are a better start
for single-label fine-tuning than random ones.

The data are made here (tests/real_objects.py: photographs shipped in scikit-image's wheel) the way a user's
would reach the trainer: a JSONL manifest with `labels` lists -> `python -m data_prep shard` (Ray) -> 2 ranks
under the deepspeed launcher, ZeRO-2, configs/demo/pretrain.yaml with `loss.type=sigmoid`. Precision is `auto`:
bf16 where the CPU computes it natively, fp32 on an AVX2-only CPU (emulated bf16 is ~10x slower there), so the
budget fits a few minutes on 2 cores either way.

Every bar compares against the same budget without the thing under test (the 1-step model, the fine-tune
from scratch with the same recipe, steps and seed), never a fixed score. Measured: see the test docstrings.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime.distributed import free_port
from tests import real_objects

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]
# 200 pretraining steps on 1,200 images (mAP 73.9) were too few to transfer: fine-tuned 74.7/79.0% (EMA/live) vs
# 76.3/77.0% from scratch with 8 images per class; 400 steps on 2,000 images are the budget that transfers.
PRETRAIN_STEPS, FINETUNE_STEPS = 400, 60
MULTI_TRAIN, MULTI_VAL, SINGLE_TRAIN, SINGLE_VAL = 2000, 200, 20, 50  # images; the single ones per class


def _run(cmd: list, cwd=REPO) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _shard(src: Path, out: Path, split: str, *extra) -> None:
    _run([sys.executable, "-m", "data_prep", "shard", src, out, "--split", split, "--shard-size", "256",
          "--seed", "0", "--workers", "2", *extra])


def _train(module: str, config: str, run_dir: Path, *overrides) -> list[dict]:
    """One 2-rank run under DeepSpeed's launcher; its logged metrics."""
    _run(["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", free_port(), "--module",
          module, "--config", config, f"run_dir={run_dir}", "precision=auto", *overrides])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _evaluate(weights: Path, shards: Path, ema: bool = True) -> dict:
    from pipeline import evaluate as evaluate_cli

    out = weights / f"eval_{shards.name}_{'ema' if ema else 'live'}.json"
    assert evaluate_cli.main(["--weights", str(weights), "--data", str(shards), "--no-center-crop", "--num-workers",
                              "1", "--out", str(out)] + ([] if ema else ["--no-ema"])) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    """Multi-label shards, a sigmoid pretraining of PRETRAIN_STEPS and the same run after 1 step."""
    root = tmp_path_factory.mktemp("issue25")
    images, shards = root / "images", root / "shards"
    for split, n, seed in (("train", MULTI_TRAIN, 0), ("val", MULTI_VAL, 1)):
        manifest = real_objects.write_multi(images / f"multi_{split}", n, seed)
        _shard(manifest, shards / "multi", split, "--classes", images / "multi_train" / "classes.txt")
    common = [f"data.train={shards / 'multi'}", "data.val=null", "loss.type=sigmoid",
              f"data.image_size={real_objects.SIZE}"]
    runs = {}
    for name, steps in (("pretrain", PRETRAIN_STEPS), ("one_step", 1)):
        run_dir = root / name
        metrics = _train("pipeline.pretrain", "configs/demo/pretrain.yaml", run_dir, *common,
                         f"train.steps={steps}", f"checkpoint.every_steps={steps}", "train.log_every=10")
        runs[name] = {"dir": run_dir, "losses": {m["step"]: m["loss"] for m in metrics if "loss" in m},
                      "eval": _evaluate(run_dir, shards / "multi")}
    return {"root": root, "images": images, "shards": shards, **runs}


def test_sigmoid_pretraining_on_real_objects_lowers_the_loss_and_lifts_map(pretrained):
    """The loss falls by a third from its start and mAP rises far above the 1-step model's.

    Measured (2 ranks, bf16, 400 steps, 10 classes, 2-4 objects per image, 200 held-out images): loss 5.98
    (mean of steps 10-20) -> 2.53 (steps 380-400), mAP 86.9% vs 27% after 1 step. Before issue 25's fixes (zero
    head bias, crops that cut objects out, smoothing 0.1) the same run went 6.14 -> 4.32 (0.70 of its start)
    with mAP 73.9% vs 27.2%: both bars below fail it.
    """
    losses = pretrained["pretrain"]["losses"]
    steps = sorted(losses)
    start = sum(losses[s] for s in steps[:2]) / 2  # steps 10, 20
    end = sum(losses[s] for s in steps[-3:]) / 3
    trained, one_step = pretrained["pretrain"]["eval"], pretrained["one_step"]["eval"]
    print(f"loss {[round(losses[s], 3) for s in steps]}; mAP {trained['mAP']:.1f} vs 1 step {one_step['mAP']:.1f}")
    assert end < start * 2 / 3, losses
    assert trained["count"] == one_step["count"] == MULTI_VAL and trained["ap_classes"] == len(real_objects.CLASSES)
    # random scores give mAP ~ the label frequency (~30%) +- 3; measured +60 points, +47 before the fixes
    assert trained["mAP"] >= one_step["mAP"] + 50, (trained["mAP"], one_step["mAP"])


def test_multilabel_pretraining_transfers_to_single_objects_at_another_scale_better_than_scratch(pretrained):
    """Fine-tuning onto one large object per image anywhere (pretraining saw 2-4 small ones in quadrants)
    from the pretraining beats the same fine-tune from scratch (recipe, steps, seed) by 3 standard errors.

    Measured (500 held-out images, SE ~2 points): fine-tuned 83.8% (EMA) / 84.4% (live) vs 74.2 / 70.6% from
    scratch. From the pre-fix pretraining: 79.8 / 84.8% at these 60 steps (EMA 5.6 points over scratch, under
    the bar), and with 150 steps 87.2 / 83.8% vs 89.4 / 92.0% from scratch (worse); after the fixes at 150 steps
    91.2 / 96.6%.
    """
    images, shards = pretrained["images"], pretrained["shards"]
    for split, per_class, seed in (("train", SINGLE_TRAIN, 2), ("val", SINGLE_VAL, 3)):
        _shard(real_objects.write_single(images / f"single_{split}", per_class, seed), shards / "single", split)
    top1 = {}
    for name, start in (("finetuned", pretrained["pretrain"]["dir"]), ("scratch", "null")):
        run_dir = pretrained["root"] / name
        _train("pipeline.finetune", "configs/demo/finetune.yaml", run_dir, f"pretrained={start}",
               f"data.train={shards / 'single'}", f"data.val={shards / 'single'}",
               f"data.image_size={real_objects.SIZE}", f"train.steps={FINETUNE_STEPS}",
               f"checkpoint.every_steps={FINETUNE_STEPS}")
        top1[name] = {kind: _evaluate(run_dir, shards / "single", ema=kind == "ema")["top1"] for kind in ("ema", "live")}
    n = SINGLE_VAL * len(real_objects.CLASSES)
    print(f"top-1 fine-tuned {top1['finetuned']} vs from scratch {top1['scratch']} ({n} held-out images)")
    for kind in ("ema", "live"):
        p = top1["scratch"][kind] / 100
        se = 100 * math.sqrt(max(p * (1 - p), 0.05) / n)  # of the from-scratch top-1, >= that of p = 5%
        assert top1["finetuned"][kind] >= top1["scratch"][kind] + 3 * se, (kind, top1, se)
