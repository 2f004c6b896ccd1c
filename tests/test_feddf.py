"""FedDF (one-shot ensemble distillation on server-held unlabeled data): what it promises.

- the server's distillation set is disjoint from every client's data, the same for every strategy of a scenario
  that sets ``data.server_holdout``, and absent (the partition unchanged) where nothing asks for one;
- distilling an ensemble of identical local models reproduces their predictions on the distillation set;
- on a small Fashion-MNIST slice it beats random guessing by a margin, one seed giving one model.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FMNIST_THREE_CNN_CLIENTS
from fedsim.config import config_from_dict
from fedsim.engine.node import concatenate_replies
from fedsim.engine.runner import run_scenario
from fedsim.errors import ConfigError, DataUnavailableError
from fedsim.algorithms.distill.protocol import FedDFParams
from fedsim.registry import StrategySpec, register_strategy
from fedsim.scenario import partition_for, server_holdout, test_split, train_split

DIGITS = {
    "seed": 4,
    "data": {"name": "digits"},
    "partition": {"kind": "dirichlet", "num_clients": 4, "alpha": 0.5},
    "model": {"name": "cnn", "width": 8},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "simulation": {"backend": "inline"},
    "strategy": {"name": "feddf", "steps": 20},
}

FMNIST = {**FMNIST_THREE_CNN_CLIENTS, "strategy": {"name": "feddf", "steps": 100, "batch_size": 64}}


def tree(base: dict, **sections) -> dict:
    out = copy.deepcopy(base)
    for key, value in sections.items():
        if isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = value
    return out


def fmnist_config(**sections):  # noqa: ANN201
    config = config_from_dict(tree(FMNIST, **sections))
    try:
        train_split(config)
    except DataUnavailableError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    return config


# ------------------------------------------------------------------------------------------- the held-out set
def test_distillation_set_is_disjoint_from_every_client():
    config = config_from_dict(tree(DIGITS))
    n = len(train_split(config))
    held = server_holdout(config)
    parts = partition_for(config)
    assert len(held) == round(0.1 * n)  # FedDF's default share when the scenario sets none
    owned = np.concatenate(parts)
    assert np.intersect1d(owned, held).size == 0  # no client holds a distillation image
    assert len(np.unique(owned)) == len(owned)  # clients stay disjoint among themselves
    np.testing.assert_array_equal(np.sort(np.concatenate([owned, held])), np.arange(n))  # nothing else is lost

    # what each client part reads is its own partition, so it never sees the server's images
    from fedsim.engine.node import ClientEnv

    for pid, part in enumerate(parts):
        env = ClientEnv(config, pid, 1, part)
        np.testing.assert_array_equal(env.train_data().y.numpy(), train_split(config).labels[part])


def test_scenario_holdout_gives_every_strategy_the_same_partition():
    feddf = config_from_dict(tree(DIGITS, data={"server_holdout": 0.2}))
    for name in ("fedavg-oneshot", "ensemble", "dense"):
        other = tree(DIGITS, data={"server_holdout": 0.2})
        other["strategy"] = {"name": name}
        other = config_from_dict(other)
        np.testing.assert_array_equal(server_holdout(other), server_holdout(feddf))
        for a, b in zip(partition_for(other), partition_for(feddf)):
            np.testing.assert_array_equal(a, b)
    assert len(server_holdout(feddf)) == round(0.2 * len(train_split(feddf)))


def test_no_holdout_leaves_the_partition_unchanged():
    from fedsim.data.partition import partition_indices

    plain = tree(DIGITS)
    plain["strategy"] = {"name": "fedavg-oneshot"}
    config = config_from_dict(plain)
    assert server_holdout(config).size == 0
    p = config.partition
    direct = partition_indices(train_split(config).labels, kind=p.kind, num_clients=p.num_clients, seed=config.seed,
                               alpha=p.alpha)
    for a, b in zip(partition_for(config), direct):
        np.testing.assert_array_equal(a, b)
    # FedDF on another dataset needs no held-out images either
    other = config_from_dict(tree(DIGITS, strategy={"distill_data": "dataset", "dataset": "digits",
                                                    "dataset_split": "test"}))
    assert server_holdout(other).size == 0


def test_configuration_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^data\.server_holdout: 0 leaves FedDF no distillation data"):
        config_from_dict(tree(DIGITS, data={"server_holdout": 0.0}))
    with pytest.raises(ConfigError, match=r"^data\.server_holdout: 1\.0 is out of range"):
        config_from_dict(tree(DIGITS, data={"server_holdout": 1.0}))
    with pytest.raises(ConfigError, match=r"^strategy\.dataset: unset"):
        config_from_dict(tree(DIGITS, strategy={"distill_data": "dataset"}))
    with pytest.raises(ConfigError, match=r"^rounds: 3 but feddf is one-shot"):
        config_from_dict(tree(DIGITS, rounds=3))


def test_run_writes_the_clients_partition_without_the_holdout(tmp_path):
    config = config_from_dict(tree(DIGITS))
    summary = run_scenario(config, tmp_path, show_progress=False)
    table = pd.read_csv(tmp_path / "partition.csv")
    n, held = len(train_split(config)), len(server_holdout(config))
    assert int(table["size"].sum()) == n - held
    assert summary["distill_examples"] == held and summary["server_seconds"] >= 0
    assert summary["bytes_up_per_client"] > 0 and summary["local_models"] >= 1


# ------------------------------------------------------------------------------------------ distillation
def _small_model(seed: int = 0) -> torch.nn.Module:
    from fedsim.nn.models import build_model
    from fedsim.nn.training import train_epochs

    config = config_from_dict(tree(DIGITS))
    data = train_split(config)
    model = build_model("cnn", input_shape=data.input_shape, num_classes=10, width=8, seed=seed)
    train_epochs(model, data.x[:400], data.y[:400], epochs=3, batch_size=32, lr=0.05, seed=seed)
    return model.eval()


def test_identical_local_models_are_reproduced_on_the_distillation_set():
    from fedsim.averaging import weighted_average
    from fedsim.frameworks.distill import LogitEnsemble, distill_on_data, seeded
    from fedsim.nn.training import arrays_to_state, predict_logits, state_to_arrays

    config = config_from_dict(tree(DIGITS))
    x = train_split(config).x[torch.as_tensor(server_holdout(config))]
    local = _small_model()
    teachers = [copy.deepcopy(local) for _ in range(3)]
    t_logits = predict_logits(LogitEnsemble(teachers), x)
    torch.testing.assert_close(t_logits, predict_logits(local, x))  # the ensemble of equals is that model
    student = arrays_to_state(copy.deepcopy(local), weighted_average([state_to_arrays(m) for m in teachers]))
    with seeded(0):
        distill_on_data(student, x, t_logits, steps=400, batch_size=64, lr=1e-3, temperature=1.0)
    s_logits = predict_logits(student, x)
    agree = float((s_logits.argmax(1) == t_logits.argmax(1)).float().mean())
    # not exact: the student distills in train mode, so its BatchNorm layers first see batch statistics instead of
    # the local model's running ones and learn back to the teacher's outputs (60 steps: 93% agreement, 400: 98%)
    assert agree >= 0.97
    probs = torch.softmax(s_logits, 1) - torch.softmax(t_logits, 1)
    assert float(probs.abs().mean()) < 0.01


class _IdenticalClient:
    """Every client trains the same model on the same 400 images (ignoring its partition) and uploads it."""

    def __init__(self, params) -> None:  # noqa: ANN001
        self.params = params

    def train(self, content, env):  # noqa: ANN001, ANN201
        from fedsim.frameworks import oneshot_protocol as oneshot
        from fedsim.nn.training import state_to_arrays

        return oneshot.reply(env.partition_id, state_to_arrays(_small_model()), 400, 0.0)

    reduce = staticmethod(concatenate_replies)


register_strategy(StrategySpec(
    name="test-feddf-identical", params=FedDFParams,
    server="fedsim.strategies.feddf:FedDFServer", client=_IdenticalClient, fixed_rounds=lambda p: 1,
    reducible=True, server_holdout=FedDFParams.server_holdout_default,
    description="FedDF's server over clients that all upload one identical model (tests)",
))


def test_feddf_run_over_identical_clients_keeps_their_predictions(tmp_path):
    from fedsim.nn.training import predict_logits

    config = config_from_dict(tree(DIGITS, strategy={"name": "test-feddf-identical", "steps": 400, "batch_size": 64}))
    summary = run_scenario(config, tmp_path, show_progress=False)
    student = torch.load(tmp_path / "model.pt", weights_only=False).eval()
    local = _small_model()
    x = train_split(config).x[torch.as_tensor(server_holdout(config))]
    agree = (predict_logits(student, x).argmax(1) == predict_logits(local, x).argmax(1)).float().mean()
    assert float(agree) >= 0.97
    test = test_split(config)
    local_acc = int((predict_logits(local, test.x).argmax(1) == test.y).sum()) / len(test)
    assert summary["ensemble_accuracy"] == pytest.approx(local_acc, abs=1e-12)
    assert summary["final_accuracy"] == pytest.approx(local_acc, abs=0.03)


# ----------------------------------------------------------------------------------------- on real data
def test_feddf_beats_random_guessing_on_fmnist_and_is_deterministic(tmp_path):
    config = fmnist_config()
    first = run_scenario(config, tmp_path / "a", show_progress=False)
    second = run_scenario(config, tmp_path / "b", show_progress=False)
    assert first["final_accuracy"] > 0.1 + 0.3  # ten classes: random guessing is 0.1
    assert first["final_accuracy"] == second["final_accuracy"]
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=False).state_dict()
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first["distill_examples"] == 150 and first["server_seconds"] > 0


# ------------------------------------------------------------------------------------------ out-of-domain set
def test_an_out_of_domain_set_of_another_shape_is_refused_by_name_or_resized_on_request():
    """FedDF's paper distils on another dataset; offline here the one at hand is scikit-learn's 8 x 8 digits for a
    28 x 28 Fashion-MNIST model: refused with the field named unless ``strategy.dataset_resize`` asks for it, then
    every image is brought to the scenario's shape with its range kept."""
    from fedsim.data import load_dataset
    from strategies.feddf import distillation_inputs

    ood = {"distill_data": "dataset", "dataset": "digits", "name": "feddf"}
    config = config_from_dict(tree(FMNIST, strategy=ood))
    with pytest.raises(ConfigError, match=r"^strategy\.dataset: 'digits' has images of shape \(1, 8, 8\), the "
                                          r"scenario's model takes \(1, 28, 28\); .* strategy\.dataset_resize = true"):
        distillation_inputs(config)
    config = config_from_dict(tree(FMNIST, strategy={**ood, "dataset_resize": True}))
    x = distillation_inputs(config)
    digits = load_dataset("digits", split="train").x
    assert tuple(x.shape) == (len(digits), 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= float(digits.min()) and float(x.max()) <= float(digits.max())
    # a bilinear resampling keeps each image's mean within a few percent of its range
    np.testing.assert_allclose(x.mean(dim=(1, 2, 3)), digits.mean(dim=(1, 2, 3)), atol=0.03)


def test_resize_images_channels_and_constant_images():
    from fedsim.data.resize import resize_images

    flat = torch.full((2, 1, 8, 8), 0.25)
    out = resize_images(flat, (3, 28, 28))
    assert tuple(out.shape) == (2, 3, 28, 28) and torch.equal(out, torch.full_like(out, 0.25))
    rgb = torch.rand(2, 3, 32, 32)
    gray = resize_images(rgb, (1, 32, 32))
    torch.testing.assert_close(gray, rgb.mean(dim=1, keepdim=True))
    assert tuple(resize_images(rgb, (1, 16, 16)).shape) == (2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"cannot bring 3-channel images to 2 channels"):
        resize_images(rgb, (2, 16, 16))
