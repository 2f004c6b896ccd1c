"""fedsim.nn.features: determinism across processes, accuracy of ridge on random features, offline weights error."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.analytic import RidgeStatistics
from fedsim.errors import ConfigError, DataUnavailableError
from fedsim.nn.features import BufferLayer, build_feature_map

from conftest import fmnist

def fmnist_slice(split: str, n: int) -> tuple[torch.Tensor, np.ndarray]:
    return fmnist(split, n)


def test_identity_is_flattened_pixels():
    x = torch.rand(5, 1, 8, 8)
    fmap = build_feature_map("identity", (1, 8, 8))
    assert fmap.dim == 64 and fmap.name == "identity"
    torch.testing.assert_close(fmap(x), x.reshape(5, -1), rtol=0, atol=0)
    out = fmap.transform_numpy(x)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, x.reshape(5, -1).double().numpy())
    with pytest.raises(ValueError):
        fmap(torch.rand(5, 1, 9, 9))


def test_random_map_seeded_and_batched():
    x = torch.rand(300, 1, 8, 8)
    a = build_feature_map("random", (1, 8, 8), dim=50, seed=3)
    b = build_feature_map("random", (1, 8, 8), dim=50, seed=3)
    c = build_feature_map("random", (1, 8, 8), dim=50, seed=4)
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    assert a(x).shape == (300, 50) and a(x).dtype == torch.float32
    a.batch_size = 7  # batching does not change the result
    torch.testing.assert_close(a(x), b(x))
    f64 = a(x, dtype=torch.float64)
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64.float(), b(x), rtol=1e-5, atol=1e-6)
    assert (a(x) >= 0).all()  # ReLU


def test_random_map_identical_in_another_process():
    code = ("import torch; from fedsim.nn.features import build_feature_map; "
            "f = build_feature_map('random', (1, 4, 4), dim=6, seed=11); "
            "print(repr(f.module.weight.double().sum().item()), repr(f.module.weight[3, 2].item()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    here = build_feature_map("random", (1, 4, 4), dim=6, seed=11).module.weight
    assert float(out[0]) == here.double().sum().item()
    assert float(out[1]) == here[3, 2].item()


def test_buffer_layer_is_frozen_and_configurable():
    layer = BufferLayer(10, 20, seed=1, activation="tanh", bias=True)
    assert list(layer.parameters()) == []
    assert set(layer.state_dict()) == {"weight", "bias"}
    out = layer(torch.randn(4, 10))
    assert out.shape == (4, 20) and out.abs().max() <= 1
    assert torch.equal(BufferLayer(10, 20, seed=1).weight, layer.weight)
    with pytest.raises(ConfigError):
        BufferLayer(10, 20, activation="softsign")


def test_ridge_on_random_features_of_fashion_mnist():
    """Measured (seed 0, 10k train / 2k test, dim 2000, gamma 1): random 0.8625, identity (pixels) 0.8095."""
    xtr, ytr = fmnist_slice("train", 10_000)
    xte, yte = fmnist_slice("test", 2_000)
    accs = {}
    for name in ("random", "identity"):
        fmap = build_feature_map(name, (1, 28, 28), dim=2000, seed=0)
        w = RidgeStatistics.from_data(fmap.transform_numpy(xtr), ytr, 10).solve(1.0)
        accs[name] = float((np.argmax(fmap.transform_numpy(xte) @ w, axis=1) == yte).mean())
    assert accs["random"] >= 0.84, accs
    assert accs["random"] >= accs["identity"] + 0.03, accs


def test_torchvision_backbone_random_init_offline():
    fmap = build_feature_map("resnet18", (1, 28, 28), weights=None, seed=0)
    assert fmap.dim == 512 and fmap.name == "resnet18"
    out = fmap(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 512) and torch.isfinite(out).all()
    again = build_feature_map("resnet18", (1, 28, 28), weights=None, seed=0)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(fmap(x), again(x))


def test_pretrained_weights_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(DataUnavailableError) as info:
        build_feature_map("resnet18", (1, 28, 28), weights="IMAGENET1K_V1")
    msg = str(info.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "TORCH_HOME" in msg and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "\n" not in msg  # one paragraph


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="model.feature_map.*random"):
        build_feature_map("no_such_net", (1, 28, 28))
    with pytest.raises(ConfigError, match="model.weights"):
        build_feature_map("resnet18", (1, 28, 28), weights="NOT_A_WEIGHT")


def test_buffer_layer_uniform_init_is_the_official_one():
    """init = "uniform": U(-1/sqrt(D), 1/sqrt(D)) as torch's nn.Linear (the official analytic-learning buffer)."""
    d_in = 400
    layer = BufferLayer(d_in, 2000, seed=5, init="uniform")
    w = layer.weight.double()
    bound = 1 / d_in**0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.999 * bound
    assert abs(w.mean().item()) < 0.01 * bound and w.var().item() == pytest.approx(bound**2 / 3, rel=0.02)
    normal = BufferLayer(d_in, 2000, seed=5).weight.double()
    assert normal.var().item() == pytest.approx(1 / d_in, rel=0.02)  # 3x the uniform variance
    assert torch.equal(BufferLayer(d_in, 2000, seed=5, init="uniform").weight, layer.weight)
    assert "init=uniform" in repr(layer)
    with pytest.raises(ConfigError, match="buffer_init"):
        BufferLayer(4, 4, init="kaiming")
