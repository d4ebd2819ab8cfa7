"""Untrusted checkpoints, private files and launch arguments (issue 22, pipeline.checkpoint.trust, core.files).

A crafted checkpoint folder (any complete.json, and a model-states file that is a pickle whose __reduce__ makes a
file) must be refused by export, evaluate, fine-tune and resume before the pickle runs; a real checkpoint signed by
another key needs --trust-checkpoint; everything the tool writes has no group/other permission bits.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.errors import UserError, cli_main

REPO = Path(__file__).resolve().parents[1]


class _MakesAFile:
    """Unpickling this creates `path`: the proof that a pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_tag(folder: Path, pwned: Path) -> Path:
    """`folder` as a DeepSpeed tag an attacker planted: a marker and a model-states pickle that runs code."""
    folder.mkdir(parents=True)
    (folder / "complete.json").write_text(json.dumps({"step": 5, "world_size": 1, "zero_stage": 0}))
    torch.save({"module": _MakesAFile(str(pwned))}, folder / "mp_rank_00_model_states.pt")
    return folder


def cli(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def assert_refused(res: subprocess.CompletedProcess, *words: str) -> None:
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-4000:]
    assert err and err[-1].startswith("error: ") and "Traceback" not in res.stderr, res.stderr[-4000:]
    for word in words:
        assert word in err[-1], err[-1]


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


# ------------------------------------------------------------------------------ crafted folder, no DeepSpeed
def test_export_and_evaluate_refuse_a_crafted_folder_before_unpickling(tmp_path):
    pwned = tmp_path / "PWNED"
    tag = crafted_tag(tmp_path / "run" / "global_step5", pwned)
    res = cli(["-m", "pipeline.export", str(tag), str(tmp_path / "out")])
    assert_refused(res, "refusing to read the checkpoint", "not signed", "--trust-checkpoint")
    res = cli(["-m", "pipeline.evaluate", "--weights", str(tag), "--data", str(tmp_path / "shards")])
    assert_refused(res, "refusing to read the checkpoint", "--trust-checkpoint")
    assert not pwned.exists() and not (tmp_path / "out").exists()


def test_a_marker_is_refused_when_altered_signed_by_another_key_or_files_change(tmp_path, monkeypatch):
    from pipeline.checkpoint.trust import UntrustedCheckpoint, load_key, mark_signed, require_trusted, tag_problem

    monkeypatch.setenv("COATNET_CHECKPOINT_KEY", str(tmp_path / "keys" / "mine"))
    tag = tmp_path / "tag"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    mark_signed(str(tag), {"step": 1})
    marker = json.loads((tag / "complete.json").read_text())
    assert tag_problem(str(tag), marker) is None
    assert "altered" in tag_problem(str(tag), {**marker, "step": 2})
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    assert "not among the files" in tag_problem(str(tag), marker)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"swapped")
    assert "not the file its signed marker records" in tag_problem(str(tag), marker)
    (tag / "mp_rank_00_model_states.pt").unlink()  # damage, left to resume's digest check (it falls back)
    assert tag_problem(str(tag), marker, digests=False) is None and "No such file" in tag_problem(str(tag), marker)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    os.chmod(tag, 0o775)
    assert "writable by group or others" in tag_problem(str(tag), marker)
    os.chmod(tag, 0o700)
    monkeypatch.setenv("COATNET_CHECKPOINT_KEY", str(tmp_path / "keys" / "theirs"))
    with pytest.raises(UntrustedCheckpoint, match="no checkpoint key"):
        require_trusted(str(tag), marker, trust=False)
    assert not (tmp_path / "keys" / "theirs").exists()  # verifying never makes a key
    load_key(create=True)
    with pytest.raises(UntrustedCheckpoint, match="signed with another key.*--trust-checkpoint"):
        require_trusted(str(tag), marker, trust=False)
    require_trusted(str(tag), marker, trust=True)


def test_key_is_made_private_and_a_readable_key_is_refused(tmp_path, monkeypatch):
    from pipeline.checkpoint.trust import load_key

    path = tmp_path / "cfg" / "checkpoint.key"
    monkeypatch.setenv("COATNET_CHECKPOINT_KEY", str(path))
    assert load_key(create=False) is None
    key = load_key(create=True)
    assert len(key) == 32 and load_key(create=True) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    os.chmod(path, 0o644)
    with pytest.raises(UserError, match="chmod 600"):
        load_key(create=False)


