"""The cluster launchers in launch/: static checks, dry runs under a fake SLURM, and real multi-process runs.

The fake SLURM is a PATH shim (scontrol prints the node list, srun records or replays its command): SLURM
itself is what cannot run here. The printed torchrun/deepspeed commands are checked with those
launchers' own argument parsers. Ray, torchrun and the trainer run for real in the slow tests.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/slurm/*.sbatch")])
DEMO = "configs/demo/pretrain.yaml"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sh(args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def commands(stdout: str) -> list[list[str]]:
    """The `+ ...` lines of a launcher's transcript, split like the shell would."""
    return [shlex.split(line[2:].removesuffix(" &")) for line in stdout.splitlines() if line.startswith("+ ")]


def one_line_error(res, *words):
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for word in words:
        assert word in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ static checks
def test_every_script_passes_bash_n_and_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"common.sh", "deepspeed.sh", "torchrun.sh", "ray_cluster.sh",
                                         "pretrain.sbatch", "shard.sbatch"}
    for script in SCRIPTS:
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, (script, res.stderr)
    # launch/.shellcheckrc lets shellcheck follow `source common.sh` (as `shellcheck -x`).
    res = subprocess.run([str(BIN / "shellcheck"), *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for script in SCRIPTS:
        if script.name != "common.sh":
            assert os.access(script, os.X_OK), f"{script} is not executable"


# --------------------------------------------------------------------------------------------- fake SLURM
@pytest.fixture
def slurm(tmp_path):
    """A PATH shim for scontrol and srun, and the SLURM variables of a 3-node job 777 with 8 GPUs per node."""
    shim = tmp_path / "shim"
    shim.mkdir()
    log = tmp_path / "slurm.log"
    (shim / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1 $2" == "show hostnames" ]]; then for h in $FAKE_NODES; do echo "$h"; done; exit 0; fi\n'
        'echo "scontrol $*" >>"$FAKE_LOG"\n')
    # srun: record the call; FAKE_SRUN=sleep waits like a long job step; FAKE_SRUN=exec becomes the step's
    # command (`ray start` of shard.sbatch); FAKE_SRUN=real runs the task once
    # for real (a one-node job) and records its exit status; FAKE_SRUN=replay runs the
    # `bash -c SCRIPT PYTHON ARGS` it was given once per node, with SLURM_NODEID set and the
    # interpreter replaced by a recorder, as SLURM would start one task on every node.
    (shim / "srun").write_text(
        f"#!{sys.executable}\n"
        "import os, subprocess, sys, time\n"
        "open(os.environ['FAKE_LOG'], 'a').write('srun ' + ' '.join(sys.argv[1:]) + '\\n')\n"
        "if os.environ.get('FAKE_SRUN') == 'sleep':\n"
        "    time.sleep(120)\n"
        "    sys.exit(0)\n"
        "if os.environ.get('FAKE_SRUN') == 'exec':\n"  # the step's command replaces srun (signals reach it)
        "    args, i = sys.argv[1:], 0\n"
        "    while args[i].startswith('-'):\n"
        "        i += 1 if args[i] == '--overlap' else 2\n"
        "    os.execvp(args[i], args[i:])\n"
        "if os.environ.get('FAKE_SRUN') == 'real':\n"
        "    task = sys.argv[sys.argv.index('bash'):]\n"
        "    rc = subprocess.run(task, env={**os.environ, 'SLURM_NODEID': '0'}).returncode\n"
        "    open(os.environ['FAKE_LOG'], 'a').write(f'srun exited {rc}\\n')\n"
        "    sys.exit(rc)\n"
        "task = sys.argv[sys.argv.index('bash'):]\n"
        "for node in range(int(os.environ['SLURM_JOB_NUM_NODES'])):\n"
        "    cmd = task[:3] + [os.environ['FAKE_RECORDER']] + task[4:]\n"
        "    subprocess.run(cmd, env={**os.environ, 'SLURM_NODEID': str(node)}, check=True)\n")
    recorder = tmp_path / "recorder"
    recorder.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >"$FAKE_OUT/node-$SLURM_NODEID"\n')
    for f in (shim / "scontrol", shim / "srun", recorder):
        f.chmod(0o755)
    (tmp_path / "out").mkdir()
    env = _env(PATH=f"{shim}:{os.environ['PATH']}", FAKE_LOG=log, FAKE_NODES="gpu01 gpu02 gpu03",
               FAKE_RECORDER=recorder, FAKE_OUT=tmp_path / "out", SLURM_JOB_ID=777,
               SLURM_JOB_NODELIST="gpu[01-03]", SLURM_JOB_NUM_NODES=3, SLURM_GPUS_ON_NODE=8,
               SLURM_SUBMIT_DIR=REPO)
    return env, log, tmp_path / "out"


def _torchrun_args(cmd: list[str]):
    from torch.distributed.run import get_args_parser
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"], cmd
    return get_args_parser().parse_args(cmd[3:])


def _node_commands(stdout: str) -> dict[int, list[str]]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("# node "):
            rank, rest = line[len("# node "):].split(" ", 1)
            out[int(rank)] = shlex.split(rest.split("): ", 1)[1])
    return out


def test_pretrain_sbatch_dry_run_ranks_rendezvous_and_resume(slurm, tmp_path):
    env, _, _ = slurm
    run_dir = tmp_path / "run"
    args = ["launch/slurm/pretrain.sbatch", "--config", DEMO, f"run_dir={run_dir}", "train.steps=7", "--dry-run"]
    first = sh(args, env)
    assert first.returncode == 0, first.stderr
    assert f"fresh run: no checkpoint in {run_dir}" in first.stdout
    nodes = _node_commands(first.stdout)
    assert sorted(nodes) == [0, 1, 2]
    port = 29500 + 777 % 1000
    for rank, cmd in nodes.items():
        a = _torchrun_args(cmd)
        assert (a.node_rank, a.nnodes, a.nproc_per_node) == (rank, "3", "8")
        assert (a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id, a.max_restarts) == ("c10d", f"gpu01:{port}", "777", 0)
        assert a.module and a.training_script == "pipeline.pretrain"
        assert a.training_script_args == ["--config", DEMO, f"run_dir={run_dir}", "train.steps=7"]
    srun = commands(first.stdout)[-1]
    assert srun[:6] == ["srun", "--nodes", "3", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert '--node-rank "$SLURM_NODEID"' in srun[srun.index("-c") + 1]

    # Requeued after preemption, with a checkpoint in run_dir: the same trainer command, the resume is noted.
    # DeepSpeed's `latest` names a newer, half-written save: the note names the complete one, as the trainer does.
    for tag in ("step_00000004", "step_00000006"):
        (run_dir / "checkpoints" / tag).mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000004" / "complete.json").write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text("step_00000006")
    again = sh(args, {**env, "SLURM_RESTART_COUNT": "1"})
    assert "requeues so far: 1" in again.stdout
    assert f"resume: {run_dir}/checkpoints -> step_00000004" in again.stdout
    assert _node_commands(again.stdout) == nodes
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"  # nothing wiped

    # Resubmitted on fewer nodes: same trainer arguments, a 2-node rendezvous.
    fewer = sh(args, {**env, "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]",
                      "FAKE_NODES": "gpu01 gpu02"})
    two = _node_commands(fewer.stdout)
    assert sorted(two) == [0, 1] and _torchrun_args(two[1]).nnodes == "2"
    assert _torchrun_args(two[1]).training_script_args == _torchrun_args(nodes[1]).training_script_args

    text = (REPO / "launch/slurm/pretrain.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text


def test_pretrain_sbatch_srun_task_gets_its_node_rank(slurm):
    env, log, out = slurm
    res = sh(["launch/slurm/pretrain.sbatch", "--config", DEMO, "--gpus-per-node", "2", "train.steps=3"],
             {**env, "FAKE_SRUN": "replay"})
    assert res.returncode == 0, res.stderr
    for rank in range(3):
        argv = (out / f"node-{rank}").read_text().splitlines()
        assert argv[:4] == ["-m", "torch.distributed.run", "--node-rank", str(rank)]
        a = _torchrun_args([sys.executable, *argv])
        assert a.node_rank == rank and a.nproc_per_node == "2" and a.training_script_args[-1] == "train.steps=3"


@pytest.mark.parametrize("finished", [False, True], ids=["unfinished", "finished"])
def test_pretrain_sbatch_usr1_asks_for_a_save_and_waits_before_requeueing(slurm, tmp_path, finished):
    """USR1 while srun runs: the save request appears at once, the requeue only once srun has exited.

    Requeueing at once (as this script once did) makes SLURM terminate the trainer in the middle of the very
    save it was just asked for. A run that finished meanwhile (USR1 during its last steps: finished.json) is
    not requeued: the requeued job would only start again to find nothing left to do.
    """
    env, log, _ = slurm
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(["bash", "launch/slurm/pretrain.sbatch", "--config", DEMO, f"run_dir={run_dir}"],
                            cwd=REPO, env={**env, "FAKE_SRUN": "sleep"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and "srun " in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` sends before the time limit
        while not (run_dir / ".save_now").exists():
            assert time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None, "the batch script must keep waiting for srun (the trainer is saving)"
        assert "scontrol requeue" not in log.read_text(), "requeued while the trainer was still saving"
        srun = [p for p in psutil.Process(proc.pid).children(recursive=True) if "srun" in " ".join(p.cmdline())]
        assert srun, "no srun child"
        if finished:
            (run_dir / "finished.json").write_text('{"step": 10, "total_steps": 10}')
        for p in srun:
            p.kill()  # the job step ends (as when the trainer exits after its save)
        _, err = proc.communicate(timeout=60)
        assert ("scontrol requeue 777" in log.read_text()) is not finished
        assert ("the run finished: not requeued" in err) is finished
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("signum,grace", [(signal.SIGUSR1, 25), (signal.SIGTERM, 25), (signal.SIGTERM, 0)],
                         ids=["usr1", "sigterm", "sigterm-no-grace"])
def test_pretrain_sbatch_real_trainer_preempted_saves_and_the_requeued_job_resumes(slurm, tmp_path, demo_shards,
                                                                                    signum, grace):
    """The whole preemption path with the real torchrun + trainer (one node, one CPU rank, fake SLURM).
    USR1 (`--signal=B:USR1@120`, to the batch shell) mid-run -> a complete checkpoint, the trainer exits 0,
    and only then `scontrol requeue`. SIGTERM (the job's end: slurmstepd signals every process of the job at
    once, here the whole process group) -> the trainer saves when a save fits its grace (a run that has not
    saved yet tries one), else exits at once (grace 0: the checkpoint of step 2 stays the newest), and no
    checkpoint is marked complete that is not. Either way the requeued command resumes from the newest."""
    from tests.test_faults import assert_intact

    env, log, _ = slurm
    run_dir = tmp_path / "run"
    env = {**env, "FAKE_SRUN": "real", "FAKE_NODES": "127.0.0.1", "SLURM_JOB_NODELIST": "127.0.0.1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "1", "MASTER_ADDR": "127.0.0.1"}
    args = ["bash", "launch/slurm/pretrain.sbatch", "--config", DEMO, "--port", str(free_port()),
            f"run_dir={run_dir}", f"data.train={demo_shards}", "train.steps=100000", "train.log_every=1",
            f"checkpoint.every_steps={0 if grace else 2}", "checkpoint.keep=100", f"train.sigterm_grace_s={grace}",
            "train.micro_batch_size=32", "data.num_workers=0"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3
                   and (grace or (run_dir / "checkpoints/step_00000002/complete.json").exists())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        job = psutil.Process(proc.pid).children(recursive=True)
        if signum == signal.SIGUSR1:
            proc.send_signal(signum)
        else:
            os.killpg(proc.pid, signum)
        out, _ = proc.communicate(timeout=240)
        _, alive = psutil.wait_procs(job, timeout=120)  # the trainer outlives the batch shell SIGTERM ends
        assert not alive, f"still running: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    events = [line for line in log.read_text().splitlines() if line.startswith(("srun exited", "scontrol requeue"))]
    if signum == signal.SIGUSR1:
        assert proc.returncode == 0, out[-3000:]
        assert events == ["srun exited 0", "scontrol requeue 777"], events
    else:  # SLURM requeues a preempted job itself; the script must not
        assert not any(e.startswith("scontrol requeue") for e in events), events
        # the trainer still writes to the job's output; without grace it exits from wherever it is
        assert "exiting 143" in out and ("SIGTERM: saved step" in out) == bool(grace), out[-3000:]
    assert_intact(run_dir)
    marked = sorted((run_dir / "checkpoints").glob("step_*/complete.json"))
    assert (len(marked) == 1) if grace else (len(marked) >= 1), marked  # no grace: periodic saves only
    step = json.loads(marked[-1].read_text())["step"]
    assert (3 if grace else 2) <= step < 100000
    # The requeued job runs the same command: it resumes from that checkpoint (dry run prints the resume).
    again = subprocess.run([*args, "--dry-run"], cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"},
                           capture_output=True, text=True, timeout=120)
    assert f"resume: {run_dir}/checkpoints -> {marked[-1].parent.name}" in again.stdout, again.stdout + again.stderr


def test_shard_sbatch_dry_run_places_head_and_workers(slurm, tmp_path):
    env, _, _ = slurm
    res = sh(["launch/slurm/shard.sbatch", "--num-cpus", "16", "--dry-run", "--", "/data/in", str(tmp_path / "o"),
              "--split", "train", "--shard-size", "100"], env)
    assert res.returncode == 0, res.stderr
    head, workers, wait, shard = commands(res.stdout)
    port = str(20000 + 777 % 10000)
    assert head[:7] == ["srun", "--nodes", "1", "--ntasks", "1", "--overlap", "-w"] and head[7] == "gpu01"
    assert "--head" in head and head[head.index("--port") + 1] == port and "--block" in head
    assert workers[workers.index("--exclude") + 1] == "gpu01" and workers[workers.index("--nodes") + 1] == "2"
    assert workers[workers.index("--address") + 1] == f"gpu01:{port}"
    assert wait[-6:] == ["--address", f"gpu01:{port}", "--expect", "3", "--timeout", "300"]
    assert shard[1:] == ["-m", "data_prep", "shard", "/data/in", str(tmp_path / "o"), "--split", "train",
                         "--shard-size", "100", "--ray-address", f"gpu01:{port}"]
    single = sh(["launch/slurm/shard.sbatch", "--num-cpus", "4", "--dry-run", "--", "a", "b"],
                {**env, "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "gpu01", "FAKE_NODES": "gpu01"})
    cmds = commands(single.stdout)
    assert len(cmds) == 3 and cmds[0][cmds[0].index("--node-ip-address") + 1] == "127.0.0.1"
    assert cmds[-1][-2:] == ["--ray-address", f"127.0.0.1:{port}"]



@pytest.mark.slow
def test_shard_sbatch_usr1_stops_data_prep_requeues_and_the_requeued_job_resumes_listing(slurm, tmp_path):
    """A one-node shard job under the fake SLURM with a real Ray head (`ray start` through srun) and the real
    data_prep: SIGUSR1 (`#SBATCH --signal=B:USR1@120`) while it lists -> data_prep is stopped, Ray stops, and
    only then `scontrol requeue`; the requeued start runs the same command, which lists only the parts without
    a receipt and finishes the split."""
    from tests.test_data_prep_listing_parts import _class_tars, _receipts

    env, log, _ = slurm
    src, out = tmp_path / "src", tmp_path / "shards"
    _class_tars(src, classes=16, per_class=2, filler=1500)
    ray_home = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    env = {**env, "FAKE_SRUN": "exec", "FAKE_NODES": "node01", "SLURM_JOB_NODELIST": "node01",
           "SLURM_JOB_NUM_NODES": "1", "XDG_RUNTIME_DIR": ray_home}
    args = ["bash", "launch/slurm/shard.sbatch", "--num-cpus", "2", "--port", str(free_port()), "--", str(src),
            str(out), "--shard-size", "4", "--max-size", "32", "--no-progress"]
    try:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not _receipts(out):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
                time.sleep(0.02)
            job = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGUSR1)
            output, _ = proc.communicate(timeout=120)
            _, alive = psutil.wait_procs(job, timeout=60)
            assert not alive, f"still running: {[p.cmdline() for p in alive]}"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        assert proc.returncode == 0, output[-3000:]
        assert re.search(r"data_prep exited with status [0-9]+ after SIGUSR1", output), output[-3000:]
        assert log.read_text().splitlines()[-1] == "scontrol requeue 777"  # after data_prep and Ray stopped
        kept = _receipts(out)
        assert 0 < len(kept) < 16 and not (out / "_info.json").exists()

        again = subprocess.run(args, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                               text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "requeues so far: 1" in again.stdout
        assert f"resumed listing: {len(kept)} of 16 parts already listed" in again.stderr, again.stderr[-3000:]
        after = _receipts(out)
        assert len(after) == 16 and {name: after[name] for name in kept} == kept
        info = json.loads((out / "_info.json").read_text())
        assert info["splits"]["train"]["num_samples"] == 2 * 16  # (the damaged tar lost its README and padding)
    finally:
        shutil.rmtree(ray_home, ignore_errors=True)

# ------------------------------------------------------------------------------------- torchrun, deepspeed
def test_torchrun_sh_multi_node_and_elastic():
    base = ["launch/torchrun.sh", "--config", DEMO, "train.steps=5", "--nproc-per-node", "2", "--dry-run"]
    per_node = []
    for rank in (0, 1):
        res = sh([*base, "--nnodes", "1:2", "--node-rank", rank, "--rdzv-endpoint", "node0:29400"])
        assert res.returncode == 0, res.stderr
        (cmd,) = commands(res.stdout)
        a = _torchrun_args(cmd)
        assert (a.nnodes, a.node_rank, a.rdzv_backend, a.rdzv_endpoint) == ("1:2", rank, "c10d", "node0:29400")
        assert a.module and a.training_script_args == ["--config", DEMO, "train.steps=5"]
        per_node.append(a.rdzv_id)
    assert per_node[0] == per_node[1] and per_node[0].startswith("coatnet-")  # one job id on every node
    (cmd,) = commands(sh([*base]).stdout)
    assert _torchrun_args(cmd).standalone  # one node, no endpoint: a local rendezvous


def test_config_check_uses_the_launched_modules_defaults(tmp_path):
    lines = (REPO / "configs/demo/finetune.yaml").read_text().splitlines(keepends=True)
    config = tmp_path / "finetune_no_run_dir.yaml"
    config.write_text("".join(line for line in lines if not line.startswith("run_dir:")))
    base = ["launch/torchrun.sh", "--config", config, "--dry-run"]
    finetune = sh([*base, "--module", "pipeline.finetune"])
    assert finetune.returncode == 0, finetune.stderr
    assert "runs/demo/finetune" in finetune.stdout and "runs/demo/pretrain" not in finetune.stdout  # resume/fresh note
    pretrain = sh(base)  # the same file launched as pretraining gets pretraining's default run_dir
    assert "runs/demo/pretrain" in pretrain.stdout and "runs/demo/finetune" not in pretrain.stdout, pretrain.stderr


def test_deepspeed_sh_hostfile_and_no_ssh(tmp_path):
    from deepspeed.launcher.runner import parse_args
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode0 slots=8\nnode1 slots=8\n")
    base = ["launch/deepspeed.sh", "--hostfile", hostfile, "--config", DEMO, "train.steps=5", "--dry-run"]
    res = sh([*base, "--num-nodes", "1", "--master-port", "29411"])
    assert res.returncode == 0, res.stderr
    (cmd,) = commands(res.stdout)
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    a = parse_args(cmd[3:])
    assert (a.hostfile, a.num_nodes, a.master_port, a.no_ssh) == (str(hostfile), 1, 29411, False)
    assert a.module and a.user_script == "pipeline.pretrain" and a.user_args == ["--config", DEMO, "train.steps=5"]
    res = sh([*base, "--no-ssh", "--node-rank", "1", "--master-addr", "node0"])
    (cmd,) = commands(res.stdout)
    a = parse_args(cmd[3:])
    assert (a.no_ssh, a.node_rank, a.master_addr) == (True, 1, "node0") and a.user_script == "pipeline.pretrain"
    assert "node rank 1 of 2" in res.stdout
    one_line_error(sh([*base, "--no-ssh", "--node-rank", "1"]), "--master-addr")
    one_line_error(sh([*base, "--no-ssh", "--node-rank", "2", "--master-addr", "node0"]), "out of range")
    example = (REPO / "launch/hostfile.example").read_text()
    assert "slots=" in example and parse_args(["--hostfile", "launch/hostfile.example", "x"]).hostfile


def test_missing_or_wrong_settings_fail_in_one_line(slurm):
    env, _, _ = slurm
    one_line_error(sh(["launch/slurm/pretrain.sbatch", "--config", DEMO, "--dry-run"]), "SLURM_JOB_ID", "sbatch")
    one_line_error(sh(["launch/slurm/pretrain.sbatch", "--dry-run"], env), "--config")
    one_line_error(sh(["launch/slurm/pretrain.sbatch", "--config", "nope.yaml", "--dry-run"], env), "nope.yaml")
    one_line_error(sh(["launch/torchrun.sh", "--config", DEMO, "train.stepz=3", "--dry-run"]), "train.stepz")
    one_line_error(sh(["launch/torchrun.sh", "--config", DEMO, "--nnodes", "2", "--dry-run"]), "--rdzv-endpoint")
    one_line_error(sh(["launch/torchrun.sh", "--config", DEMO, "steps", "--dry-run"]), "key=value")
    one_line_error(sh(["launch/torchrun.sh", "--config", DEMO, "--bogus", "--dry-run"]), "--bogus")
    one_line_error(sh(["launch/deepspeed.sh", "--config", DEMO, "--dry-run"]), "--hostfile")
    one_line_error(sh(["launch/slurm/shard.sbatch", "--dry-run"], env), "after --")
    one_line_error(sh(["launch/ray_cluster.sh", "stop", "--temp-dir", "/nonexistent-coatnet"]), "no cluster recorded")
    one_line_error(sh(["launch/ray_cluster.sh", "start", "--workers", "10.9.9.9", "--temp-dir", "/nonexistent-coatnet",
                       "--dry-run"]), "10.9.9.9", "--head")


def test_ray_cluster_temp_dir_must_be_private_and_state_is_never_run(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    shared.chmod(0o770)  # group-writable: someone else could plant the state file or read the token
    (shared / "cluster.env").write_text("HEAD=127.0.0.1\nPORT=1\nWORKERS=\n")
    one_line_error(sh(["launch/ray_cluster.sh", "stop", "--temp-dir", shared, "--dry-run"]), str(shared), "chmod 700")
    shared.chmod(0o700)
    planted = tmp_path / "planted"
    # `source` would run the touch and take PATH; the reader takes HEAD, PORT and WORKERS as plain text
    (shared / "cluster.env").write_text(f"HEAD=127.0.0.1\nPORT=1\ntouch {planted}\nPATH=/nowhere\nWORKERS=\n")
    res = sh(["launch/ray_cluster.sh", "stop", "--temp-dir", shared, "--dry-run"])
    assert res.returncode == 0, res.stderr
    assert not planted.exists() and "stopped the Ray cluster 127.0.0.1:1" in res.stdout
    assert "node-0.pid" in res.stdout and "node-1" not in res.stdout  # the head only: WORKERS names no host


# --------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_ray_cluster_head_and_worker_on_loopback_run_data_prep(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    py = sys.executable
    subprocess.run([py, "-m", "data_prep", "demo-data", str(tmp_path / "img"), "--classes", "2", "--per-class", "12",
                    "--size", "32", "--seed", "0"], check=True, capture_output=True, env=_env(RAY_ADDRESS=""))
    try:
        res = sh(["launch/ray_cluster.sh", "start", "--head", "127.0.0.1", "--workers", "127.0.0.1", "--num-cpus",
                  "1", "--temp-dir", temp_dir], _env(RAY_ADDRESS=""), timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "2 live Ray node(s)" in res.stdout
        port = next(line.split("=", 1)[1] for line in Path(temp_dir, "cluster.env").read_text().splitlines()
                    if line.startswith("PORT="))
        assert oct(Path(temp_dir, "auth_token").stat().st_mode & 0o777) == "0o600"
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": f"{temp_dir}/auth_token"}
        shard = subprocess.run([py, "-m", "data_prep", "shard", str(tmp_path / "img"), str(tmp_path / "shards"),
                                "--split", "train", "--shard-size", "4", "--workers", "2", "--ray-address",
                                f"127.0.0.1:{port}", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                               env=_env(RAY_ADDRESS="", **auth), timeout=180)
        assert shard.returncode == 0, shard.stderr[-3000:]
        assert "2 node(s)" in shard.stderr
        info = json.loads((tmp_path / "shards" / "_info.json").read_text())["splits"]["train"]
        assert info["num_samples"] == 24 and len(info["filenames"]) == 6
    finally:
        stop = sh(["launch/ray_cluster.sh", "stop", "--temp-dir", temp_dir], timeout=120)
    assert stop.returncode == 0, stop.stderr
    # Exactly this cluster's processes are gone (they all carry its temp dir on their command line).
    ours = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
    assert ours == [], ours
    assert not Path(temp_dir, "cluster.env").exists() and not Path(temp_dir, "auth_token").exists()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _metrics(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and everything under it: torchrun starts its workers in their own sessions,
    so killing the agent's process group alone would leave the ranks running."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/complete.json"))


@pytest.mark.slow
def test_two_nodes_lose_one_mid_run_and_resume_on_one_node(tmp_path, demo_shards):
    """Two torchrun agents (--nnodes 2, node ranks 0/1, c10d on 127.0.0.1) train through launch/torchrun.sh.
    Once a checkpoint is complete, node 1 dies (SIGKILL of its agent and its rank); the scheduler then ends
    the job on node 0 too, as SLURM does when a node of the allocation fails. The same command on node 0
    alone resumes from the newest complete checkpoint on the smaller world and trains to the end."""
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", f"data.train={demo_shards}", "data.val=null", "data.image_size=32",
                 "data.num_workers=1", "data.shuffle_buffer=16", "data.randaugment_layers=0", "model.name=coatnet-tiny",
                 "train.global_batch_size=8", "train.micro_batch_size=4", "train.log_every=1", "optim.warmup_steps=1",
                 "checkpoint.every_steps=2", "deepspeed.zero_stage=1", "train.steps=40"]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes, log_files = [], [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    try:
        for rank, log_file in enumerate(log_files):  # files, not pipes: a full pipe would stall a rank
            with open(log_file, "w") as handle:
                nodes.append(subprocess.Popen(
                    ["bash", "launch/torchrun.sh", "--config", DEMO, *overrides, "--nnodes", "2",
                     "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-endpoint", endpoint],
                    cwd=REPO, env=_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 300
        while not _complete_steps(run_dir) and time.monotonic() < deadline:
            assert all(node.poll() is None for node in nodes), "\n=====\n".join(f.read_text()[-3000:] for f in log_files)
            time.sleep(0.5)
        assert _complete_steps(run_dir), "no checkpoint completed in time"
        _kill_tree(nodes[1].pid)  # node 1 is lost
    finally:
        for node in nodes:  # the scheduler ends what is left of the job
            _kill_tree(node.pid)
            node.wait()
    logs = [f.read_text() for f in log_files]
    assert "on 2 rank(s)" in logs[0], logs[0][-3000:]
    before = _metrics(run_dir)
    resumed_from = _complete_steps(run_dir)[-1]
    assert 2 <= resumed_from < 40 and max(before) >= resumed_from

    # The same launcher, config and overrides on node 0 alone, on a new rendezvous: the trainer finds
    # run_dir's newest complete checkpoint and converts it for the new world size.
    res = sh(["launch/torchrun.sh", "--config", DEMO, *overrides, "--nnodes", "1", "--node-rank", "0",
              "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"], timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert f"-> step_{resumed_from:08d}" in res.stdout
    assert "on 1 rank(s)" in out and "universal checkpoint" in out
    after = _metrics(run_dir)
    assert sorted(after) == list(range(1, 41))
    # Steps up to the checkpoint keep their history; training continues from there, not from zero.
    assert {s: after[s]["loss"] for s in range(1, resumed_from + 1)} == {s: before[s]["loss"] for s in range(1, resumed_from + 1)}
    assert after[resumed_from + 1]["samples_seen"] == (resumed_from + 1) * 8 and after[40]["samples_seen"] == 40 * 8
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"
