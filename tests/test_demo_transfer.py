"""Issue 5 end to end, through the same driver as `make demo` at a tiny budget: Ray shards, pretraining on
2 real ranks (deepspeed launcher, ZeRO-2, bf16, 32 px), fine-tuning at twice the resolution on another label
set with another class count, evaluation on held-out images.

What "it learned" can mean at this budget, measured (90 held-out images, 3 classes, chance 33.3%):
the transfer classes are circle-red, circle-green and square-red. Within 40 steps a tiny CoAtNet learns the
colour (circle-green apart from the two reds) but not yet the shape, so every run so far lands near 2/3:
fine-tuned 66.7% in two runs (per class 100/50/50 and 100/57/43) and from scratch 67.8% on a 2-core machine
(1 thread per rank), fine-tuned 64.4% on another 2-core machine; with 5x the pretraining and 3x the
fine-tuning steps 75.6% fine-tuned and 65.6% from scratch (shape only begins to count).
A bar at 2x chance (66.7%) therefore sat on that plateau and failed by two images (58/90). The bar below is 50%:
14 points or more under every measured run, and 3.3 standard deviations (sqrt(90 * 1/3 * 2/3) / 90 = 5%) above
what a model that learned nothing scores.
"""
import json
import re

import pytest
import torch

from model import create_model, resize_rel_pos_tables
from pipeline.weights.pretrained import load_weights


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2-3 min alone; 15 min on a 2-core machine shared with other test runs
def test_pretrain_then_finetune_at_twice_the_resolution_beats_chance(tmp_path, capfd):
    from pipeline import demo

    out = tmp_path / "demo"
    # Pretraining: 6 shape x colour classes. Transfer: 3 other shape x colour classes (another class count,
    # colours a tiny model tells apart within a few dozen steps), 64 px instead of 32.
    demo.main(["--out", str(out), "--pretrain-steps", "40", "--finetune-steps", "40", "--pretrain-classes", "6",
               "--pretrain-per-class", "24", "--finetune-label-set", "shape-color", "--finetune-classes", "3",
               "--finetune-per-class", "24", "--val-per-class", "30"])
    captured = capfd.readouterr()
    printed = captured.out + captured.err
    summary = json.loads((out / "summary.json").read_text())

    finetuned = summary["results"]["fine-tuned from pretraining"]
    assert finetuned["count"] == 90 and finetuned["image_size"] == [64, 64]
    chance = 100 / 3
    assert finetuned["top1"] >= 1.5 * chance, printed[-3000:]  # measured wide, see the module docstring
    assert summary["results"]["from scratch"]["count"] == 90
    assert set(summary["stage_seconds"]) >= {"demo data", "ray shards", "pretrain", "evaluate"}

    # The pretrained 32 px weights, their position tables resized, load strictly into the 64 px model
    # everywhere but the new 3-class head; the fine-tune log says what it did.
    state, meta = load_weights(str(out / "pretrain"))
    assert meta["classes"] and len(meta["classes"]) == 6
    model = create_model("coatnet-tiny", num_classes=6, image_size=64)
    model.load_state_dict(resize_rel_pos_tables(state, 64), strict=True)
    assert re.search(r"initialised from .*tables resized", printed), printed[-3000:]
    finetuned_state, finetuned_meta = load_weights(str(out / "finetune"))
    assert finetuned_state["head.weight"].shape == (3, model.head.in_features)
    tables = [k for k in state if k.endswith("rel_pos.bias_table")]
    assert all(finetuned_state[k].shape[-1] == 2 * (state[k].shape[-1] + 1) - 1 for k in tables)
    assert not torch.equal(finetuned_state["head.weight"][:3], state["head.weight"][:3])
