"""pipeline.weights.pretrained: reading weights from every source, and the fine-tune start (tables, head, strict load)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import model
from pipeline.weights.pretrained import PretrainedError, init_from_pretrained, load_weights

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]

# Two real DeepSpeed runs of coatnet-tiny at 32 px in the trainer's run-folder layout (config.yaml, classes.json,
# checkpoints/step_XXXXXXXX with the trainer's signed complete.json marker, and a universal conversion under
# checkpoints/universal/), made with deepspeed.initialize + engine.save_checkpoint in one process:
#   zero1: ZeRO-1, bf16, fp32 gradient accumulation (as the trainer runs it): DeepSpeed's BF16_Optimizer, whose
#          checkpoints zero_to_fp32 refuses (pipeline.weights.zero_checkpoint reads its fp32 partitions itself)
#   zero2: ZeRO-2, bf16 (the fp32 master weights live in the optimizer partitions only)
#   zero3: ZeRO-3, fp32
# Each holds two steps; step 2's client state carries an "ema" as checkpoints did before the trainer wrote per-rank
# EMA fragment files (a full copy: reading it stays supported; tests/test_ema_sharded.py covers the fragments),
# holding the initial weights, so it differs from the trained ones. reference.pt is what the engine trained: the
# full fp32 master weights and the buffers.
DEEPSPEED_RUNS = textwrap.dedent('''
    import argparse, json, os, socket, sys
    import torch
    import torch.nn.functional as F

    out = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.utils import safe_get_full_fp32_param

    import model
    from pipeline.checkpoint.trust import mark_signed
    from pipeline.config import load_config, save_config

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    classes = json.loads(sys.argv[2])
    for stage, precision in ((1, "bf16"), (2, "bf16"), (3, "fp32")):
        torch.manual_seed(stage)
        net = model.create_model("coatnet-tiny", num_classes=len(classes), image_size=32)
        ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
        run = os.path.join(out, f"zero{stage}")
        ckpt = os.path.join(run, "checkpoints")
        os.makedirs(ckpt)
        save_config(load_config(None, [f"run_dir={run}", "model.name=coatnet-tiny", "data.image_size=32",
                                       f"deepspeed.zero_stage={stage}", f"precision={precision}"]),
                    os.path.join(run, "config.yaml"))
        with open(os.path.join(run, "classes.json"), "w") as f:
            json.dump({"classes": classes}, f)
        ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                     "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision == "bf16"},
                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                     # BatchNorm on CPU wants its running stats in the parameters' dtype.
                     "data_types": {"buffer_dtype": precision}}
        if stage == 1:
            ds_config["data_types"]["grad_accum_dtype"] = "fp32"
        engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=ds_config)
        assert stage != 1 or type(engine.optimizer).__name__ == "BF16_Optimizer"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for step in (1, 2):
            x, y = torch.randn(4, 3, 32, 32, dtype=dtype), torch.randint(0, len(classes), (4,))
            engine.backward(F.cross_entropy(engine(x).float(), y))
            engine.step()
            tag = f"step_{step:08d}"
            client = {"step": step, "model_config": net.config.to_dict(), "classes": classes,
                      "ema": ema if step == 2 else None}
            engine.save_checkpoint(ckpt, tag=tag, client_state=client)
            mark_signed(os.path.join(ckpt, tag), {"step": step, "world_size": 1, "zero_stage": stage})
        persistent = set(engine.module.state_dict())
        reference = {n: safe_get_full_fp32_param(p).detach().float().clone()
                     for n, p in engine.module.named_parameters()}
        reference.update({n: b.detach().clone() for n, b in engine.module.named_buffers() if n in persistent})
        torch.save({"trained": reference, "ema": ema}, os.path.join(run, "reference.pt"))
        ds_to_universal.main(argparse.Namespace(
            input_folder=os.path.join(ckpt, "step_00000002"),
            output_folder=os.path.join(ckpt, "universal", "step_00000002"), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        mark_signed(os.path.join(ckpt, "universal", "step_00000002"), {"step": 2, "world_size": 1, "zero_stage": stage})
        engine.destroy()
''')

_RUNS: dict[str, Path] = {}


def deepspeed_runs(tmp_path_factory) -> Path:
    """The folder holding zero1/, zero2/ and zero3/ (made once per session, shared with test_evaluate_export)."""
    if "runs" not in _RUNS:
        out = tmp_path_factory.mktemp("deepspeed_runs")
        proc = subprocess.run([sys.executable, "-c", DEEPSPEED_RUNS, str(out), json.dumps(CLASSES)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _RUNS["runs"] = out
    return _RUNS["runs"]


def reference(run: Path, which: str = "trained") -> dict:
    return torch.load(run / "reference.pt", weights_only=True)[which]


def assert_same_state(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == (torch.float32 if value.is_floating_point() else value.dtype), key
        assert torch.equal(actual[key], value.float() if value.is_floating_point() else value), key


def random_model(name="coatnet-tiny", num_classes=5, image_size=64, seed=0):
    torch.manual_seed(seed)
    net = model.create_model(name, num_classes=num_classes, image_size=image_size)
    with torch.no_grad():  # distinct values everywhere (zero biases would hide a wrong row copy)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def write_export(net, folder: Path, classes=None) -> Path:
    """The layout `python -m pipeline.export` writes: model.safetensors + config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"model": {k: v for k, v in net.config.to_dict().items() if k != "grad_checkpointing"},
              "classes": classes, "image_size": list(net.config.image_size)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ------------------------------------------------------------------------------------------------ head
