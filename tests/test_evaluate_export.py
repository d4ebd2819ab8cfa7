"""pipeline.evaluation.loop / pipeline.evaluate (exact counts over ranks) and pipeline.export (loads without DeepSpeed)."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import model
from pipeline import evaluate as evaluate_cli
from pipeline import export as export_cli
from pipeline.evaluation.loop import build_eval_loader, evaluate
from tests.conftest import free_port
from tests.test_pretrained import CLASSES, deepspeed_runs, reference

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 21  # odd, and 7 per class
# 21 images in shards of 4 -> 6 shards (4, 4, 4, 4, 4, 1): not divisible by 2 ranks x 2 workers, and uneven, so
# the ranks hold 12 and 9 samples and run different numbers of batches.
SHARD_SIZE = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """data_prep's demo images of the label set the DeepSpeed runs use, sharded by data_prep (Ray)."""
    root = tmp_path_factory.mktemp("eval_data")
    py = sys.executable
    for cmd in ([py, "-m", "data_prep", "demo-data", str(root / "images"), "--classes", "3", "--per-class", "7",
                 "--size", "40", "--seed", "3", "--label-set", "shapes"],
                [py, "-m", "data_prep", "shard", str(root / "images"), str(root / "shards"), "--split", "val",
                 "--shard-size", str(SHARD_SIZE), "--seed", "0", "--workers", "2", "--no-progress"]):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    info = json.loads((root / "shards" / "_info.json").read_text())["splits"]["val"]
    assert info["classes"] == CLASSES and info["num_samples"] == NUM_IMAGES and len(info["filenames"]) == 6
    return root / "shards"


def _keys_seen(path: Path, world_size: int, num_workers: int) -> list[str]:
    keys = []
    for rank in range(world_size):
        loader, _ = build_eval_loader(str(path), "val", 32, 3, num_workers, rank, world_size, return_keys=True)
        for images, labels, batch_keys in loader:
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
            keys += batch_keys
    return keys


@pytest.mark.slow
def test_eval_loader_reads_every_sample_exactly_once(shards):
    everything = _keys_seen(shards, 1, 0)
    assert len(everything) == NUM_IMAGES == len(set(everything))
    # More ranks x workers than shards (8 ranks: two ranks get no shard at all), and splits that do not divide.
    for world_size, num_workers in ((2, 2), (3, 2), (4, 3), (8, 2)):
        seen = _keys_seen(shards, world_size, num_workers)
        assert collections.Counter(seen) == collections.Counter(everything), (world_size, num_workers)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """The ZeRO-2 (bf16) run exported twice with the CLI: EMA weights (the default) and --no-ema."""
    run = deepspeed_runs(tmp_path_factory) / "zero2"
    out = tmp_path_factory.mktemp("exports")
    assert export_cli.main([str(run), str(out / "ema")]) == 0
    assert export_cli.main([str(run), str(out / "trained"), "--no-ema"]) == 0
    # The same EMA weights in files of at most 1 MB: the layout CoAtNet-6/7 exports take above 5 GB.
    assert export_cli.main([str(run), str(out / "sharded"), "--max-shard-size", "1MB"]) == 0
    return {"run": run, "ema": out / "ema", "trained": out / "trained", "sharded": out / "sharded"}


# Loads exports with DeepSpeed made unimportable (as on a machine without it) and saves their logits.
LOAD_WITHOUT_DEEPSPEED = textwrap.dedent('''
    import sys

    class NoDeepSpeed:
        def find_spec(self, name, path=None, target=None):
            if name == "deepspeed" or name.startswith("deepspeed."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, NoDeepSpeed())
    import torch
    from pipeline.export import load_exported

    results = {}
    for folder in sys.argv[2:]:
        net, config = load_exported(folder)
        torch.manual_seed(0)
        with torch.no_grad():
            results[folder] = {"logits": net(torch.randn(4, 3, *config["image_size"])), "classes": config["classes"]}
    torch.save(results, sys.argv[1])
    assert "deepspeed" not in sys.modules, "deepspeed was imported"
''')


