"""Checks before training that need the data or the machine (``fedsim validate`` and ``fedsim run`` call them).

Loading a scenario (``fedsim.config``) validates every field from the file alone and stays torch-free. What it
cannot know needs the dataset's size and classes or this machine's GPUs and memory: more clients than samples for
a partition that gives each client one, more classes per client or tasks than the data has, an unknown torchvision
feature map, GPUs requested where none is visible, an unreachable Ray cluster, and models or statistics too large
to fit in memory. Each raises a ``ConfigError`` naming the field, so the user learns it in seconds, not after the
first round (or as a ZeroDivisionError, an OOM kill or Ray's "ActorPool is empty").

The checks stay light (``fedsim validate`` of a shipped scenario well under a second): they read the splits'
labels and shapes without torch (``fedsim.data.describe_dataset``) and count the model's parameters from its
layer sizes; torch is imported only for what needs it (a GPU count, a torchvision feature map, a model the
counter does not know). A model of one's own (``model.name = "package.module:function"``) is imported and built
once (``check_factory_model``), so validating it imports its module and torch.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedsim.config import ScenarioConfig
from fedsim.data.base import SplitSummary
from fedsim.errors import ConfigError

RAY_CONNECT_TIMEOUT = 10.0  # seconds to reach simulation.ray_address before giving up
MEMORY_FRACTION = 1.0  # refuse estimates above this share of the machine's physical memory


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def gpu_count() -> int:
    """GPUs torch sees on this machine (0 without CUDA); imports torch."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # pragma: no cover
        return 0


def preflight(config: ScenarioConfig, label: str | None = None) -> None:
    """Run every check on ``config``; a ``ConfigError`` naming the field (and the variant) on the first failure."""
    try:
        check_machine(config)
        check_data(config)
    except ConfigError as exc:
        if label:
            raise ConfigError(f"{exc} (variant {label!r})") from None
        raise


