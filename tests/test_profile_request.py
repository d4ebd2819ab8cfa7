"""run_dir/.profile_now: a torch.profiler trace of a few steps on every rank (2 real ranks, deepspeed launcher),
per-rank busy times in the metrics, and the straggler rule."""
import json

import pytest

from pipeline.train.profiling import STRAGGLER_LOGS, stragglers
from tests.test_pipeline_train import base_overrides, deepspeed_cmd, metrics, run


@pytest.mark.slow
def test_profile_request_writes_a_trace_per_rank_and_per_rank_times_are_logged(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".profile_now").touch()  # read at the first log step, as it would be in a live run
    # Selective recompute of S1 and S2 rides along: the trainer path of a list-valued activation_checkpointing.
    res = run(deepspeed_cmd(base_overrides(demo_shards, run_dir, **{
        "data.val": None, "train.steps": 8, "train.log_every": 2, "checkpoint.every_steps": 0,
        "model.activation_checkpointing": "[0,1]"})), timeout=400)
    traces = sorted((run_dir / "profile").glob("*.pt.trace.json"))
    assert {p.name.split(".")[0] for p in traces} == {"rank0", "rank1"}, res.stdout[-3000:] + res.stderr[-3000:]
    for path in traces:
        events = json.loads(path.read_text())["traceEvents"]
        steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
        assert len(steps) == 3 and any(e.get("cat") == "cpu_op" for e in events)  # 3 active steps of real ops
    assert not (run_dir / ".profile_now").exists()
    logged = metrics(run_dir)[0]
    for step in (2, 4, 6, 8):
        busy = [logged[step][f"perf/rank_busy_s/{r}"] for r in (0, 1)]
        assert all(b > 0 for b in busy) and logged[step]["perf/slowest_rank"] in (0, 1)


def test_a_rank_slower_at_consecutive_log_steps_is_named_once():
    streaks: dict = {}
    named = [stragglers([0.1, 0.1, 0.3, 0.1], streaks) for _ in range(STRAGGLER_LOGS + 2)]
    assert named == [[]] * (STRAGGLER_LOGS - 1) + [[2]] + [[]] * 2
    assert stragglers([0.1, 0.1, 0.1, 0.1], streaks) == [] and streaks[2] == 0  # back in line: the count restarts
    assert stragglers([0.1, 0.12, 0.11, 0.1], {}) == [] and stragglers([0.5], {}) == []