def test_head_rows_copied_for_shared_class_names_only():
    source_classes = ["n01", "n02", "n03", "n04", "n05"]
    source = random_model(num_classes=5, seed=0)
    target_classes = ["n04", "dog", "n01", "cat", "n05", "n02x"]
    target = model.create_model("coatnet-tiny", num_classes=len(target_classes), image_size=64)
    fresh_w, fresh_b = target.head.weight.detach().clone(), target.head.bias.detach().clone()
    src = source.state_dict()

    report = init_from_pretrained(target, (src, {"classes": source_classes, "source": "mem"}), target_classes)

    assert report["head"] == "replaced"
    assert report["copied_rows"] == [[0, 3, "n04"], [2, 0, "n01"], [4, 4, "n05"]]
    assert report["head_rows_copied"] == 3
    assert report["missing_keys"] == [] and report["unexpected_keys"] == []
    w, b = target.head.weight.detach(), target.head.bias.detach()
    for i, j, _ in report["copied_rows"]:
        assert torch.equal(w[i], src["head.weight"][j]) and torch.equal(b[i], src["head.bias"][j])
    for i in (1, 3, 5):  # not in the source: the model's own fresh initialisation, untouched
        assert torch.equal(w[i], fresh_w[i]) and torch.equal(b[i], fresh_b[i])
        assert not any(torch.equal(w[i], src["head.weight"][j]) for j in range(5))
    for key, value in target.state_dict().items():  # the body is the pretrained one
        if not key.startswith("head."):
            assert torch.equal(value, src[key]), key


def test_head_kept_for_the_same_label_set_and_fresh_without_names(tmp_path):
    source = random_model(num_classes=3, seed=1)
    folder = write_export(source, tmp_path / "exp", classes=CLASSES)
    target = model.create_model("coatnet-tiny", num_classes=3, image_size=64)
    report = init_from_pretrained(target, str(folder), CLASSES)
    assert report["head"] == "kept" and report["head_rows_copied"] == 3
    assert torch.equal(target.head.weight, source.head.weight)

    unnamed = write_export(source, tmp_path / "unnamed", classes=None)
    target = model.create_model("coatnet-tiny", num_classes=3, image_size=64)
    fresh = target.head.weight.detach().clone()
    report = init_from_pretrained(target, str(unnamed), ["a", "b", "c"])
    assert report["head"] == "replaced" and report["copied_rows"] == []
    assert torch.equal(target.head.weight, fresh)