# ------------------------------------------------------------------------------------------------ machine
def check_machine(config: ScenarioConfig) -> None:
    """GPUs, the Ray cluster address, the torchvision feature map name."""
    sim = config.simulation
    gpus = None
    if sim.device == "cuda":
        gpus = gpu_count()
        if gpus == 0:
            raise ConfigError("simulation.device: 'cuda' requested but no GPU is visible on this machine; use "
                              "'auto' or 'cpu'")
    if sim.backend == "ray" and sim.num_gpus and sim.num_gpus > 0 and sim.ray_address is None:
        gpus = gpu_count() if gpus is None else gpus
        if gpus == 0:
            raise ConfigError(
                f"simulation.num_gpus: {sim.num_gpus} GPUs per client requested but no GPU is visible on this "
                "machine (Flower's Ray backend would fail with 'ActorPool is empty'); set it to 0 or leave it unset"
            )
    if sim.backend == "ray" and sim.ray_address:
        check_ray_address(sim.ray_address)
    name = config.model.feature_map
    if name not in ("identity", "random"):
        from fedsim.nn.features import _torchvision_names

        names = _torchvision_names()
        if name not in names:
            close = [n for n in names if n.startswith(name[:4])][:8]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise ConfigError(f"model.feature_map: unknown feature map {name!r}; allowed: identity, random, or a "
                              f"torchvision classification model name such as resnet18{hint}")


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """A ``host:port`` or ``ray://host:port`` address must accept a TCP connection within ``timeout`` seconds
    ("auto" and "local" are Ray's to resolve)."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"simulation.ray_address: {address!r} is not 'auto' or host:port (or ray://host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConfigError(f"simulation.ray_address: cannot reach the Ray cluster at {address!r} within "
                          f"{timeout:.0f} s ({reason}); start it (ray start --head) or fix the address") from None


# --------------------------------------------------------------------------------------------------- data
def split_summary(config: ScenarioConfig, split: str) -> SplitSummary:
    """The scenario's ``split`` as ``fedsim.scenario.train_split`` / ``test_split`` would load it (after
    ``data.max_train`` / ``max_test``), without its images and without torch."""
    from fedsim.data import describe_dataset, slice_indices
    from fedsim.scenario import data_options, derive_seed

    d = config.data
    summary = describe_dataset(d.name, split=split, root=d.root, **dict(sorted(data_options(config).items())))
    keep = slice_indices(len(summary), d.max_train if split == "train" else d.max_test,
                         derive_seed(config.seed, f"{split}-slice"))
    if keep is None:
        return summary
    return summary.subset(keep)


def check_data(config: ScenarioConfig) -> None:
    """Both splits are there; the partition, stream and model sizes fit the data and the machine."""
    train = split_summary(config, "train")  # DataUnavailableError (missing, corrupt, mixed splits) surfaces here
    split_summary(config, "test")
    labels = train.labels
    present = int(np.unique(labels).size)
    n = len(train)
    check_partition(config, n, present)
    if config.partition.kind == "natural":
        check_natural_partition(config, train)
    check_plugin_partition(config, train)
    check_stream(config, present)
    check_factory_model(config, tuple(train.input_shape), train.num_classes)
    check_memory(config, tuple(train.input_shape), train.num_classes)


def check_natural_partition(config: ScenarioConfig, train: SplitSummary) -> None:
    """partition.by names a column of the training split with exactly partition.num_clients distinct values."""
    from fedsim.data.partition import natural_partition
    from fedsim.scenario import natural_groups

    natural_partition(natural_groups(train, config.partition.by, config.data.name), config.partition.num_clients,
                      len(train), sample_groups=config.partition.sample_groups, seed=config.seed)


def check_plugin_partition(config: ScenarioConfig, train: SplitSummary) -> None:
    """A plugin's partition kind (``fedsim.data.register_partition``) runs on the training labels and returns
    partition.num_clients disjoint index arrays (``ConfigError`` naming partition.kind or partition.params)."""
    from fedsim.data.partition import PARTITIONERS, partition_indices

    p = config.partition
    if p.kind in PARTITIONERS:
        partition_indices(train.labels, kind=p.kind, num_clients=p.num_clients, seed=config.seed, params=p.params)


def check_factory_model(config: ScenarioConfig, input_shape: tuple, num_classes: int) -> None:
    """A model of one's own (model.name = "package.module:function"): importable, returns a torch.nn.Module that
    maps a probe batch (2, *input_shape) to (2, num_classes) scores, and states its blocks where the strategy cuts
    them (``fedsim.scenario.block_form_needed``: the block form's head(blocks(x)) must equal its forward).
    Imports the factory's module and torch (the built-in models are counted without either)."""
    from fedsim import catalog

    name = config.model.name
    if not catalog.is_factory_name(name):
        return
    import torch

    from fedsim.nn.models import as_block_net, build_model
    from fedsim.scenario import block_form_needed, derive_seed

    model = build_model(name, input_shape, num_classes, seed=derive_seed(config.seed, "model"),
                        params=config.model.params)
    probe = torch.random.fork_rng(devices=[])
    with probe, torch.no_grad():
        torch.manual_seed(0)
        x = torch.rand(2, *input_shape)
        model.eval()
        try:
            out = model(x)
        except Exception as exc:  # noqa: BLE001 - the user's forward
            raise ConfigError(f"model.name: {name!r} built {type(model).__name__}, whose forward fails on a batch "
                              f"of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"model.name: {name!r} built {type(model).__name__}, which maps a batch of shape "
                              f"{tuple(x.shape)} to {got}; the strategies need class scores of shape "
                              f"(2, {num_classes})")
        need = block_form_needed(config)
        if need is not None:
            net = as_block_net(model, name, *need).eval()
            if not torch.allclose(net(x), out, rtol=1e-4, atol=1e-5):
                raise ConfigError(f"model.name: {name!r}: head(blocks(x)) differs from forward(x) of "
                                  f"{type(model).__name__}; {need[0]} runs the blocks and the head, so forward "
                                  "must be exactly head(blocks(x))")


def check_partition(config: ScenarioConfig, n: int, classes_present: int) -> None:
    p = config.partition
    if p.kind in ("dirichlet", "shards") and p.num_clients > n:
        raise ConfigError(f"partition.num_clients: {p.num_clients} clients for {n} training samples; a {p.kind} "
                          f"partition gives every client at least one, so allowed: at most {n}")
    if p.kind in ("dirichlet", "quantity") and p.min_partition_size * p.num_clients > n:
        raise ConfigError(
            f"partition.min_partition_size: {p.min_partition_size} per client x {p.num_clients} clients exceeds "
            f"the {n} training samples; allowed: at most {n // p.num_clients}"
        )
    if p.kind == "shards" and p.classes_per_client > classes_present:
        raise ConfigError(f"partition.classes_per_client: {p.classes_per_client} is more than the "
                          f"{classes_present} classes of the training data; allowed: 1 to {classes_present}")


def check_stream(config: ScenarioConfig, classes_present: int) -> None:
    s = config.stream
    if s.kind == "class-incremental":
        from fedsim.data.streams import split_classes

        split_classes(list(range(classes_present)), s.tasks, s.first_task_classes)  # ConfigError naming stream.*


# ------------------------------------------------------------------------------------------------- memory
def _batch_norm(channels: int) -> int:
    return 4 * channels + 1  # weight, bias, running mean and variance, num_batches_tracked


def _cnn_size(input_shape: Sequence[int], num_classes: int, width: int) -> int:
    cin, total = int(input_shape[0]), 0
    for cout in (width, 2 * width, 4 * width, 8 * width):
        total += 9 * cin * cout + _batch_norm(cout)
        cin = cout
    return total + cin * num_classes + num_classes


def _resnet18_size(input_shape: Sequence[int], num_classes: int, width: int) -> int:
    total = 9 * int(input_shape[0]) * width + _batch_norm(width)
    inplanes = width
    for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
        planes = width * mult
        for j in range(2):
            total += 9 * inplanes * planes + 9 * planes * planes + 2 * _batch_norm(planes)
            if (stride if j == 0 else 1) != 1 or inplanes != planes:
                total += inplanes * planes + _batch_norm(planes)
            inplanes = planes
    return total + inplanes * num_classes + num_classes


def _mlp_size(input_shape: Sequence[int], num_classes: int, width: int) -> int:
    return math.prod(int(s) for s in input_shape) * width + width + 3 * (width * width + width) \
        + width * num_classes + num_classes


# fedsim.nn.models' networks: parameters + buffers from the layer sizes, and the default width; a test compares
# each with the built model
MODEL_SIZES: dict[str, tuple[Callable[[Sequence[int], int, int], int], int]] = {
    "cnn": (_cnn_size, 32), "resnet18": (_resnet18_size, 64), "mlp": (_mlp_size, 128)}


def counted_parameters(name: str, input_shape: Sequence[int], num_classes: int, width: int | None) -> int | None:
    """Parameters and buffers of ``fedsim.nn.models.build_model(name, ...)`` from its layer sizes (no torch);
    None where only building it can tell (an unknown model, a size out of range, a tensor near 64-bit sizes)."""
    if name not in MODEL_SIZES or len(input_shape) != 3 or num_classes < 1:
        return None
    size, default_width = MODEL_SIZES[name]
    width = default_width if width is None else int(width)
    if width < 1:
        return None
    total = size(tuple(int(s) for s in input_shape), int(num_classes), width)
    return total if 4 * total < 2**63 else None  # no float32 tensor of it can overflow 64-bit sizes


def model_parameters(config: ScenarioConfig, input_shape: tuple, num_classes: int) -> int | None:
    """Parameters (and buffers) of the scenario's trainable model: counted from its layer sizes, or where the
    counter cannot tell, on torch's meta device (nothing is allocated); None when even one tensor's size
    overflows 64 bits."""
    counted = counted_parameters(config.model.name, input_shape, num_classes, config.model.width)
    if counted is not None:
        return counted
    from fedsim import catalog

    if catalog.is_factory_name(config.model.name):  # a model of one's own: built for real (its code may not
        from fedsim.scenario import scenario_model  # know the meta device)

        model = scenario_model(config, num_classes, input_shape)
        return int(sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()))
    return _built_parameters(config, input_shape, num_classes)


