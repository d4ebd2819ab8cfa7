"""`python -m pipeline.finetune --config FILE [pretrained=PATH] [key=value ...]`: fine-tuning, same launchers.

The trainer of pipeline.pretrain with the paper's fine-tune defaults (Table 10: constant LR 5e-5, weight
decay 1e-8, EMA 0.9999, label smoothing 0.1, no center crop at evaluation). `pretrained` is a pretraining
run folder, a DeepSpeed checkpoint of any ZeRO stage, a universal checkpoint, or exported .safetensors; the
model is built at the new resolution and class count, position tables are resized and the head replaced
(rows of classes shared by name are copied). When run_dir already holds a checkpoint, the run resumes from
it instead (and `pretrained` is not read again).

    deepspeed --num_gpus 2 --module pipeline.finetune --config configs/demo/finetune.yaml pretrained=runs/demo/pretrain
"""
from __future__ import annotations

import sys

from pipeline.pretrain import main

if __name__ == "__main__":
    sys.exit(main(mode="finetune", description=__doc__))
