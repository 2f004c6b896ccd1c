"""Block-structured networks: an ordered list of named blocks plus a classifier head.

Cutting a network after block k (FuseFL's progressive fusion) or taking the backbone without its head (feature
extraction for AFL / AEF-OCL / DPCR) is then a slice of `BlockNet.blocks`, not a per-model special case.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.nn.seeding import seeded

__all__ = ["BlockNet", "CosineLinear", "MODELS", "as_block_net", "build_model", "is_factory_name", "num_parameters",
           "resolve_factory", "use_cosine_classifier"]

from fedsim.catalog import MODELS, is_factory_name  # noqa: E402


class BlockNet(nn.Module):
    """A network as `blocks` (composed in order = the backbone) followed by `head` (pooling + classifier).

    `forward(x) == head(features(x))`; `forward_blocks(x, start, stop)` runs blocks[start:stop].
    `cut_points` are block indices where a cut is natural (stage boundaries); `group_blocks(k)` splits the blocks
    into k contiguous stages for FuseFL. `feature_dim` is the width of `embed(x)` (the vector the final layer
    reads), and `head.fc` is that layer: an `nn.Linear`, or a `CosineLinear` after `use_cosine_classifier`.
    """

    def __init__(
        self,
        blocks: Sequence[tuple[str, nn.Module]],
        head: nn.Module,
        feature_dim: int,
        cut_points: Sequence[int] | None = None,
        groupings: dict[int, list[tuple[int, int]]] | None = None,
        out_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.block_names: tuple[str, ...] = tuple(name for name, _ in blocks)
        self.blocks = nn.ModuleList([block for _, block in blocks])
        self.head = head
        self.feature_dim = int(feature_dim)
        n = len(self.blocks)
        self.cut_points: tuple[int, ...] = tuple(cut_points) if cut_points is not None else tuple(range(1, n))
        self.out_channels: tuple[int, ...] = tuple(out_channels) if out_channels is not None else ()
        self._groupings = dict(groupings or {})

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks[start:stop] on x (the input of block `start`)."""
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """All blocks (the backbone without head); spatial maps for conv nets."""
        return self.forward_blocks(x, 0, None)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The (n, feature_dim) vector the classifier reads: features, then the head without its last layer."""
        h = self.features(x)
        for layer in list(self.head.children())[:-1]:
            h = layer(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def group_blocks(self, k: int) -> list[tuple[int, int]]:
        """k contiguous (start, stop) stages covering all blocks, cut at stage boundaries where possible.

        Models may fix preferred layouts (resnet18 follows FuseFL: K=2 after layer2; K=4 stem | layer1+2 | layer3 |
        layer4); otherwise k-1 cuts are chosen among `cut_points` (all block boundaries when there are too few) so
        that stages hold about equally many blocks.
        """
        n = self.num_blocks
        if not 1 <= k <= n:
            raise ValueError(f"cannot split {n} blocks into {k} stages (1 <= k <= {n})")
        if k in self._groupings:
            return list(self._groupings[k])
        candidates = list(self.cut_points) if k - 1 <= len(self.cut_points) else list(range(1, n))
        cuts: list[int] = []
        for i in range(1, k):  # greedy: closest free candidate to the ideal position i*n/k
            ideal = i * n / k
            free = [c for c in candidates if c not in cuts and (not cuts or c > cuts[-1])
                    and len([d for d in candidates if d > c]) >= k - 1 - i]
            cuts.append(min(free, key=lambda c: (abs(c - ideal), c)))
        bounds = [0, *cuts, n]
        return [(bounds[i], bounds[i + 1]) for i in range(k)]


class CosineLinear(nn.Module):
    """Cosine classifier: logits = sigma * <x / ||x||, w_c / ||w_c||>, one learnable scale sigma, no bias.

    The head the official DPCR code trains its backbone with (PyCIL's ``CosineLinear``, config ``"cosine": true``):
    weights uniform in +-1/sqrt(in_features), sigma starting at 1. Normalizing both sides takes the feature norm
    out of the decision, so class information has to live in the features' directions, which is what DPCR's class
    normalization (unit-norm ridge columns) assumes. ``weight`` is (out_features, in_features) like ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        bound = 1.0 / self.in_features**0.5
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * nn.functional.linear(nn.functional.normalize(x, dim=1),
                                                 nn.functional.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def use_cosine_classifier(net: BlockNet, seed: int = 0) -> BlockNet:
    """Replace ``net.head.fc`` by a ``CosineLinear`` of the same shape, initialized from ``seed``; returns ``net``.

    The caller's torch RNG is untouched (forked), so every process builds the same head from the same seed.
    """
    fc = net.head.fc
    with seeded(seed):
        net.head.fc = CosineLinear(fc.in_features, fc.out_features)
    return net


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _classifier_head(channels: int, num_classes: int, spatial: bool) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if spatial:
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
    layers["fc"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)


def _conv_bn_relu(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(cin, cout, 3, padding=1, bias=False), bn=nn.BatchNorm2d(cout), relu=nn.ReLU(inplace=True))
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


def _image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(f"model.name: {name!r} needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
    return int(input_shape[0]), int(input_shape[1]), int(input_shape[2])


def _build_cnn(input_shape: Sequence[int], num_classes: int, width: int) -> BlockNet:
    c, h, w = _image_shape("cnn", input_shape)
    blocks, cin, size = [], c, min(h, w)
    channels = [width, 2 * width, 4 * width, 8 * width]
    for i, cout in enumerate(channels):
        pool = i < 3 and size >= 2  # pool 3 times while the map is at least 2x2: 28 -> 3, 32 -> 4, 8 -> 1
        blocks.append((f"conv{i + 1}", _conv_bn_relu(cin, cout, pool)))
        size = size // 2 if pool else size
        cin = cout
    return BlockNet(blocks, _classifier_head(cin, num_classes, spatial=True), feature_dim=cin,
                    out_channels=channels)


def basic_block(inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> nn.Module:
    """torchvision's ResNet ``BasicBlock``, imported here rather than at module import: importing torchvision (and
    the torch._dynamo it pulls in) costs about 1.3 s of CPU per process, paid by every Ray actor and SuperNode
    even when the scenario's model is not a ResNet (issue #26)."""
    from torchvision.models.resnet import BasicBlock

    return BasicBlock(inplanes, planes, stride=stride, downsample=downsample)


def _build_resnet18(input_shape: Sequence[int], num_classes: int, width: int) -> BlockNet:
    c, _, _ = _image_shape("resnet18", input_shape)
    stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(c, width, 3, stride=1, padding=1, bias=False),
                                     bn=nn.BatchNorm2d(width), relu=nn.ReLU(inplace=True)))
    blocks: list[tuple[str, nn.Module]] = [("stem", stem)]
    out_channels = [width]
    inplanes = width
    for layer, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)], start=1):
        planes = width * mult
        for j in range(2):
            s = stride if j == 0 else 1
            down = None
            if s != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=s, bias=False), nn.BatchNorm2d(planes))
            blocks.append((f"layer{layer}.{j}", basic_block(inplanes, planes, stride=s, downsample=down)))
            out_channels.append(planes)
            inplanes = planes
    # blocks: 0 stem | 1-2 layer1 | 3-4 layer2 | 5-6 layer3 | 7-8 layer4
    net = BlockNet(blocks, _classifier_head(inplanes, num_classes, spatial=True), feature_dim=inplanes,
                   cut_points=(1, 3, 5, 7), out_channels=out_channels,
                   groupings={2: [(0, 5), (5, 9)], 3: [(0, 1), (1, 5), (5, 9)], 4: [(0, 1), (1, 5), (5, 7), (7, 9)]})
    for m in net.modules():  # torchvision ResNet's initialization
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def _build_mlp(input_shape: Sequence[int], num_classes: int, width: int) -> BlockNet:
    in_dim = 1
    for s in input_shape:
        in_dim *= int(s)
    blocks: list[tuple[str, nn.Module]] = []
    for i in range(4):  # 4 blocks, like the cnn, so FuseFL's K = 2..4 works on every model
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten(1)) if i == 0 else OrderedDict()
        layers["linear"] = nn.Linear(in_dim if i == 0 else width, width)
        layers["relu"] = nn.ReLU(inplace=True)
        blocks.append((f"fc{i + 1}", nn.Sequential(layers)))
    return BlockNet(blocks, _classifier_head(width, num_classes, spatial=False), feature_dim=width,
                    out_channels=(width,) * 4)