def test_processes_creating_the_key_at_once_all_read_the_same_whole_key(tmp_path):
    """Ranks of a first run create the key together: none may read it half-written (empty), all get one key."""
    code = ("import os, time; from pipeline.checkpoint.trust import load_key; "
            "time.sleep(max(0.0, float(os.environ['AT']) - time.time())); print(load_key(create=True).hex())")
    keys = []
    for attempt in range(3):
        env = {**os.environ, "COATNET_CHECKPOINT_KEY": str(tmp_path / str(attempt) / "checkpoint.key"),
               "AT": str(time.time() + 3.0)}
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
        keys.append({out.strip() for out, _ in outs})
        assert list((tmp_path / str(attempt)).iterdir()) == [tmp_path / str(attempt) / "checkpoint.key"]
    assert all(len(k) == 1 for k in keys) and len(set().union(*keys)) == 3


# ------------------------------------------------------------------------------ files, config, launchers
def test_umask_and_exclusive_temp_files(tmp_path, monkeypatch):
    from core.files import apply_umask, atomic_write_json, new_temp, stale_temps

    old = os.umask(0o022)
    try:
        monkeypatch.setenv("COATNET_UMASK", "7z")
        with pytest.raises(ValueError, match="COATNET_UMASK"):
            apply_umask()
        assert cli_main(lambda argv: 0)([]) == 2  # the same line, as a user error of any command
        # A umask that lets others write would make this user's own checkpoints unresumable (refused as
        # possibly tampered with): refused at start instead, naming the value.
        monkeypatch.setenv("COATNET_UMASK", "002")
        with pytest.raises(ValueError, match="'002' lets group or others write"):
            apply_umask()
        monkeypatch.setenv("COATNET_UMASK", "027")
        assert apply_umask() == 0o027
        monkeypatch.delenv("COATNET_UMASK")
        assert apply_umask() == 0o077
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o600
        first, second = new_temp(tmp_path / "b"), new_temp(tmp_path / "b")
        assert first != second and stale_temps(tmp_path, "b") == sorted([first, second])
        victim = tmp_path / "victim"
        victim.write_text("kept")
        # A planted link at a predictable name is never followed: the name is unpredictable and O_EXCL.
        os.symlink(victim, tmp_path / f".c.tmp.{os.getpid()}")
        atomic_write_json(tmp_path / "c", {})
        assert victim.read_text() == "kept"
    finally:
        os.umask(old)


@pytest.mark.parametrize("override, words", [
    ("data.train=pipe:touch /tmp/x", ("data.train", "pipe:")),
    ("data.val=http://host/shard.tar", ("data.val", "s3")),
    ("data.train=s3://AKIAKEY:hunter2@bucket/shards", ("s3://***@bucket/shards", "credentials")),
])
def test_data_locations_are_local_or_object_store_without_credentials(override, words):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert all(w in message for w in words) and "hunter2" not in message and "AKIAKEY" not in message
    load_config(None, ["data.train=s3://bucket/shards", "data.val=/data/val"])