@pytest.mark.slow
def test_export_loads_without_deepspeed_and_gives_the_runs_logits(exports, tmp_path):
    config = json.loads((exports["ema"] / "config.json").read_text())
    assert config["classes"] == CLASSES and config["image_size"] == [32, 32] and config["ema"] is True
    assert sorted(os.listdir(exports["ema"])) == ["config.json", "model.safetensors"]
    sharded = sorted(os.listdir(exports["sharded"]))
    assert "model.safetensors" not in sharded and "model.safetensors.index.json" in sharded
    assert len([n for n in sharded if n.endswith(".safetensors")]) >= 2
    assert all(os.path.getsize(exports["sharded"] / n) <= 1_100_000 for n in sharded if n.endswith(".safetensors"))
    out = tmp_path / "logits.pt"
    folders = [str(exports["trained"]), str(exports["ema"]), str(exports["sharded"])]
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DEEPSPEED, str(out), *folders], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    for which, folder in zip(("trained", "ema", "ema"), folders):
        # The run's own weights, as the DeepSpeed engine held them (fp32 master weights / the EMA it saved).
        net = model.create_model("coatnet-tiny", num_classes=3, image_size=32)
        net.load_state_dict(reference(exports["run"], which), strict=True)
        torch.manual_seed(0)
        with torch.no_grad():
            expected = net.eval()(torch.randn(4, 3, 32, 32))
        assert results[folder]["classes"] == CLASSES
        torch.testing.assert_close(results[folder]["logits"], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(results[folders[0]]["logits"], results[folders[1]]["logits"])


@pytest.mark.slow
def test_evaluate_two_ranks_equals_one_process(shards, exports, tmp_path):
    # One process, through the CLI, on the run folder itself (EMA weights taken from the DeepSpeed checkpoint).
    single = tmp_path / "single.json"
    assert evaluate_cli.main(["--weights", str(exports["run"]), "--data", str(shards), "--batch-size", "3",
                              "--num-workers", "2", "--out", str(single)]) == 0
    # Two ranks under torchrun, on the export of the same EMA weights; 3-image batches so the ranks run
    # different numbers of batches (12 vs 9 samples over 2 workers each).
    multi = tmp_path / "multi.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "pipeline.evaluate", "--weights", str(exports["ema"]),
           "--data", str(shards), "--batch-size", "3", "--num-workers", "2", "--out", str(multi)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "top-1" in proc.stdout and "per-class top-1" in proc.stdout

    one, two = json.loads(single.read_text()), json.loads(multi.read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["ema"] and two["ema"]
    assert one["count"] == two["count"] == one["expected_count"] == NUM_IMAGES
    assert one["per_class_count"] == two["per_class_count"] == [7, 7, 7]
    for key in ("correct1", "correct5", "top1", "top5", "per_class_correct1", "per_class_top1"):
        assert one[key] == two[key], key
    assert [row["class"] for row in two["per_class"]] == CLASSES

    # And the library call in this process, from the same weights, counts the same.
    net, _ = export_cli.load_exported(exports["ema"])
    loader, _ = build_eval_loader(str(shards), "val", 32, 8, 0, 0, 1)
    direct = evaluate(net, loader, 3, torch.device("cpu"))
    assert {k: direct[k] for k in ("count", "correct1", "correct5", "per_class_correct1")} == \
        {k: one[k] for k in ("count", "correct1", "correct5", "per_class_correct1")}
    # The counts are what the predictions say, image by image.
    loader, _ = build_eval_loader(str(shards), "val", 32, 64, 0, 0, 1)
    images, labels = next(iter(loader))
    with torch.no_grad():
        predictions = net(images).argmax(-1)
    assert int((predictions == labels).sum()) == one["correct1"]


def test_evaluate_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert evaluate_cli.main(["--weights", str(tmp_path / "missing"), "--data", str(tmp_path), "--out",
                              str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing" in err and "\n" not in err and "Traceback" not in err
    assert export_cli.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


@pytest.mark.slow
def test_evaluate_rejects_shards_of_another_label_set(shards, exports, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    info = json.loads((shards / "_info.json").read_text())
    info["splits"]["val"]["classes"] = ["cat", "dog", "emu"]
    for name in info["splits"]["val"]["filenames"]:
        os.symlink(shards / name, other / name)
    (other / "_info.json").write_text(json.dumps(info))
    assert evaluate_cli.main(["--weights", str(exports["ema"]), "--data", str(other), "--out",
                              str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cat" in err and "\n" not in err


# During ZeRO-3 training each forward gathers parameters collectively, so evaluation ranks holding different
# numbers of batches (here 12 vs 9 samples in 3-image batches) must keep stepping together.
EVALUATE_ZERO3 = textwrap.dedent('''
    import json, os, sys
    import deepspeed, torch
    import model
    from pipeline.evaluation.loop import build_eval_loader, evaluate

    shards, out = sys.argv[1:3]
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    net = model.create_model("coatnet-tiny", num_classes=3, image_size=32)
    plain = model.create_model("coatnet-tiny", num_classes=3, image_size=32)
    plain.load_state_dict(net.state_dict())
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters())  # ZeRO-3 partitioned parameters
    loader, _ = build_eval_loader(shards, "val", 32, 3, 2, rank, world)
    sharded = evaluate(engine.module, loader, 3, torch.device("cpu"))
    if rank == 0:
        local, _ = build_eval_loader(shards, "val", 32, 3, 0, 0, 1)
        whole = evaluate(plain, local, 3, torch.device("cpu"), distributed=False)
        with open(out, "w") as f:
            json.dump({"zero3": sharded, "single": whole}, f)
''')


@pytest.mark.slow
def test_evaluate_zero3_engine_on_two_ranks(shards, tmp_path):
    script, out = tmp_path / "evaluate_zero3.py", tmp_path / "zero3.json"
    script.write_text(EVALUATE_ZERO3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(shards), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["zero3"]["count"] == NUM_IMAGES
    assert result["zero3"] == result["single"]


def test_export_check_names_the_first_key_that_does_not_fit():
    from pipeline.weights.pretrained import PretrainedError

    net = model.create_model("coatnet-tiny", num_classes=3, image_size=32)
    config = {k: v for k, v in net.config.to_dict().items() if k != "grad_checkpointing"}
    state = net.state_dict()
    export_cli.check_fits(state, config, "ckpt")  # the recorded model: fits
    with pytest.raises(PretrainedError, match=r"^ckpt: head.bias has shape \[4\] but the recorded model "
                                              r"coatnet-tiny needs \[3\];") as err:
        export_cli.check_fits(dict(state, **{"head.bias": torch.zeros(4)}), config, "ckpt")
    assert "\n" not in str(err.value)
    with pytest.raises(PretrainedError, match="missing 1 key.*e.g. head.bias") as err:
        export_cli.check_fits({k: v for k, v in state.items() if k != "head.bias"}, config, "ckpt")


def test_sharded_export_round_trips_and_an_index_naming_a_file_elsewhere_is_refused(tmp_path):
    from pipeline.weights.files import PretrainedError, load_export_weights
    from pipeline.weights.pretrained import load_weights

    net = model.create_model("coatnet-nano", num_classes=4, image_size=32)
    state = {k: v.float().contiguous() for k, v in net.state_dict().items()}
    index = export_cli.write_weights(state, str(tmp_path), {"format": "pt"}, max_shard_size=100_000)
    assert index.endswith("model.safetensors.index.json") and len(list(tmp_path.glob("model-*.safetensors"))) >= 3
    loaded = load_export_weights(index)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert set(load_weights(str(tmp_path))[0]) == set(state)  # pretrained=FOLDER reads the index too
    # A second, unsharded export into the same folder (--force) leaves no stale shard behind.
    assert export_cli.write_weights(state, str(tmp_path), {"format": "pt"}).endswith("model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    hostile = tmp_path / "evil"
    hostile.mkdir()
    (hostile / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    with pytest.raises(PretrainedError, match="not a file beside it"):
        load_export_weights(str(hostile / "model.safetensors.index.json"))
    assert export_cli.main([str(tmp_path), str(tmp_path / "out"), "--max-shard-size", "5XB"]) == 2


def test_partial_last_batch_is_padded_to_the_full_shape_and_its_padding_not_counted():
    """A compiled model sees one input shape per evaluation (no recompile for the last batch); the padded
    images' logits are dropped, so the counts are those of the real images."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, images):
            seen.append(tuple(images.shape))
            return images.mean(dim=(2, 3)) * self.scale  # 3 channels = 3 classes: argmax of the channel means

    images = torch.zeros(7, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    images[torch.arange(7), labels] = 1.0
    labels[6] = 1  # the last (partial batch's only) image is wrong
    loader = [(images[:3], labels[:3]), (images[3:6], labels[3:6]), (images[6:], labels[6:])]
    result = evaluate(Recorder(), loader, 3, torch.device("cpu"), distributed=False)
    assert seen == [(3, 3, 4, 4)] * 3
    assert result["count"] == 7 and result["top1"] == pytest.approx(100 * 6 / 7)
