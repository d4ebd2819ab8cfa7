"""model.activation_checkpointing as a list of stages: the same loss and gradients as no recompute, and only the
listed stages' blocks run twice."""
import pytest
import torch
import torch.nn.functional as F

from model import count_macs, create_model, recompute_fraction
from pipeline.config import ConfigError, load_config
from pipeline.train.flops import train_flops_per_image


def _run(setting, x, y):
    torch.manual_seed(0)
    net = create_model("coatnet-nano", num_classes=3, image_size=32, drop_path_rate=0.2, grad_checkpointing=setting)
    calls = {}
    for i, stage in enumerate(net.stages):
        for j, block in enumerate(stage.blocks):
            # a pre-hook: non-reentrant checkpoint stops a recompute early, before a forward hook would run
            block.register_forward_pre_hook(lambda *_, key=(i, j): calls.__setitem__(key, calls.get(key, 0) + 1))
    torch.manual_seed(1)  # the same stochastic-depth draws in every run (checkpoint replays the RNG state)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    recomputed = {key for key, n in calls.items() if n > 1}
    return loss.detach(), grads, recomputed, net


def test_selected_stages_recompute_with_the_same_loss_and_gradients():
    torch.manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    loss0, grads0, none_recomputed, _ = _run(False, x, y)
    loss1, grads1, some, net = _run([0, 1], x, y)
    _, _, every, _ = _run(True, x, y)
    assert none_recomputed == set()
    assert some == {(i, j) for i in (0, 1) for j in range(len(net.stages[i].blocks))}
    assert every == {(i, j) for i in range(4) for j in range(len(net.stages[i].blocks))} and len(some) < len(every)
    assert torch.allclose(loss1, loss0, rtol=1e-6, atol=1e-6)
    for name, g in grads0.items():
        assert torch.allclose(grads1[name], g, rtol=1e-4, atol=1e-6), name
    assert net.grad_checkpointing and net.config.to_dict()["grad_checkpointing"] == [0, 1]


def test_recompute_fraction_counts_the_listed_stages_forward():
    macs = count_macs("coatnet-0", 224)
    parts = [recompute_fraction("coatnet-0", [i], 224) for i in range(4)]
    assert all(0 < p < 1 for p in parts)
    assert 0.8 < sum(parts) < 1.0  # the stem (~11% at 224 px), pooling and head are never recomputed
    assert recompute_fraction("coatnet-0", [0, 1], 224) == pytest.approx(parts[0] + parts[1])
    flops = train_flops_per_image(macs, parts[0])
    assert flops.model == 6 * macs and flops.hardware == int((3 + parts[0]) * 2 * macs)


def test_config_takes_a_list_of_stages_and_names_a_bad_one():
    assert load_config(None, ["model.activation_checkpointing=[0, 1]"]).model.activation_checkpointing == [0, 1]
    assert load_config(None, ["model.activation_checkpointing=true"]).model.activation_checkpointing is True
    with pytest.raises(ConfigError, match=r"model.activation_checkpointing must be true, false or a list of stages"):
        load_config(None, ["model.activation_checkpointing=[4]"])


def test_activation_memory_of_a_stage_list_lies_between_none_and_all():
    from launch.activations import measure

    act = measure({"name": "coatnet-nano", "num_classes": 10, "image_size": [64, 64]}, "bf16")
    none, every = act.bytes(8, False), act.bytes(8, True)
    prefixes = [act.bytes(8, list(range(k))) for k in range(5)]
    assert prefixes[0] == pytest.approx(none, rel=1e-3) and prefixes[4] == every
    # past the first stage, each further one recomputed keeps less (one block's recompute is a transient: recomputing
    # a one-block stage alone can cost more than it frees)
    assert all(a > b for a, b in zip(prefixes[1:], prefixes[2:])) and prefixes[2] < prefixes[0]


def test_planner_proposes_the_cheapest_stage_prefix_where_all_or_none_recomputes_everything():
    from launch.plan import format_table, plan

    # CoAtNet-0 on one 5 GiB GPU: without recompute only micro-batch 16 fits, under the 32 images that keep a GPU
    # busy, so an all-or-none search must recompute every stage; recomputing S1-S2 fits 32 for 27% of the forward.
    cfg = load_config("configs/pretrain/in1k_coatnet-0.yaml")
    r = plan(cfg, nodes=1, gpus_per_node=1, gpu_mem_gb=5)
    chosen = r["chosen"]
    assert r["fits"] and chosen["activation_checkpointing"] == [0, 1] and chosen["micro_batch_size"] >= 32
    assert chosen["recompute"] == pytest.approx(recompute_fraction("coatnet-0", [0, 1], 224), rel=1e-2)
    assert chosen["recompute"] < 0.5
    same = [o for o in r["options"] if (o["zero_stage"], o["offload_optimizer"], o["offload_param"]) ==
            (chosen["zero_stage"], False, False)]
    by_choice = {str(o["activation_checkpointing"]): o for o in same}
    assert by_choice["False"]["micro_batch_size"] < r["efficient_micro_batch"] <= by_choice["True"]["micro_batch_size"]
    assert chosen["total_gib"] <= r["usable_gib"]
    all_or_none_hfu = r["mfu"] * train_flops_per_image(1, 1.0).hardware / train_flops_per_image(1).model
    assert r["hfu"] < all_or_none_hfu  # the same MFU costs less recompute
    assert "model.activation_checkpointing=[0,1]" in r["overrides"]
    assert load_config(None, ["model.activation_checkpointing=[0,1]"]).model.activation_checkpointing == [0, 1]
    table = format_table({**r, "config": "in1k_coatnet-0"})
    assert "activation checkpointing stages S1-S2" in table and "recompute: model.activation_checkpointing=[0,1]" in table