def test_pdsh_launch_refuses_what_a_remote_shell_would_run(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    base = ["launch/deepspeed.sh", "--hostfile", str(hostfile), "--config", "configs/demo/pretrain.yaml", "--dry-run"]

    def sh(args, env=None):
        return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHON": sys.executable, **(env or {})})

    for word in (f"run_dir=x$(touch {tmp_path}/PWNED)", "run_dir=x;id", "run_dir=a b"):
        res = sh([*base, word])
        assert res.returncode == 2 and "remote shell would interpret" in res.stderr, res.stderr
    res = sh([*base, "train.steps=3"], env={"PYTHONSTARTUP": "$(id)"})
    assert res.returncode == 2 and "PYTHONSTARTUP" in res.stderr, res.stderr
    res = sh([*base, "train.steps=3", "model.activation_checkpointing=[0,1]"])  # the planner's override
    assert res.returncode == 0, res.stderr
    assert "each host runs:" in res.stdout and "--module pipeline.pretrain --config configs/demo/pretrain.yaml " \
        "train.steps=3 'model.activation_checkpointing=[0,1]'" in res.stdout
    # --no-ssh runs no remote shell: the word is passed as one argument.
    res = sh([*base, "run_dir=x;id", "--no-ssh", "--node-rank", "0", "--master-addr", "node0"])
    assert res.returncode == 0 and "'run_dir=x;id'" in res.stdout, res.stderr
    hostfile.write_text("-oProxyCommand=touch slots=8\n")
    res = sh(base)
    assert res.returncode == 2 and "not a host name" in res.stderr
    res = sh(["launch/ray_cluster.sh", "start", "--workers", "-oProxyCommand=x", "--dry-run"])
    assert res.returncode == 2 and "not a host name" in res.stderr
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------ real runs
@pytest.mark.slow
def test_real_run_is_private_signed_and_crafted_checkpoints_are_refused(demo_shards, tmp_path):
    """A short real training run: its folder, config and checkpoint files are private, its export loads (signed
    by this session's key) and is private, another key needs --trust-checkpoint; a crafted checkpoint planted
    as its newest is refused by resume, and as `pretrained=` by fine-tune, without its pickle running."""
    info = demo_shards / "_info.json"
    assert private(info), oct(info.stat().st_mode)  # written by `python -m data_prep shard` under umask 077
    run_dir, pwned = tmp_path / "run", tmp_path / "PWNED"
    train = ["-m", "pipeline.pretrain", f"run_dir={run_dir}", f"data.train={demo_shards}", "data.val=null",
             "data.image_size=32", "data.num_workers=0", "model.name=coatnet-nano", "train.global_batch_size=8",
             "train.micro_batch_size=8", "train.steps=2", "checkpoint.every_steps=2", "precision=fp32"]
    res = cli(train, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    tag = run_dir / "checkpoints" / "step_00000002"
    for path in [run_dir, run_dir / "config.yaml", run_dir / "checkpoints", tag, *tag.iterdir()]:
        assert private(path), f"{path}: {oct(path.stat().st_mode)}"
    assert json.loads((tag / "complete.json").read_text())["signature"]["alg"] == "hmac-sha256"

    out = tmp_path / "export"
    res = cli(["-m", "pipeline.export", str(run_dir), str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(private(p) for p in (out, out / "model.safetensors", out / "config.json"))
    other_key = tmp_path / "other-user.key"  # another user's key (made as load_key makes one)
    other_key.write_text(os.urandom(32).hex() + "\n")
    other_key.chmod(0o600)
    other = {"COATNET_CHECKPOINT_KEY": str(other_key)}
    assert_refused(cli(["-m", "pipeline.export", str(run_dir), str(tmp_path / "x")], env=other), "another key")
    res = cli(["-m", "pipeline.export", str(run_dir), str(tmp_path / "x"), "--trust-checkpoint"], env=other)
    assert res.returncode == 0, res.stderr[-3000:]

    crafted_tag(run_dir / "checkpoints" / "step_00000005", pwned)
    assert_refused(cli([*train, "train.steps=6"], timeout=600), "refusing to resume", "checkpoint.trust=true")
    finetune = ["-m", "pipeline.finetune", f"run_dir={tmp_path / 'ft'}", f"pretrained={tmp_path / 'evil'}",
                *train[3:]]
    crafted_tag(tmp_path / "evil", pwned)
    assert_refused(cli(finetune, timeout=600), "refusing to read the checkpoint", "pretrained_trusted=true")
    assert not pwned.exists()


@pytest.mark.slow
def test_private_local_ray_has_a_token_and_a_temp_dir_of_its_own():
    """Loopback is shared by every user of the machine: the private Ray's servers and workers run with token
    authentication (a fresh token, never left in this process's environment) and keep their sessions in a 0700
    folder of their own, not the shared /tmp/ray."""
    import glob
    import tempfile

    import ray

    from data_prep.shard.cluster import init_local_ray

    if ray.is_initialized():
        pytest.skip("another module's Ray is running in this process")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "coatnet-ray-*")))
    init_local_ray(num_cpus=1)
    try:
        @ray.remote
        def auth() -> tuple:
            return os.environ.get("RAY_AUTH_MODE"), len(os.environ.get("RAY_AUTH_TOKEN", ""))

        assert ray.get(auth.remote()) == ("token", 64)
        assert "RAY_AUTH_TOKEN" not in os.environ and os.environ.get("RAY_AUTH_MODE") != "token"
        (made,) = set(glob.glob(os.path.join(tempfile.gettempdir(), "coatnet-ray-*"))) - before
        # Ray makes its own temp dir 0777; the folder around it keeps other users out.
        assert stat.S_IMODE(os.stat(made).st_mode) == 0o700 and glob.glob(os.path.join(made, "ray", "session_*"))
    finally:
        ray.shutdown()


def test_the_signing_key_is_made_or_refused_when_a_run_starts(tmp_path, monkeypatch):
    """Before the first save: a key that cannot be made (here its folder would be under a file) or that others
    can read stops the launch in one line, instead of the first checkpoint hours in."""
    from pipeline.checkpoint.trust import require_key

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("COATNET_CHECKPOINT_KEY", str(blocker / "checkpoint.key"))
    with pytest.raises(UserError, match="cannot create the checkpoint key .*COATNET_CHECKPOINT_KEY"):
        require_key(is_main=True)
    key = tmp_path / "keys" / "checkpoint.key"
    monkeypatch.setenv("COATNET_CHECKPOINT_KEY", str(key))
    require_key(is_main=True)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    key.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        require_key(is_main=True)
