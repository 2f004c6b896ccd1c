"""Frozen feature maps phi(x) for the analytic learners (AFL, AEF-OCL, DPCR) and their buffer layer.

The buffer layer has its home here: `BufferLayer` (the module) and `buffer_layer(...)` (the seeded float64 layer,
cached per process, that the online strategies put on top of the backbone: AEF-OCL's learner and its baselines
build it from the same arguments, so they see the same features).

Every map is a pure function of its arguments: the server and every client rebuild it independently from
(name, input_shape, dim, seed, weights) and get the same map, so no weights travel in messages.

- `identity`: flattened pixels in [0, 1] (no bias column).
- `random`: flatten -> `BufferLayer` (seeded Gaussian projection + ReLU), the "buffer layer" of analytic learning;
  an offline stand-in for a pretrained backbone (ridge on 2000 such features of Fashion-MNIST pixels: ~86%).
- any torchvision classification model (`resnet18`, `resnet50`, `vit_b_16`, ...): classifier replaced by Identity,
  inputs resized to the weights' crop size (224), grey images replicated to 3 channels, ImageNet normalization.
  `weights=None` is a random-init frozen backbone (offline); named weights are downloaded once into torch's hub
  cache, and a failed download raises `DataUnavailableError` saying where to put the file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.catalog import BUFFER_INITS
from fedsim.errors import ConfigError, DataUnavailableError
from fedsim.nn.seeding import seeded

__all__ = ["BufferLayer", "FeatureMap", "buffer_layer", "build_feature_map", "FEATURE_MAPS", "ACTIVATIONS"]

FEATURE_MAPS: dict[str, str] = {
    "identity": "flattened pixels in [0, 1]",
    "random": "seeded random projection + ReLU of the flattened pixels (buffer layer), width `dim`",
    "<torchvision model>": "e.g. resnet18, resnet50, vit_b_16: frozen backbone without classifier, 224x224 input",
}

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": nn.functional.gelu,
    "identity": lambda t: t,
}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class BufferLayer(nn.Module):
    """Fixed random projection + nonlinearity: x (n, in_dim) -> act(x W + b) (n, width).

    W drawn from a torch.Generator seeded with `seed` (identical in every process), stored as buffers (frozen, saved
    in state_dict, never trained): `init = "normal"` (default) W ~ N(0, 1 / in_dim); `"uniform"` W ~ U(-1/sqrt(in_dim),
    1/sqrt(in_dim)), the official analytic-learning buffer (`analytic/Buffer.py`: torch's `nn.Linear` reset,
    kaiming-uniform with a = sqrt(5), bound 1/sqrt(fan_in)), whose entries have 1/3 of the normal init's variance.
    No bias by default, as in the official buffer (ReLU without bias is positively homogeneous, so the weight scale
    only rescales gamma: the uniform init acts as the normal one with gamma 3x larger); on Fashion-MNIST pixels the
    normal init measured best among N(0,1/d) / N(0,1) / uniform with or without bias (86.7% vs 85.6-86.4%).
    """

    def __init__(self, in_dim: int, width: int, seed: int = 0, activation: str = "relu", bias: bool = False,
                 init: str = "normal") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation: unknown {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if init not in BUFFER_INITS:
            raise ConfigError(f"buffer_init: unknown {init!r}; allowed: {', '.join(BUFFER_INITS)}")
        if in_dim < 1 or width < 1:
            raise ConfigError(f"model.feature_dim: buffer layer needs in_dim, width >= 1, got {in_dim}, {width}")
        self.in_dim, self.width, self.seed, self.activation = int(in_dim), int(width), int(seed), activation
        self.init = init
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        if init == "uniform":
            bound = 1.0 / self.in_dim**0.5
            weight = (torch.rand(self.in_dim, self.width, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * bound
        else:
            weight = torch.randn(self.in_dim, self.width, generator=gen, dtype=torch.float32) / self.in_dim**0.5
        self.register_buffer("weight", weight)
        self.register_buffer("bias", torch.randn(self.width, generator=gen) if bias else None)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        h = x @ self.weight.to(x.dtype)
        if self.bias is not None:
            h = h + self.bias.to(x.dtype)
        return ACTIVATIONS[self.activation](h)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, width={self.width}, seed={self.seed}, activation={self.activation}, "
                f"init={self.init}")


@functools.lru_cache(maxsize=8)
def buffer_layer(in_dim: int, width: int, seed: int, activation: str = "relu", init: str = "normal") -> BufferLayer:
    """The seeded buffer layer in float64, eval mode: a pure function of its arguments, so the server, every node
    and every strategy on the same scenario build the same one (cached per process: the weights are built once)."""
    return BufferLayer(in_dim, width, seed=seed, activation=activation, init=init).double().eval()


class _ImagePreprocess(nn.Module):
    """Resize to the backbone's resolution, grey -> RGB, ImageNet normalization (inputs in [0, 1])."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                          antialias=min(x.shape[-2:]) > self.size)
        return (x - self.mean) / self.std


