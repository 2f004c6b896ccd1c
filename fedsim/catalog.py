"""The names a scenario may use for its building blocks, with one line each: importable without torch or Flower.

Validating a scenario (``fedsim validate``) reads only this module and the strategies' protocols, so it stays fast;
the modules that build the objects (``fedsim.data``, ``fedsim.nn.models``, ``fedsim.nn.features``) take their names from
here, so a name exists in exactly one place.
"""

from __future__ import annotations

import re

from fedsim.params import Options

DATASETS: dict[str, str] = {
    "fashion-mnist": "Fashion-MNIST: 70k 28x28 grayscale clothing images, 10 classes (real, offline via apt package "
                     "dataset-fashion-mnist)",
    "mnist": "MNIST: 70k 28x28 grayscale handwritten digits, 10 classes (IDX files or torchvision download)",
    "digits": "scikit-learn digits: 1797 8x8 grayscale digits, 10 classes, stratified 80/20 split (bundled, always "
              "offline)",
    "synthetic": "Gaussian classes with controllable separation, shape (1, 1, dim), for scale tests",
    "cifar10": "CIFAR-10: 60k 32x32 RGB images, 10 classes (python-format files or torchvision download)",
    "cifar100": "CIFAR-100: 60k 32x32 RGB images, 100 fine classes (python-format files or torchvision download)",
    "svhn": "SVHN cropped digits: 32x32 RGB house numbers, 10 classes (.mat files or torchvision download)",
    "imagefolder": "your own images, root/<split>/<class>/*.png|jpg, all of one size, loaded into memory",
    "npz": "your own arrays: data.path = a .npz holding x_train, y_train, x_test, y_test (optional <column>_train "
           "arrays, e.g. groups_train, for partition.kind = natural; classes)",
    "hf": "a Hugging Face dataset (also written 'hf:<id>'): data.path = a save_to_disk directory or parquet files "
          "(offline), or the hub id downloaded with `datasets`; columns in data.options (image_column, label_column)",
}

#: ``data.name = "hf:<id>"``: the "hf" dataset with a hub id
HF_PREFIX = "hf:"

PARTITIONS: dict[str, str] = {
    "iid": "uniformly shuffled, equal sizes (differ by at most 1), as flwr-datasets' IidPartitioner",
    "dirichlet": "label skew: each class split among clients by Dirichlet(alpha) proportions (DirichletPartitioner); "
    "small alpha = few classes per client, empty clients possible",
    "shards": "pathological label skew: every client holds exactly classes_per_client classes, each class split "
    "evenly among the clients holding it (PathologicalPartitioner, first class round-robin, the rest random)",
    "quantity": "quantity skew: IID content, client sizes drawn from Dirichlet(quantity_alpha) over clients "
    "(SizePartitioner), at least min_partition_size each",
    "natural": "one client per distinct value of the training data's column partition.by (a writer, user, device; "
    "NaturalIdPartitioner's order: sorted values), partition.num_clients = the number of values (or fewer with "
    "sample_groups = true: a seeded draw of them)",
}

MODELS: dict[str, str] = {
    "cnn": "4 conv-BN-ReLU(-maxpool) blocks, width w, 2w, 4w, 8w (default w=32); any image size >= 8x8",
    "resnet18": "CIFAR-style ResNet-18: 3x3 stem, no maxpool, 8 BasicBlocks (default width 64; FuseFL uses 20)",
    "mlp": "flatten + 4 Linear-ReLU blocks of width w (default 128); for flat or tiny inputs",
}

FACTORY_FORMS = "a factory 'package.module:function' or 'path/to/file.py:function'"
_FACTORY = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|.+\.py):"
                      r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_factory_name(name: object) -> bool:
    """``model.name`` names a model of one's own: ``"package.module:function"`` or ``"path/to/file.py:function"``
    (``function(num_classes, input_shape, **model.params) -> torch.nn.Module``; ``fedsim.nn.models.build_model``)."""
    return isinstance(name, str) and name not in MODELS and bool(_FACTORY.match(name))


def is_dataset_name(name: object) -> bool:
    """``data.name``: a name of DATASETS or ``"hf:<id>"``."""
    return isinstance(name, str) and (name in DATASETS or (name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX)))


# blocks of each model's BlockNet (what FuseFL may cut into stages); tests check them against fedsim.nn.models
MODEL_BLOCKS: dict[str, int] = {"cnn": 4, "resnet18": 9, "mlp": 4}

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "gelu", "identity")

#: The buffer layer's weights (``fedsim.nn.features.BufferLayer``): "normal" N(0, 1/D) or "uniform" U(+-1/sqrt(D)),
#: D = the backbone's dimension (the official analytic-learning buffer: torch's nn.Linear initialization).
BUFFER_INITS: tuple[str, ...] = ("normal", "uniform")

STREAM_KINDS: tuple[str, ...] = ("none", "class-incremental", "online")

STRATEGY_KINDS: tuple[str, ...] = ("federated", "continual")


# -- live names: what a scenario may name now (plugins included) -------------------------------------------------
# The dicts above are the registries themselves: a builder that registers a name (a plugin's dataset, model or
# partition) adds it with ``register_name``, and validation reads them when a scenario is checked, not at import.
_KINDS: dict[str, dict[str, str]] = {"datasets": DATASETS, "models": MODELS, "partitions": PARTITIONS}
_BEFORE_LOOKUP: list = []  # called before names are read: fedsim.registry's plugin discovery


def before_lookup(hook) -> None:  # noqa: ANN001
    """Call ``hook()`` before a scenario's names are read (``fedsim.registry`` registers its discovery here, so
    plugins are imported before ``data.name`` or ``model.name`` is checked)."""
    if hook not in _BEFORE_LOOKUP:
        _BEFORE_LOOKUP.append(hook)


def names(kind: str) -> dict[str, str]:
    """The names of ``kind`` ("datasets", "models", "partitions") registered now, with their one-line
    descriptions, after plugin discovery."""
    for hook in list(_BEFORE_LOOKUP):
        hook()
    return dict(_KINDS[kind])


def live(source: object) -> tuple:
    """The names of a registry of this module (``DATASETS``, ``MODELS``, ``PARTITIONS``) as they are now, after
    plugin discovery: what a constraint reads when a value is checked."""
    for hook in list(_BEFORE_LOOKUP):
        hook()
    return tuple(source)  # type: ignore[call-overload]


def register_name(kind: str, name: str, description: str) -> None:
    """Make ``name`` a valid ``data.name`` / ``model.name`` / ``partition.kind`` (``kind`` "datasets", "models",
    "partitions"); the builder that loads or builds it registers its own object beside (fedsim.data, fedsim.nn)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind[:-1]} name must be a non-empty string, got {name!r}")
    _KINDS[kind][name] = description


class RegisteredNames(Options):
    """An ``Options`` constraint (``fedsim.params``) whose values are the names of ``kind`` registered when a value
    is checked, so names a plugin added are valid (a plain ``Options`` freezes its values at import)."""

    def __init__(self, kind: str) -> None:  # noqa: D107 -- Options is frozen: set through object.__setattr__
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
        object.__setattr__(self, "kind", kind)

    @property
    def values(self) -> tuple:  # type: ignore[override]
        return tuple(names(self.kind))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegisteredNames) and other.kind == self.kind

    def __hash__(self) -> int:
        return hash(("RegisteredNames", self.kind))

    def __repr__(self) -> str:
        return f"RegisteredNames({self.kind!r})"