_BUILDERS = {"cnn": (_build_cnn, 32), "resnet18": (_build_resnet18, 64), "mlp": (_build_mlp, 128)}


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, width: int | None = None, seed: int = 0,
    params: dict | None = None,
) -> nn.Module:
    """The network `name` (see MODELS) for inputs of `input_shape` (C, H, W) or (D,), initialized from `seed`.

    `name` may also be a factory of one's own, ``"package.module:function"`` or ``"path/to/file.py:function"``,
    called as ``function(num_classes=..., input_shape=(C, H, W), **params)`` and returning a ``torch.nn.Module``
    (returned as it is; `as_block_net` makes the block form FuseFL needs). `params` (``model.params``) is for
    factories only, `width` for the built-in models only.

    Initialization draws from a forked torch RNG seeded with `seed`, so the same arguments give the same weights
    in any process (server and clients build the initial model independently) and the caller's RNG is untouched.
    """
    if num_classes < 1:
        raise ConfigError(f"model: num_classes must be >= 1, got {num_classes}")
    if is_factory_name(name):
        factory = resolve_factory(name)
        with seeded(seed):
            return _call_factory(name, factory, tuple(int(s) for s in input_shape), int(num_classes), params or {})
    if name not in _BUILDERS:
        raise ConfigError(f"model.name: unknown model {name!r}; allowed: {', '.join(MODELS)}, or a factory "
                          "'package.module:function' / 'path/to/file.py:function'")
    if params:
        raise ConfigError(f"model.params: {params!r} is for a factory model; the built-in {name!r} takes "
                          "model.width")
    builder, default_width = _BUILDERS[name]
    width = default_width if width is None else int(width)
    if width < 1:
        raise ConfigError(f"model.width: {width!r} is out of range; it must be >= 1")
    with seeded(seed):
        return builder(tuple(input_shape), num_classes, width)