def _built_parameters(config: ScenarioConfig, input_shape: tuple, num_classes: int) -> int | None:
    import torch

    from fedsim.scenario import scenario_model

    try:
        with torch.device("meta"):
            model = scenario_model(config, num_classes, input_shape)
    except RuntimeError as exc:
        if "overflow" in str(exc):  # a tensor's byte size does not fit in 64 bits
            return None
        raise
    return int(sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()))


def feature_bytes(config: ScenarioConfig, input_shape: tuple) -> tuple[int, int, str]:
    """(feature dimension d, bytes, what) of the frozen feature map and the d x d float64 statistics (Gram and
    its factor for the solve) that the analytic strategies keep; (0, 0, "") for a torchvision backbone."""
    m = config.model
    flat = int(np.prod(input_shape))
    if m.feature_map == "identity":
        d, projection = flat, 0
    elif m.feature_map == "random":
        d, projection = int(m.feature_dim), 4 * flat * int(m.feature_dim)
    else:
        return 0, 0, ""
    gram = 2 * 8 * d * d
    what = f"the {d} x {d} float64 statistics of the analytic strategies"
    if projection:
        what += f" and the {flat} x {d} random projection"
    return d, gram + projection, what


def check_memory(config: ScenarioConfig, input_shape: tuple, num_classes: int,
                 memory: int | None = None) -> dict[str, Any]:
    """Refuse a model or feature map whose estimated size exceeds the machine's memory; return the estimates."""
    memory = physical_memory() if memory is None else memory
    limit = None if memory is None else memory * MEMORY_FRACTION
    estimates: dict[str, Any] = {"memory": memory}
    d, fbytes, what = feature_bytes(config, input_shape)
    estimates["feature_bytes"] = fbytes
    if limit is not None and fbytes > limit:
        field = "model.feature_dim" if config.model.feature_map == "random" else "model.feature_map"
        value = config.model.feature_dim if field == "model.feature_dim" else config.model.feature_map
        raise ConfigError(f"{field}: {value!r} needs about {_fmt_bytes(fbytes)} ({what}), more than this machine's "
                          f"{_fmt_bytes(memory)} of memory; use a smaller feature_dim")
    params = model_parameters(config, input_shape, num_classes)
    width = config.model.width
    field, value = ("model.width", width) if width is not None else ("model.name", config.model.name)
    if params is None:
        raise ConfigError(f"{field}: {value!r} makes {config.model.name!r} a model whose tensors overflow 64-bit "
                          f"sizes (far more than this machine's {_fmt_bytes(memory or 0)} of memory); use a "
                          "smaller width")
    clients_at_once = max(1, min(config.num_nodes, os.cpu_count() or 1)) if config.simulation.backend == "ray" else 1
    # float32 copies a run holds at least: the server's global model, running average and evaluation copy; each
    # concurrent client's model, gradients, optimizer state and the global model it received
    mbytes = 4 * params * (3 + 4 * clients_at_once)
    estimates["model_parameters"], estimates["model_bytes"] = params, mbytes
    if limit is not None and mbytes > limit:
        raise ConfigError(
            f"{field}: {value!r} makes {config.model.name!r} a model of {params:,} parameters "
            f"({_fmt_bytes(4 * params)} in float32); with the copies a run keeps (server and "
            f"{clients_at_once} concurrent client{'s' if clients_at_once > 1 else ''}) that is about "
            f"{_fmt_bytes(mbytes)}, more than this machine's {_fmt_bytes(memory)} of memory; use a smaller width"
        )
    return estimates
