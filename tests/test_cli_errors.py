"""Every command line answers a user mistake the same way: `error: ...` naming the bad thing, exit 2, no traceback.

Each CLI runs as the user runs it (`python -m ...` in a subprocess from the repository root) with one bad
input that is caught before any real work: no Ray is started, no ranks, no training step.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/demo/pretrain.yaml"


# CLI -> (arguments after `python -m`, text the error line must contain); {tmp} is the test's temp folder, in
# which {tmp}/foreign is a non-empty folder that no stage wrote.
CASES = {
    "data_prep shard": (["data_prep", "shard", "{tmp}/no-such-src", "{tmp}/out"], "no-such-src"),
    "data_prep verify": (["data_prep", "verify", "{tmp}/foreign"], "_info.json"),
    "data_prep demo-data": (["data_prep", "demo-data", "{tmp}/img", "--classes", "99"], "--classes 99"),
    "pipeline.pretrain": (["pipeline.pretrain", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    "pipeline.finetune": (["pipeline.finetune", "--config", DEMO, "train.no_such_key=1"], "no_such_key"),
    "pipeline.evaluate": (["pipeline.evaluate", "--weights", "{tmp}/no-such-run", "--data", "{tmp}/foreign"],
                          "no-such-run"),
    "pipeline.export": (["pipeline.export", "{tmp}/no-such-run", "{tmp}/export"], "no-such-run"),
    "pipeline.demo": (["pipeline.demo", "--out", "{tmp}/foreign"], "--out"),
    "launch.plan": (["launch.plan", "--config", "{tmp}/missing.yaml", "--nodes", "1", "--gpus-per-node", "8",
                     "--gpu-mem-gb", "80"], "missing.yaml"),
    "launch.config_check": (["launch.config_check", "--config", DEMO, "optim.lr=fast"], "optim.lr"),
    "launch.ray_nodes": (["launch.ray_nodes", "--address", "nowhere", "--expect", "2"], "nowhere"),
}


@pytest.mark.parametrize("cli", list(CASES))
def test_a_user_mistake_is_one_error_line_and_exit_2(cli, tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.pdf").write_bytes(b"%PDF")
    template, names = CASES[cli]
    args = [arg.format(tmp=tmp_path) for arg in template]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RANK", None)  # rank 0 prints
    res = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, env=env,
                         timeout=120)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    shown = f"exit {res.returncode}\nstderr:\n{res.stderr[-3000:]}"
    assert res.returncode == 2, shown
    assert "Traceback" not in res.stderr, shown
    assert lines and lines[-1].startswith("error: "), shown
    assert names in lines[-1], shown


def test_one_user_error_type_for_every_stage():
    """data_prep's and the pipeline's user errors are core's, so cli_main catches them wherever raised."""
    from data_prep.errors import InputChanged, UserError as DataPrepUserError
    from pipeline.config import UserError as PipelineUserError

    assert DataPrepUserError is UserError and issubclass(InputChanged, UserError)
    assert issubclass(PipelineUserError, UserError)


def test_only_rank_0_prints_the_error(tmp_path):
    """Under a launcher every rank raises the same user error; one line in the job log, not one per rank."""
    cmd = [sys.executable, "-m", "pipeline.pretrain", "--config", str(tmp_path / "missing.yaml")]
    for rank, printed in (("0", True), ("1", False)):
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RANK": rank, "WORLD_SIZE": "2"})
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert ("error: " in res.stderr) is printed, (rank, res.stderr)