class FeatureMap:
    """Callable frozen map: x (n, C, H, W) in [0, 1] -> features (n, dim) on the CPU, computed in batches.

    `__call__(x, dtype=torch.float32)`; pass dtype=torch.float64 for the analytic math (identity and random maps
    then compute in float64; backbones compute in float32 and cast). `transform_numpy(x)` returns float64 numpy.
    """

    def __init__(self, name: str, module: nn.Module, dim: int, input_shape: Sequence[int], batch_size: int,
                 device: str | torch.device = "cpu", float64_capable: bool = False) -> None:
        self.name = name
        self.dim = int(dim)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.module = module.to(self.device).eval().requires_grad_(False)
        self._float64_capable = float64_capable

    def __call__(self, x: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"feature map {self.name!r} expects inputs (n, {self.input_shape}), got {tuple(x.shape)}")
        compute = dtype if (dtype == torch.float64 and self._float64_capable) else torch.float32
        out = torch.empty((x.shape[0], self.dim), dtype=dtype)
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                xb = x[start:start + self.batch_size].to(self.device, compute)
                out[start:start + xb.shape[0]] = self.module(xb).reshape(xb.shape[0], -1).to("cpu", dtype)
        return out

    def transform_numpy(self, x: Any) -> np.ndarray:
        """Features as float64 numpy (n, dim), ready for `fedsim.analytic`."""
        return self(x, dtype=torch.float64).numpy()

    def __repr__(self) -> str:
        return f"FeatureMap(name={self.name!r}, dim={self.dim}, input_shape={self.input_shape})"


def _flat_dim(input_shape: Sequence[int]) -> int:
    return int(np.prod([int(s) for s in input_shape]))


def build_feature_map(
    name: str,
    input_shape: Sequence[int],
    dim: int = 2048,
    seed: int = 0,
    weights: Any = None,
    device: str | torch.device = "cpu",
    activation: str = "relu",
) -> FeatureMap:
    """The frozen feature map `name` for inputs (C, H, W); `dim` is the width of `random` (ignored otherwise).

    Torchvision names accept `weights` as None (random init from `seed`, offline), "DEFAULT", a weights enum member
    name such as "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", or a WeightsEnum.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if name == "identity":
        return FeatureMap(name, nn.Flatten(1), _flat_dim(input_shape), input_shape, batch_size=65536,
                          device=device, float64_capable=True)
    if name == "random":
        layer = BufferLayer(_flat_dim(input_shape), dim, seed=seed, activation=activation)
        return FeatureMap(name, layer, dim, input_shape, batch_size=4096, device=device, float64_capable=True)
    return _torchvision_map(name, input_shape, seed, weights, device)


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _resolve_weights(name: str, weights: Any) -> Any:
    import torchvision

    if weights is None or not isinstance(weights, str):
        return weights
    try:
        if "." in weights:
            return torchvision.models.get_weight(weights)
        enum = torchvision.models.get_model_weights(name)
        return enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
    except (KeyError, ValueError, AttributeError) as err:
        try:
            allowed = ", ".join(["DEFAULT", *(w.name for w in torchvision.models.get_model_weights(name))])
        except (KeyError, ValueError):
            allowed = "see torchvision.models.get_model_weights"
        raise ConfigError(f"model.weights: unknown weights {weights!r} for {name!r}; allowed: {allowed}") from err


def _fetch_weights(name: str, weights: Any) -> None:
    """Make sure the weights file is in torch's hub cache (download once), or explain how to put it there."""
    filename = os.path.basename(weights.url)
    target = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any failure here means the weights are not available
        label = f"{type(weights).__name__}.{weights.name}"
        raise DataUnavailableError(
            f"Pretrained weights {label} for feature map {name!r} are not available: downloading {weights.url} "
            f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}). "
            f"torch looks for the file at {target} (the hub cache: $TORCH_HOME/hub/checkpoints, TORCH_HOME "
            f"defaulting to ~/.cache/torch). To provide it offline, download that URL on a machine with internet "
            f"access and copy the file to that path (or point TORCH_HOME at a directory whose hub/checkpoints holds "
            f"it); or set model.weights to none for a randomly initialized frozen backbone, or use "
            f"model.feature_map = 'random'."
        ) from err


def _strip_classifier(model: nn.Module) -> nn.Module:
    """Replace the final classification layer by Identity so the model returns its penultimate features."""
    for attr in ("fc", "heads", "head", "classifier"):
        head = getattr(model, attr, None)
        if head is None or not isinstance(head, nn.Module):
            continue
        if isinstance(head, nn.Linear) or attr == "heads":
            setattr(model, attr, nn.Identity())
            return model
        if isinstance(head, nn.Sequential):
            for idx in range(len(head) - 1, -1, -1):
                if isinstance(head[idx], (nn.Linear, nn.Conv2d)):
                    head[idx] = nn.Identity()
                    return model
    raise ConfigError(f"model.feature_map: cannot find the classifier of {type(model).__name__} to remove")


def _torchvision_map(name: str, input_shape: tuple[int, ...], seed: int, weights: Any,
                     device: str | torch.device) -> FeatureMap:
    import torchvision

    names = _torchvision_names()
    if name not in names:
        raise ConfigError(f"model.feature_map: unknown feature map {name!r}; allowed: identity, random, or a "
                          f"torchvision classification model ({', '.join(names)})")
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ConfigError(f"model.feature_map: {name!r} needs images with 1 or 3 channels, got shape {input_shape}")
    w = _resolve_weights(name, weights)
    size, mean, std = 224, _IMAGENET_MEAN, _IMAGENET_STD
    if w is not None:
        _fetch_weights(name, w)
        preset = w.transforms()
        size = int(getattr(preset, "crop_size", [224])[0])
        mean, std = tuple(getattr(preset, "mean", mean)), tuple(getattr(preset, "std", std))
    with seeded(seed):
        backbone = torchvision.models.get_model(name, weights=w)
    backbone = _strip_classifier(backbone).eval()
    module = nn.Sequential(_ImagePreprocess(size, mean, std), backbone)
    with torch.inference_mode():
        dim = int(module(torch.zeros(1, *input_shape)).reshape(1, -1).shape[1])
    return FeatureMap(name, module, dim, input_shape, batch_size=64, device=device)