# ------------------------------------------------------------------------------------ resolution change
def test_tables_resized_64_to_128_and_everything_else_loads_strictly(tmp_path):
    source = random_model(num_classes=5, image_size=64, seed=2)
    folder = write_export(source, tmp_path / "exp64", classes=[f"c{i}" for i in range(5)])
    target = model.create_model("coatnet-tiny", num_classes=5, image_size=128)

    report = init_from_pretrained(target, str(folder))

    src = source.state_dict()
    tables = sorted(k for k in src if k.endswith(model.TABLE_SUFFIX))
    assert sorted(report["resized_tables"]) == tables and len(tables) == 3
    heads = {k: src[k].shape[0] for k in tables}
    for key, (old, new) in report["resized_tables"].items():
        # S3 (stride 16): 4x4 -> 8x8 tokens, (2H-1)^2 offsets 7x7 -> 15x15; S4 (stride 32): 3x3 -> 7x7.
        side_old, side_new = (7, 15) if key.startswith("stages.2.") else (3, 7)
        assert old == [heads[key], side_old, side_old] and new == [heads[key], side_new, side_new]
    expected = model.resize_rel_pos_tables(src, (128, 128))
    own = target.state_dict()
    assert set(own) == set(src)
    for key in own:
        assert torch.equal(own[key], expected[key]), key
    assert report["head"] == "kept" and report["missing_keys"] == [] and report["unexpected_keys"] == []
    with torch.no_grad():
        logits = target.eval()(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------- bad sources
def test_unreadable_or_mismatched_sources_give_one_line_errors(tmp_path):
    nano = write_export(random_model("coatnet-nano", num_classes=3, image_size=64), tmp_path / "nano")
    with pytest.raises(PretrainedError) as err:
        init_from_pretrained(model.create_model("coatnet-tiny", num_classes=3, image_size=64), str(nano))
    message = str(err.value)
    assert "\n" not in message and "model.safetensors" in message and "coatnet-nano" in message

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PretrainedError) as err:
        load_weights(str(garbage))
    assert str(garbage) in str(err.value) and "\n" not in str(err.value)

    with pytest.raises(PretrainedError) as err:
        load_weights(str(tmp_path / "nowhere"))
    assert "nowhere" in str(err.value) and "run folder" in str(err.value)

    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(PretrainedError, match="neither a run folder"):
        load_weights(str(empty))


# -------------------------------------------------------------------------------- DeepSpeed checkpoints
@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["zero1", "zero2", "zero3"])
def test_deepspeed_checkpoints_give_the_engines_fp32_weights(tmp_path_factory, run_name):
    run = deepspeed_runs(tmp_path_factory) / run_name
    trained, ema = reference(run), reference(run, "ema")
    ckpt = run / "checkpoints"
    sources = {"run folder": run, "save dir": ckpt, "tag folder": ckpt / "step_00000002",
               "universal": ckpt / "universal" / "step_00000002"}
    for what, source in sources.items():
        state, meta = load_weights(str(source), ema=False)
        assert_same_state(state, trained)
        assert meta["step"] == 2 and meta["ema"] is False, what
        assert meta["format"] == ("universal" if what == "universal" else "deepspeed"), what
        assert meta["classes"] == CLASSES and meta["image_size"] == [32, 32] and meta["num_classes"] == 3, what
        assert meta["model_config"]["name"] == "coatnet-tiny", what
        net = model.create_model(**meta["model_config"])
        net.load_state_dict(state, strict=True)
    state, meta = load_weights(str(run))  # EMA when present
    assert meta["ema"] is True
    assert_same_state(state, ema)
    state, meta = load_weights(str(ckpt / "step_00000001"), ema=True)  # step 1 has no EMA
    assert meta["step"] == 1 and meta["ema"] is False
    assert not torch.equal(state["head.weight"], trained["head.weight"])


