"""The pipeline config schema, the LR schedule and the CLI's one-line errors for user mistakes."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, format_help, load_config
from pipeline.train.optim import Schedule

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"


def test_demo_configs_load_and_start_with_their_command():
    for name, mode in (("pretrain.yaml", "pretrain"), ("finetune.yaml", "finetune")):
        text = (DEMO / name).read_text()
        assert text.startswith("# ") and f"pipeline.{mode}" in text.splitlines()[0]
        cfg = load_config(DEMO / name, defaults=mode)
        assert cfg.model.name == "coatnet-tiny" and 32 <= cfg.image_hw[0] <= 64


def test_overrides_are_typed_and_round_trip(tmp_path):
    cfg = load_config(DEMO / "pretrain.yaml", ["optim.lr=3e-4", "data.image_size=[32, 64]", "data.val=null",
                                               "deepspeed.extra.zero_optimization.overlap_comm=false", "train.steps=7"])
    assert cfg.optim.lr == 3e-4 and cfg.image_hw == (32, 64) and cfg.data.val is None and cfg.train.steps == 7
    assert cfg.deepspeed.extra == {"zero_optimization": {"overlap_comm": False}}
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg


def test_finetune_defaults_follow_the_paper():
    cfg = load_config(None, defaults="finetune")
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.decay) == (5e-5, 5e-5, 1e-8, "constant")
    assert cfg.train.ema_decay == 0.9999 and cfg.loss.label_smoothing == 0.1 and cfg.data.center_crop is False


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=3", "unknown key train.stepz"),
    ("train.steps=abc", "train.steps must be an integer"),
    ("model.drop_path_rate=[1]", "model.drop_path_rate must be a number"),
    ("precision=fp8", "precision must be one of auto, bf16, fp16, fp32"),
    ("data.image_size=33", "data.image_size must be"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage must be one of"),
    ("deepspeed.grad_accum_dtype=fp8", "deepspeed.grad_accum_dtype must be one of fp32, bf16, fp16"),
    ("deepspeed.communication_dtype=true", "deepspeed.communication_dtype must be a string"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1, got 0"),
    ("data.crop_ratio=1.5", r"data.crop_ratio must be in \(0, 1\], got 1.5"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be > 0"),
    ("nokey", "must look like key=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        load_config(DEMO / "pretrain.yaml", [override])
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# x\ntrain:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key train\.epochz"):
        load_config(bad)


def test_schedule_warmup_then_decay_to_min():
    cos = Schedule(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14, decay="cosine")
    assert [cos.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos.lr_at(4) == 1.0 and cos.lr_at(13) == pytest.approx(0.1) and cos.lr_at(99) == pytest.approx(0.1)
    assert cos.lr_at(4 + 9 / 2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    lin = Schedule(lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=11, decay="linear")
    assert [lin.lr_at(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert Schedule(5e-5, 5e-5, 0, 10, "constant").lr_at(7) == 5e-5


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.pretrain", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MASTER_ADDR": "127.0.0.1"})


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    cases = [
        (["--config", str(DEMO / "pretrain.yaml"), "train.stepz=3"], "unknown key train.stepz"),
        (["--config", str(DEMO / "pretrain.yaml"), "train.epochs=lots"], "train.epochs must be a number"),
        (["--config", str(tmp_path / "nope.yaml")], "not found"),
        (["--config", str(DEMO / "pretrain.yaml"), f"data.train={tmp_path / 'no-shards'}"], "no-shards"),
    ]
    for args, needle in cases:
        res = _cli(*args)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
        assert "Traceback" not in res.stderr


def test_gradient_dtypes_default_to_fp32():
    cfg = load_config(DEMO / "pretrain.yaml", ["deepspeed.grad_accum_dtype=bf16"])
    assert (cfg.deepspeed.grad_accum_dtype, cfg.deepspeed.communication_dtype) == ("bf16", "fp32")
    assert "grad_accum_dtype: fp32" in format_help() and "communication_dtype: fp32" in format_help()


def test_config_check_cli_one_line_error():
    res = subprocess.run([sys.executable, "-m", "launch.config_check", "--config", str(DEMO / "pretrain.yaml"),
                          "train.stepz=3"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: override train.stepz=3: unknown key train.stepz")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_cli_batch_sizes_that_do_not_divide(tmp_path):
    # Checked before the process group starts (the launchers export WORLD_SIZE): one rank, global 30 vs micro 8.
    res = _cli("--config", str(DEMO / "pretrain.yaml"), "train.global_batch_size=30", "train.micro_batch_size=8",
               f"run_dir={tmp_path / 'run'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")][0]
    assert "train.global_batch_size=30" in line and "train.micro_batch_size=8" in line and "world size 1" in line


def test_cli_help_lists_every_key_with_its_default():
    res = _cli("--help")
    assert res.returncode == 0
    for key in ("run_dir:", "zero_stage: 2", "global_batch_size: 32", "ema_decay: 0.0", "label_smoothing: 0.1"):
        assert key in res.stdout
    assert format_help("finetune").count("\n") == format_help().count("\n")