# ------------------------------------------------------------------------------------------ models of one's own
_FILE_MODULES: dict[str, object] = {}


def resolve_factory(name: str):  # noqa: ANN201
    """The callable a factory name points at: ``"package.module:attr"`` (imported as Python imports it: the
    package must be on ``sys.path`` / ``PYTHONPATH``, in every process that builds the model) or
    ``"path/to/file.py:attr"`` (the file imported by path; a relative path is read from the current directory).
    ``ConfigError`` ``model.name: '...' could not be imported: ...`` when the import or the lookup fails."""
    import importlib
    import importlib.util
    import os

    target, _, attr = name.rpartition(":")
    try:
        if target.endswith(".py"):
            path = os.path.abspath(os.path.expanduser(target))
            module = _FILE_MODULES.get(path)
            if module is None:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"no file {path}")
                import hashlib

                mod_name = "fedsim_user_model_" + hashlib.blake2b(path.encode(), digest_size=6).hexdigest()
                spec = importlib.util.spec_from_file_location(mod_name, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot import {path}")
                module = importlib.util.module_from_spec(spec)
                import sys

                sys.modules[mod_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(mod_name, None)
                    raise
                _FILE_MODULES[path] = module
        else:
            module = importlib.import_module(target)
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - any import-time failure of the user's module is a config error
        raise ConfigError(f"model.name: {name!r} could not be imported: {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"model.name: {name!r} is a {type(obj).__name__}, not a callable factory "
                          "factory(num_classes, input_shape, **model.params) -> torch.nn.Module")
    return obj


def _call_factory(name: str, factory, input_shape: tuple, num_classes: int, params: dict) -> nn.Module:  # noqa: ANN001
    try:
        model = factory(num_classes=num_classes, input_shape=input_shape, **params)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model.name: {name!r} failed to build a model for {num_classes} classes and input shape "
                          f"{input_shape} with model.params {params!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name: {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def as_block_net(model: nn.Module, name: str, needed_by: str, min_blocks: int = 1) -> BlockNet:
    """`model` in the block form (a `BlockNet`) that `needed_by` (e.g. "FuseFL (strategy.stages = 2)") cuts.

    The contract for a model of one's own: a `BlockNet` (returned as it is), or any module with
      - ``blocks``: an ``nn.ModuleList`` or ``nn.Sequential`` of K >= `min_blocks` blocks, composed in order the
        backbone (FuseFL cuts between them: K = strategy.stages stages of contiguous blocks);
      - ``head``: the module mapping the last block's output to class scores; its last child is the classifier
        layer (``nn.Linear``) and the children before it (pooling, flatten) make the embedding it reads (a bare
        ``nn.Linear`` head reads the blocks' output directly, which must then be flat);
      - optionally ``feature_dim`` (the classifier's input width; else the last ``nn.Linear``'s ``in_features``)
        and ``cut_points`` (block indices where cuts are preferred);
      - no parameters or buffers outside ``blocks`` and ``head``; and ``forward(x) == head(blocks(x))``, since
        the block form runs exactly that (`fedsim validate` checks it on a probe batch).
    Otherwise a ``ConfigError`` naming ``model.name`` and what is missing.
    """
    if isinstance(model, BlockNet):
        if model.num_blocks < min_blocks:
            raise ConfigError(f"model.name: {name!r} has {model.num_blocks} blocks; {needed_by} needs at least "
                              f"{min_blocks}")
        return model
    what = type(model).__name__
    missing = [attr for attr in ("blocks", "head") if not isinstance(getattr(model, attr, None), nn.Module)]
    blocks = getattr(model, "blocks", None)
    if "blocks" not in missing and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        missing.append("blocks as an nn.ModuleList or nn.Sequential")
    if missing:
        raise ConfigError(
            f"model.name: {name!r} returned {what}, which lacks {' and '.join(f'`{m}`' for m in missing)}; "
            f"{needed_by} needs the block form: `blocks` (nn.ModuleList / nn.Sequential of the K cuttable blocks, "
            "in order) and `head` (the rest, ending in the classifier), with forward(x) == head(blocks(x)); "
            "or return a fedsim.nn.models.BlockNet")
    if len(blocks) < min_blocks:
        raise ConfigError(f"model.name: {name!r} returned {what} with {len(blocks)} blocks; {needed_by} needs at "
                          f"least {min_blocks}")
    own = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())
           + list(model.head.parameters()) + list(model.head.buffers())}
    outside = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if id(t) not in own]
    if outside:
        raise ConfigError(f"model.name: {name!r} returned {what} with parameters outside `blocks` and `head` "
                          f"({', '.join(outside[:3])}); the block form keeps only those two, so move them into a "
                          "block or the head")
    feature_dim = getattr(model, "feature_dim", None)
    if feature_dim is None:
        linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(f"model.name: {name!r} returned {what} whose `head` has no nn.Linear and which states "
                              f"no `feature_dim`; {needed_by} needs the classifier's input width")
        feature_dim = linears[-1].in_features
    if isinstance(blocks, nn.Sequential):
        named = list(blocks.named_children())
    else:
        named = [(str(i), b) for i, b in enumerate(blocks)]
    cut_points = getattr(model, "cut_points", None)
    return BlockNet(named, model.head, feature_dim=int(feature_dim),
                    cut_points=tuple(cut_points) if cut_points is not None else None)