@pytest.mark.slow
def test_run_folder_skips_a_checkpoint_killed_during_its_save(tmp_path_factory, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(deepspeed_runs(tmp_path_factory) / "zero2", run)
    ckpt = run / "checkpoints"
    # A kill mid-save: the tag folder exists, a file is cut short, DeepSpeed's `latest` already names it,
    # and the trainer's complete.json marker was never written.
    broken = ckpt / "step_00000003"
    shutil.copytree(ckpt / "step_00000002", broken)
    (broken / "complete.json").unlink()
    states = broken / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    (ckpt / "latest").write_text("step_00000003")

    state, meta = load_weights(str(run), ema=False)
    assert meta["checkpoint"] == str(ckpt / "step_00000002") and meta["step"] == 2
    assert_same_state(state, reference(run))


@pytest.mark.slow
def test_fine_tune_start_from_a_zero3_run(tmp_path_factory):
    run = deepspeed_runs(tmp_path_factory) / "zero3"
    trained = reference(run)
    target_classes = ["square", "dog", "circle", "cat"]
    target = model.create_model("coatnet-tiny", num_classes=4, image_size=64)
    report = init_from_pretrained(target, str(run), target_classes, ema=False)
    assert report["copied_rows"] == [[0, 1, "square"], [2, 0, "circle"]]
    assert len(report["resized_tables"]) == 3 and report["step"] == 2 and report["format"] == "deepspeed"
    assert torch.equal(target.head.weight[0], trained["head.weight"][1])
    assert torch.equal(target.stem.conv1.weight, trained["stem.conv1.weight"])


@pytest.mark.slow
def test_checkpoint_this_tool_did_not_write_needs_trust(tmp_path, tmp_path_factory):
    """A DeepSpeed checkpoint is a pickle: without the trainer's signed completion marker it is read only when the
    user says they trust it, and the refusal is a one-line error that says how."""
    tag = deepspeed_runs(tmp_path_factory) / "zero2" / "checkpoints" / "step_00000002"
    foreign = tmp_path / "foreign" / tag.name
    shutil.copytree(tag, foreign)
    (foreign / "complete.json").unlink()
    from pipeline.checkpoint.trust import UntrustedCheckpoint

    with pytest.raises(UntrustedCheckpoint, match="no readable completion marker.*--trust-checkpoint"):
        load_weights(str(foreign))
    trusted, _ = load_weights(str(foreign), trust_pickle=True)
    ours, _ = load_weights(str(tag))
    assert trusted.keys() == ours.keys() and all(torch.equal(trusted[k], ours[k]) for k in ours)


# ------------------------------------------------------------------------- one rank reads for all ranks
def _as_ranks(world: int, fn) -> list:
    """fn(rank, barrier) on `world` threads standing in for ranks; [result or exception per rank]."""
    import threading

    barrier, results = threading.Barrier(world, timeout=120), [None] * world

    def body(rank):
        try:
            results[rank] = fn(rank, barrier.wait)
        except Exception as e:  # noqa: BLE001 - compared by the test
            results[rank] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a rank is stuck at a barrier"
    return results


def _counting_reader(monkeypatch) -> list:
    """Record which thread ("rank") runs load_weights."""
    import threading

    from pipeline.weights import shared as shared_weights

    calls, real = [], shared_weights.load_weights

    def counted(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(shared_weights, "load_weights", counted)
    return calls


@pytest.mark.slow
def test_deepspeed_pretrained_is_read_by_one_rank_for_all(tmp_path_factory, tmp_path, monkeypatch):
    from pipeline.weights.shared import load_weights_once

    run = deepspeed_runs(tmp_path_factory) / "zero2"
    calls = _counting_reader(monkeypatch)
    cache = tmp_path / "finetune" / "pretrained.fp32.safetensors"
    results = _as_ranks(3, lambda rank, barrier: load_weights_once(str(run), rank == 0, barrier, str(cache),
                                                                    ema=False))
    assert len(calls) == 1, calls  # the main rank only; the others read its safetensors copy
    direct_state, direct_meta = load_weights(str(run), ema=False)
    for state, meta in results:
        assert_same_state(state, direct_state)
        assert meta == json.loads(json.dumps(direct_meta))
    assert not cache.exists(), "the shared copy is removed once every rank has read it"
    target = model.create_model("coatnet-tiny", num_classes=3, image_size=64)
    report = init_from_pretrained(target, results[1], CLASSES)
    assert report["head"] == "kept" and report["format"] == "deepspeed" and report["source"] == str(run)


def test_shared_read_of_an_export_and_of_a_bad_source(tmp_path, monkeypatch):
    from pipeline.weights.shared import load_weights_once

    folder = write_export(random_model(num_classes=3, seed=4), tmp_path / "exp", classes=CLASSES)
    calls = _counting_reader(monkeypatch)
    cache = tmp_path / "cache.safetensors"
    results = _as_ranks(2, lambda rank, barrier: load_weights_once(str(folder), rank == 0, barrier, str(cache)))
    assert len(calls) == 2 and not cache.exists()  # an export is safetensors already: each rank reads it
    assert all(torch.equal(r[0]["head.weight"], results[0][0]["head.weight"]) for r in results)
    # A missing source: every rank raises the same one-line error, none waits forever at a barrier.
    results = _as_ranks(2, lambda rank, barrier: load_weights_once(str(tmp_path / "nowhere"), rank == 0, barrier,
                                                                   str(cache)))
    assert all(isinstance(r, PretrainedError) and "nowhere" in str(r) for r in results)
    state, _ = load_weights_once(str(folder), True, None, str(cache))  # one rank: a plain load_weights
    assert state.keys() == load_weights(str(folder))[0].keys()


@pytest.mark.slow
def test_fine_tuning_from_a_run_that_has_not_finished_is_refused_unless_a_checkpoint_is_named(tmp_path_factory,
                                                                                               tmp_path):
    import shutil
    from types import SimpleNamespace

    from pipeline.checkpoint.layout import FINISHED
    from pipeline.runtime.distributed import DistInfo
    from pipeline.weights.pretrained import require_finished

    run = tmp_path / "run"
    shutil.copytree(deepspeed_runs(tmp_path_factory) / "zero2", run)  # two saved steps, never marked finished
    with pytest.raises(PretrainedError, match=r"has not finished training .*step_00000002.*pretrained_unfinished"):
        require_finished(str(run))
    with pytest.raises(PretrainedError, match="has not finished"):  # the run's checkpoint folder is the run
        require_finished(str(run / "checkpoints") + "/")
    require_finished(str(run / "checkpoints" / "step_00000002"))  # a named checkpoint: the user means it
    (run / FINISHED).write_text(json.dumps({"step": 2, "total_steps": 2}))
    require_finished(str(run))
    # Through the config and build_model, as a fine-tune launch reads it: refused in one line before any load.
    from pipeline.config import load_config
    from pipeline.train.build import build_model

    (run / FINISHED).unlink()
    cfg = load_config(None, [f"run_dir={tmp_path / 'ft'}", f"pretrained={run}", "model.name=coatnet-tiny",
                             "data.image_size=32", "precision=fp32"])
    plan = SimpleNamespace(classes=CLASSES, num_classes=len(CLASSES), shards=None)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                    backend="gloo")
    with pytest.raises(PretrainedError, match="has not finished"):
        build_model(cfg, plan, info, from_pretrained=True)
    cfg.pretrained_unfinished = True
    assert build_model(cfg, plan, info, from_pretrained=True).head.weight.shape[0] == len(CLASSES)
