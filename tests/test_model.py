"""The CoAtNet family against the paper's Table 3, and the behaviours training relies on."""
import pytest
import torch
import torch.nn.functional as F

from model import (TABLE_SUFFIX, count_macs, count_params, create_model, get_config, list_models, param_groups,
                   resize_rel_pos_tables)

# (paper parameters, tolerance) at 224 px, Table 3.
PAPER_PARAMS = {
    "coatnet-0": (25e6, 0.01), "coatnet-1": (42e6, 0.01), "coatnet-2": (75e6, 0.01), "coatnet-3": (168e6, 0.01),
    "coatnet-4": (275e6, 0.01), "coatnet-5": (688e6, 0.01), "coatnet-6": (1.47e9, 0.02), "coatnet-7": (2.44e9, 0.02),
}
# Multiply-adds (the paper's "FLOPs") at the resolution the paper reports them.
PAPER_MACS = {
    "coatnet-0": (224, 4.2e9), "coatnet-1": (224, 8.4e9), "coatnet-2": (224, 15.7e9), "coatnet-3": (224, 34.7e9),
    "coatnet-5": (512, 812e9), "coatnet-6": (512, 1521e9), "coatnet-7": (512, 2586e9),
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_matches_paper(name):
    expected, tolerance = PAPER_PARAMS[name]
    assert count_params(name, 224) == pytest.approx(expected, rel=tolerance)


@pytest.mark.parametrize("name", sorted(PAPER_MACS))
def test_multiply_adds_match_paper(name):
    size, expected = PAPER_MACS[name]
    assert count_macs(name, size) == pytest.approx(expected, rel=0.06)


def test_family_is_listed_and_tiny_sizes_keep_block_types():
    names = list_models()
    assert [f"coatnet-{i}" for i in range(8)] == [n for n in names if n[-1].isdigit()]
    for tiny in ("coatnet-nano", "coatnet-tiny"):
        kinds = [kind for stage in get_config(tiny).stages for kind, _, _ in stage]
        assert kinds[0] == "C" and kinds[-1] == "T"
        assert count_params(tiny, 64) < 2e6


def test_coatnet6_and_7_split_stage3_into_mbconv_then_wider_transformer():
    for name in ("coatnet-6", "coatnet-7"):
        s3 = get_config(name).stages[2]
        assert [kind for kind, _, _ in s3] == ["C", "T"] and s3[1][2] == 2 * s3[0][2] and s3[1][1] == 42


def test_position_tables_follow_image_size_and_have_paper_shape():
    for size, (h, w) in [(224, (14, 14)), (384, (24, 24)), ((256, 320), (16, 20))]:
        with torch.device("meta"):
            model = create_model("coatnet-0", image_size=size)
        table = model.stages[2].blocks[0].attn.rel_pos.bias_table
        assert tuple(table.shape) == (384 // 32, 2 * h - 1, 2 * w - 1)
        s4_table = model.stages[3].blocks[1].attn.rel_pos.bias_table
        assert tuple(s4_table.shape) == (768 // 32, h - 1, w - 1)  # (2 * h/2 - 1)


def test_relative_bias_indexes_table_by_offset():
    attn = create_model("coatnet-nano", num_classes=3, image_size=64).stages[2].blocks[0].attn
    height, width = attn.rel_pos.feat_size
    with torch.no_grad():
        attn.rel_pos.bias_table.copy_(torch.randn_like(attn.rel_pos.bias_table))
    bias = attn.rel_pos()
    table = attn.rel_pos.bias_table
    for (i, j), (k, l) in [((0, 0), (1, 1)), ((1, 0), (0, 1)), ((height - 1, 0), (0, width - 1))]:
        q, key = i * width + j, k * width + l
        assert torch.equal(bias[:, q, key], table[:, i - k + height - 1, j - l + width - 1])


@pytest.mark.parametrize("size", [32, 64, (64, 96)])
def test_any_size_divisible_by_32_runs(size):
    model = create_model("coatnet-nano", num_classes=5, image_size=size)
    height, width = (size, size) if isinstance(size, int) else size
    assert model(torch.randn(2, 3, height, width)).shape == (2, 5)


def test_bad_image_size_and_option_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("coatnet-nano", image_size=100)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("coatnet-99")
    with pytest.raises(ValueError, match="stride_on"):
        create_model("coatnet-nano", stride_on="sideways")


def test_depthwise_stride_variant_moves_the_stride():
    pointwise = create_model("coatnet-nano", image_size=32)
    dagger = create_model("coatnet-nano", image_size=32, stride_on="depthwise")
    first = pointwise.stages[0].blocks[0], dagger.stages[0].blocks[0]
    assert first[0].conv_expand.stride == (2, 2) and first[0].conv_depthwise.stride == (1, 1)
    assert first[1].conv_expand.stride == (1, 1) and first[1].conv_depthwise.stride == (2, 2)
    assert count_macs(dagger) > count_macs(pointwise)  # the expansion conv now runs at full resolution


def _overfit(dtype):
    torch.manual_seed(0)
    model = create_model("coatnet-tiny", num_classes=4, image_size=32)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    losses = []
    for _ in range(60):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_overfits_a_batch(dtype):
    losses = _overfit(dtype)
    assert losses[-1] < 0.1 * losses[0]


def test_resized_state_dict_loads_strictly_at_new_resolution():
    small = create_model("coatnet-tiny", num_classes=7, image_size=64).state_dict()
    big = create_model("coatnet-tiny", num_classes=7, image_size=96)
    resized = resize_rel_pos_tables(small, 96)
    big.load_state_dict(resized, strict=True)
    tables = [k for k in small if k.endswith(TABLE_SUFFIX)]
    assert tables and all(resized[k].shape != small[k].shape for k in tables)
    # Everything that is not a table passes through untouched.
    assert all(resized[k] is small[k] for k in small if not k.endswith(TABLE_SUFFIX))
    assert big(torch.randn(1, 3, 96, 96)).shape == (1, 7)


def test_resize_to_same_size_is_identity():
    state = create_model("coatnet-tiny", num_classes=3, image_size=64).state_dict()
    same = resize_rel_pos_tables(state, 64)
    assert all(same[k] is state[k] for k in state)


def test_resize_keeps_a_constant_table_constant():
    state = create_model("coatnet-tiny", num_classes=3, image_size=64).state_dict()
    key = next(k for k in state if k.endswith(TABLE_SUFFIX))
    state[key] = torch.full_like(state[key], 0.5)
    assert torch.allclose(resize_rel_pos_tables(state, 128)[key], torch.tensor(0.5), atol=1e-6)


def test_param_groups_exclude_biases_norms_and_tables_from_decay():
    model = create_model("coatnet-nano", num_classes=3, image_size=32)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 and not names[id(p)].endswith("bias_table") for p in decay["params"])
    assert any(names[id(p)].endswith("bias_table") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = create_model("coatnet-nano", num_classes=3, image_size=32, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(plain, model.parameters()))


def test_stochastic_depth_rises_linearly_and_is_off_in_eval():
    model = create_model("coatnet-nano", num_classes=3, image_size=32, drop_path_rate=0.3)
    rates = [b.drop_path.p for s in model.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))


def test_reset_classifier_replaces_head_only():
    model = create_model("coatnet-nano", num_classes=3, image_size=32)
    model.reset_classifier(11)
    assert model.head.out_features == 11 and model.config.num_classes == 11
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 11)


def test_channels_last_gives_the_same_outputs_and_gradients():
    from model import prepare_for_speed

    torch.manual_seed(0)
    plain = create_model("coatnet-nano", num_classes=3, image_size=64, drop_path_rate=0.0)
    fast = create_model("coatnet-nano", num_classes=3, image_size=64, drop_path_rate=0.0)
    fast.load_state_dict(plain.state_dict())
    prepare_for_speed(fast)
    assert fast.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for net, inp in ((plain, x), (fast, x.contiguous(memory_format=torch.channels_last))):
        net(inp).square().sum().backward()
    assert torch.allclose(fast(x), plain(x), atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    seen = []
    last_conv_block = fast.stages[1].blocks[-1]
    last_conv_block.register_forward_hook(lambda m, i, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)))
    fast(x)
    assert seen == [True]  # the conv stages stay channels-last up to the transformer boundary


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_kernels_agree_inside_the_model():
    from model import attention

    model = create_model("coatnet-nano", num_classes=3, image_size=64).eval()
    with torch.no_grad():
        for table in (m.rel_pos.bias_table for m in model.modules() if hasattr(m, "rel_pos")):
            table.normal_()
        x, saved, outs = torch.randn(2, 3, 64, 64), attention.attention_impl, {}
        try:
            for name in ("sdpa", "math", "flex"):
                attention.set_attention_impl(name)
                outs[name] = model(x)
        finally:
            attention.attention_impl = saved
    assert torch.allclose(outs["sdpa"], outs["math"], atol=1e-5)
    assert torch.allclose(outs["flex"], outs["math"], atol=1e-5)
