"""fedsim.nn.models: block structure, cuts, shapes, seeding."""

from __future__ import annotations

import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.nn.models import MODELS, BlockNet, build_model, num_parameters

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]




def small(name: str, shape: tuple, seed: int = 0) -> BlockNet:
    return build_model(name, shape, num_classes=7, width=8, seed=seed).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", SHAPES)
def test_blocks_composed_in_order_equal_forward(name, shape):
    net = small(name, shape)
    x = torch.rand(3, *shape)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (3, 7)
        h = x
        for block in net.blocks:
            h = block(h)
        torch.testing.assert_close(net.head(h), out, rtol=0, atol=0)
        torch.testing.assert_close(net.features(x), h, rtol=0, atol=0)
        for k in range(1, 5):
            stages = net.group_blocks(k)
            h = x
            for start, stop in stages:
                h = net.forward_blocks(h, start, stop)
            torch.testing.assert_close(net.head(h), out, rtol=0, atol=0)
        emb = net.embed(x)
        assert emb.shape == (3, net.feature_dim)
        torch.testing.assert_close(net.head.fc(emb), out)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_group_blocks_cover_all_blocks_contiguously(name):
    net = small(name, (1, 28, 28))
    for k in range(1, net.num_blocks + 1):
        stages = net.group_blocks(k)
        assert len(stages) == k
        assert stages[0][0] == 0 and stages[-1][1] == net.num_blocks
        for (a, b), (c, _) in zip(stages, stages[1:]):
            assert a < b == c
        assert stages[-1][0] < stages[-1][1]
    with pytest.raises(ValueError):
        net.group_blocks(net.num_blocks + 1)


def test_resnet18_layout_follows_fusefl():
    net = small("resnet18", (1, 28, 28))
    assert net.num_blocks == 9
    assert net.block_names[0] == "stem" and net.block_names[1] == "layer1.0" and net.block_names[-1] == "layer4.1"
    assert net.group_blocks(2) == [(0, 5), (5, 9)]                          # after layer2
    assert net.group_blocks(4) == [(0, 1), (1, 5), (5, 7), (7, 9)]          # stem | layer1+2 | layer3 | layer4
    assert net.cut_points == (1, 3, 5, 7)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    assert net.blocks[0].conv.in_channels == 1 and net.blocks[0].conv.kernel_size == (3, 3)


def test_resnet18_parameter_count():
    net = build_model("resnet18", (3, 32, 32), num_classes=10)
    assert num_parameters(net) == 11_173_962  # the CIFAR ResNet-18 everybody reports as 11.2M
    assert net.feature_dim == 512
    thin = build_model("resnet18", (1, 28, 28), num_classes=10, width=20)
    assert 1.0e6 < num_parameters(thin) < 1.2e6


def test_flat_inputs_for_mlp():
    net = build_model("mlp", (20,), num_classes=4, seed=1)
    assert net(torch.rand(5, 20)).shape == (5, 4)
    with pytest.raises(ConfigError, match="model.name"):
        build_model("cnn", (20,), num_classes=4)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = small("cnn", (1, 28, 28), seed=5)
    after = torch.rand(1)
    assert torch.equal(after, expected_next)
    b = small("cnn", (1, 28, 28), seed=5)
    c = small("cnn", (1, 28, 28), seed=6)
    for (ka, pa), (_, pb), (_, pc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(pa, pb), ka
    assert not torch.equal(a.blocks[0].conv.weight, c.blocks[0].conv.weight)


def test_unknown_model_names_field_and_choices():
    with pytest.raises(ConfigError, match=r"model\.name.*vgg.*cnn.*resnet18"):
        build_model("vgg", (1, 28, 28), num_classes=10)


def test_cosine_classifier_scores_scaled_cosines_and_is_seeded():
    from fedsim.nn.models import CosineLinear, use_cosine_classifier

    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    net = use_cosine_classifier(small("cnn", (1, 28, 28)), seed=3)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG is untouched
    fc = net.head.fc
    assert isinstance(fc, CosineLinear) and fc.weight.shape == (7, net.feature_dim) and fc.sigma.item() == 1.0
    bound = 1 / net.feature_dim**0.5
    assert fc.weight.abs().max() <= bound  # PyCIL's CosineLinear initialization
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        fc.sigma.fill_(2.5)
        z = net.embed(x)
        cos = (z / z.norm(dim=1, keepdim=True)) @ (fc.weight / fc.weight.norm(dim=1, keepdim=True)).T
        torch.testing.assert_close(net(x), 2.5 * cos)
        torch.testing.assert_close(net(x), fc(z))
        torch.testing.assert_close(net(3.0 * x), net(x), rtol=1e-4, atol=1e-5)  # ReLU net: scale-free logits
    again = use_cosine_classifier(small("cnn", (1, 28, 28)), seed=3).head.fc.weight
    other = use_cosine_classifier(small("cnn", (1, 28, 28)), seed=4).head.fc.weight
    assert torch.equal(again, use_cosine_classifier(small("cnn", (1, 28, 28)), seed=3).head.fc.weight)
    assert not torch.equal(again, other)
    assert {n for n, _ in net.head.fc.named_parameters()} == {"weight", "sigma"}  # no bias; sigma is learned
