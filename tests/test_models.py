"""Models of the command line, parametrized over the registry, and the FLOP counts of the RigL paper."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastsparse as sparse
from fastsparse.core.flops import forward_flops, layer_costs, training_flops, training_rule
from fastsparse.experiments.models import MLP, MODELS, ResNet, SmallCNN, TransformerEncoder, WideResNet, create_model

INPUTS = {"mlp": (1, 8, 8), "lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "cnn": (1, 8, 8),
          "resnet20": (3, 32, 32), "resnet32": (3, 32, 32), "resnet56": (3, 32, 32), "wrn22_2": (3, 32, 32),
          "wrn28_2": (3, 32, 32), "transformer": (1, 8, 8), "resnet50": (3, 32, 32),
          "resnet18": (3, 32, 32), "gpt": (8,)}
KWARGS = {"mlp": {"sizes": [64, 32, 10]}}


def test_every_registered_model_has_an_input_here():
    assert set(MODELS) == set(INPUTS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_fits_its_data_trains_and_has_sparsifiable_weights(name):
    torch.manual_seed(0)
    model = create_model(name, INPUTS[name], 10, **KWARGS.get(name, {}))
    x = torch.randint(0, 10, (2, *INPUTS[name])) if name == "gpt" else torch.randn(2, *INPUTS[name])
    out = model(x)
    assert out.shape == ((2, 10, 8) if name == "gpt" else (2, 10))   # a language model: (batch, vocab, tokens)
    out.sum().backward()
    chosen = sparse.select_params(model)
    assert chosen and all(sp.param.dim() >= 2 for sp in chosen)
    assert not any("norm" in sp.name or "embed" in sp.name for sp in chosen)


def test_mlp_keeps_its_parameter_names_and_takes_flat_or_image_inputs():
    model = MLP([64, 300, 100, 10])
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight",
                                                        "4.bias"]
    x = torch.rand(3, 64)
    assert torch.equal(model(x), model(x.view(3, 1, 8, 8)))


def test_model_and_data_that_do_not_fit_say_how_to_fix_it():
    with pytest.raises(ValueError, match="sizes\\[0\\] is 64, but the data has 784 input features"):
        create_model("mlp", (1, 28, 28), 10, sizes=[64, 10])
    with pytest.raises(ValueError, match="set sizes\\[-1\\] to 4"):
        create_model("mlp", (32,), 4, sizes=[32, 10])
    with pytest.raises(ValueError, match="needs image inputs"):
        create_model("cnn", (32,), 4)
    with pytest.raises(ValueError, match="depth 6n \\+ 2"):
        ResNet(depth=21)
    with pytest.raises(ValueError, match="depth 6n \\+ 4"):
        WideResNet(depth=27)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg", (3, 32, 32), 10)


def test_small_cnn_is_for_8x8_inputs():
    model = SmallCNN()
    assert model(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    assert model.fc1.in_features == 32 * 4 * 4


def test_transformer_exposes_per_head_projections_for_balanced_groups():
    model = TransformerEncoder((1, 8, 8), 10, dim=16, depth=2, heads=4, patch=2)
    names = [sp.name for sp in sparse.select_params(model)]
    assert "layers.0.attn.q.weight" in names and "layers.1.attn.out.weight" in names
    assert "embed.weight" not in names and "pos_embed" not in names
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    flat = TransformerEncoder((64,), 10, dim=16, depth=1, heads=4, patch=8)
    assert flat(torch.rand(2, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of the number of heads"):
        TransformerEncoder((1, 8, 8), 10, dim=18, heads=4)


# --- FLOPs ---------------------------------------------------------------------------------------
def test_forward_flops_of_an_mlp_dense_and_sparse():
    model = MLP([64, 300, 100, 10])
    cost = layer_costs(model, (64,))
    dense = 2 * (64 * 300 + 300 * 100 + 100 * 10)
    assert forward_flops(model, cost, sparse=False) == dense
    engine = sparse.Sparsifier(model, None, sparse.create("static", sparsity=0.9), hook=False)
    active = sum(int(sp.mask.sum()) for sp in engine.groups[0].params)
    assert forward_flops(model, cost) == 2 * active
    assert forward_flops(model, cost, sparse=False) == dense


def test_forward_flops_count_convolution_positions_and_attention_products():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    cost = layer_costs(conv, (1, 8, 8))
    assert cost.positions == {"0.weight": 64, "2.weight": 1}
    assert forward_flops(conv, cost, sparse=False) == 2 * (64 * 4 * 9 + 256 * 10)
    tf = TransformerEncoder((1, 8, 8), 10, dim=16, depth=1, heads=4, patch=2)
    cost = layer_costs(tf, (1, 8, 8))
    tokens = 16
    assert cost.extra == 4 * tokens * tokens * 16
    assert cost.positions["layers.0.attn.q.weight"] == tokens and cost.positions["head.weight"] == 1


def test_training_flops_follow_the_rigl_paper():
    f_d, f_s, n = 1000.0, 100.0, 10_000
    assert training_flops("dense", f_d, f_s, n) == 3 * f_d * n
    assert training_flops("sparse", f_d, f_s, n) == 3 * f_s * n
    assert training_flops("dense_gradient_every_step", f_d, f_s, n) == (2 * f_s + f_d) * n
    # RigL with an update every ΔT steps all through training: (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1) per example
    delta_t, batch, steps = 9, 10, 1000
    updates = steps // (delta_t + 1)
    got = training_flops("dense_gradient_at_updates", f_d, f_s, steps * batch, updates * batch)
    paper = (3 * f_s * delta_t + 2 * f_s + f_d) / (delta_t + 1) * steps * batch
    assert got == pytest.approx(paper)


def test_the_flops_rule_comes_from_the_grow_score():
    assert training_rule([]) == "dense"
    assert training_rule([sparse.create("static")]) == "sparse"
    assert training_rule([sparse.create("set")]) == "sparse"
    assert training_rule([sparse.create("snfs")]) == "dense_gradient_every_step"
    assert training_rule([sparse.create("rigl")]) == "dense_gradient_at_updates"


def test_resnet50_stems_shapes_and_fan_in_init():
    from fastsparse.experiments.models import ResNet50

    cifar = create_model("resnet50", (3, 32, 32), 100)
    imagenet = create_model("resnet50", (3, 96, 96), 1000)
    assert cifar.conv1.kernel_size == (3, 3) and isinstance(cifar.maxpool, nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    # 3 + 4 + 6 + 3 bottlenecks; 2048 features into the classifier; 23.5M weights + the fc
    assert len(cifar.blocks) == 16 and cifar.fc.in_features == 2048
    n = sum(p.numel() for p in ResNet50(num_classes=1000).parameters())
    assert n == 25_557_032                               # torchvision's resnet50 count
    # an explicit stem keeps the ImageNet layout on small test images
    small = create_model("resnet50", (3, 32, 32), 10, stem="imagenet", width=8)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # -c fanin: Kaiming normal with fan_in, std = sqrt(2 / (c_in · k · k))
    torch.manual_seed(0)
    fanin = ResNet50(num_classes=10, width=16, conv_init="fan_in")
    w = fanin.blocks[15].conv2.weight                      # 128 × 128 × 3 × 3
    assert w.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    with pytest.raises(ValueError, match=r"unknown stem 'tiny'; valid: \['cifar', 'imagenet'\]"):
        create_model("resnet50", (3, 32, 32), 10, stem="tiny")
    with pytest.raises(ValueError, match="unknown conv_init 'fanin'"):
        ResNet50(conv_init="fanin")
