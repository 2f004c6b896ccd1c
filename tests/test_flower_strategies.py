"""Flower's Message-API strategies as fedsim strategies: each runs, and each does what its algorithm promises.

The checks compare the saved global model with the rule written by hand over the replies the clients really sent
(recorded by wrapping the SGD client part): FedMedian is the coordinate-wise median, FedTrimmedAvg the trimmed
mean, Krum keeps the honest model closest to its neighbours when one client sends an outlier, Multi-Krum
averages the others, q-FedAvg with q = 0 is the uniform mean, DP clipping bounds each update's norm (client side)
and the average's (server side, without noise).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import DIGITS, scenario_config
from fedsim.clients.sgd import SGDClient, clip_update, update_norm
from fedsim.engine.runner import run_scenario
from fedsim.errors import ConfigError
from fedsim.algorithms.fedavg import protocol
from fedsim.registry import strategies
from fedsim.nn.training import evaluate

FLOWER = ["fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum",
          "bulyan", "qfedavg", "fedavg-dp-server", "fedavg-dp-client"]


def _run(tmp_path, label, *overrides):
    config = scenario_config(DIGITS, tmp_path, "rounds=1", *overrides, filename=f"{label}.toml")
    summary = run_scenario(config, tmp_path / label, show_progress=False)
    model = torch.load(tmp_path / label / "model.pt", weights_only=False)
    return summary, {k: v.detach().numpy() for k, v in model.state_dict().items()}, config


@pytest.fixture
def replies(monkeypatch):
    """Every train call of the SGD client: round, partition id, received model, sent model, example count;
    ``outlier`` = {pid: factor} makes that client send received + factor * (its update)."""
    seen: list[dict] = []
    outlier: dict[int, float] = {}
    train = SGDClient.train

    def spying(self, content, env):
        out = train(self, content, env)
        received = {k: np.array(v) for k, v in protocol.parse_train(content)[0].items()}
        sent, n, _ = protocol.parse_reply(out)
        sent = {k: np.array(v) for k, v in sent.items()}
        if env.partition_id in outlier:
            f = outlier[env.partition_id]
            sent = {k: (received[k] + f * (v - received[k])).astype(v.dtype) if v.dtype.kind == "f" else v
                    for k, v in sent.items()}
            out = protocol.reply(sent, n, 0.0)
        seen.append({"round": env.round, "pid": env.partition_id, "received": received, "sent": sent, "n": n,
                     "initial_loss": protocol.initial_loss_of(out), "env": env})
        return out

    monkeypatch.setattr(SGDClient, "train", spying)
    spying.seen, spying.outlier = seen, outlier
    return spying


def _stack(seen, key, dtype=None):
    """The replies' arrays under ``key``, stacked in their own float dtype (integers as float64, as Flower sees
    them) or in ``dtype``."""
    arrays = [np.asarray(r["sent"][key]) for r in seen]
    dtype = dtype or (arrays[0].dtype if arrays[0].dtype.kind == "f" else np.float64)
    return np.stack([a.astype(dtype) for a in arrays])


def _assert_model(got, want, atol=1e-6):
    for key, value in got.items():
        if value.dtype.kind != "f":  # the torch module's integer counters truncate the float64 aggregate
            assert int(value) == int(np.trunc(want[key])), key
            continue
        np.testing.assert_allclose(np.asarray(value, dtype=np.float64), want[key], atol=atol, rtol=0, err_msg=key)


@pytest.mark.parametrize("name", FLOWER)
def test_each_flower_strategy_trains_the_global_model(name, tmp_path, replies):
    summary, model, _ = _run(tmp_path, name, f"strategy.name={name}")
    assert summary["status"] == "completed" and 0.0 <= summary["final_accuracy"] <= 1.0
    initial = replies.seen[0]["received"]
    changed = [k for k in initial if initial[k].dtype.kind == "f" and not np.allclose(model[k], initial[k])]
    assert changed, f"{name}: the global model did not move"
    assert len(replies.seen) == 6 and "rounds_not_aggregated" not in summary


def test_every_flower_strategy_is_registered_and_listed(capsys):
    from fedsim.cli import main

    specs = strategies()
    assert set(FLOWER) <= set(specs)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in FLOWER:
        assert f"  {name} " in out
        for field in dataclasses.fields(specs[name].params):
            assert f"{field.name}=" in out
    # Flower's own parameter names
    assert {"server_learning_rate", "server_momentum"} <= {f.name for f in dataclasses.fields(specs["fedavgm"].params)}
    assert {"eta", "tau", "beta_1", "beta_2"} <= {f.name for f in dataclasses.fields(specs["fedadam"].params)}
    assert {"noise_multiplier", "clipping_norm"} <= {f.name for f in dataclasses.fields(specs["fedavg-dp-client"].params)}


def test_fedmedian_is_the_coordinatewise_median_of_the_replies(tmp_path, replies):
    _, model, _ = _run(tmp_path, "median", "strategy.name=fedmedian")
    seen = replies.seen
    assert len(seen) == 6
    _assert_model(model, {k: np.median(_stack(seen, k), axis=0) for k in model}, atol=0)


def test_fedtrimmedavg_is_the_trimmed_mean_of_the_replies(tmp_path, replies):
    from scipy.stats import trim_mean

    _, model, _ = _run(tmp_path, "trimmed", "strategy.name=fedtrimmedavg", "strategy.beta=0.2")
    # 6 replies, beta 0.2: one dropped at each end of every coordinate
    _assert_model(model, {k: trim_mean(_stack(replies.seen, k, np.float64), 0.2, axis=0) for k in model})


def _krum_scores(flat: np.ndarray, f: int) -> np.ndarray:
    d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    k = len(flat) - f - 2
    return np.array([np.sort(np.delete(row, i))[:k].sum() for i, row in enumerate(d)])


def test_krum_keeps_an_honest_model_when_one_client_sends_an_outlier(tmp_path, replies):
    replies.outlier[2] = 50.0
    _, model, _ = _run(tmp_path, "krum", "strategy.name=krum", "strategy.num_malicious_nodes=1")
    seen = sorted(replies.seen, key=lambda r: r["pid"])
    flat = np.stack([np.concatenate([np.asarray(r["sent"][k], np.float64).ravel() for k in model]) for r in seen])
    scores = _krum_scores(flat, f=1)
    chosen = seen[int(np.argmin(scores))]
    assert chosen["pid"] != 2 and int(np.argmax(scores)) == 2  # the outlier scores worst
    _assert_model(model, chosen["sent"], atol=0)  # Krum's result is that one client's model


def test_multikrum_averages_the_honest_clients(tmp_path, replies):
    replies.outlier[2] = 50.0
    _, model, _ = _run(tmp_path, "multikrum", "strategy.name=multikrum", "strategy.num_malicious_nodes=1")
    honest = [r for r in replies.seen if r["pid"] != 2]  # m = n - f = 5: all but the outlier
    weights = np.array([r["n"] for r in honest], dtype=np.float64)
    weights /= weights.sum()
    _assert_model(model, {k: np.tensordot(weights, _stack(honest, k), axes=1) for k in model})


def test_qfedavg_with_q_0_is_the_uniform_mean_and_reads_the_received_models_loss(tmp_path, replies):
    _, model, config = _run(tmp_path, "qfedavg", "strategy.name=qfedavg", "strategy.q=0.0")
    seen = replies.seen
    _assert_model(model, {k: _stack(seen, k).mean(0) for k in model}, atol=1e-5)
    # the paper's F_k(w_t): each client reported the loss of the model it received, on its own data
    from fedsim.nn.training import arrays_to_state

    for r in seen[:2]:
        env = r["env"]
        data = env.train_data()
        net = arrays_to_state(env.initial_model(), r["received"])
        want = evaluate(net, data.x, data.y, batch_size=config.evaluation.batch_size)["loss"]
        assert r["initial_loss"] == pytest.approx(want, rel=1e-6)


def test_qfedavg_training_loss_option_sends_no_initial_loss(tmp_path, replies):
    _run(tmp_path, "qtrain", "strategy.name=qfedavg", "strategy.loss=training")
    assert all(r["initial_loss"] is None for r in replies.seen)


def test_client_side_dp_clips_every_update_to_the_norm(tmp_path, replies):
    summary, _, _ = _run(tmp_path, "dpc", "strategy.name=fedavg-dp-client", "strategy.clipping_norm=0.05",
                         "strategy.noise_multiplier=0.0")
    for r in replies.seen:
        norm = update_norm(r["sent"], r["received"])
        assert norm <= 0.05 * (1 + 1e-5)
        assert norm == pytest.approx(0.05, rel=1e-4)  # local training moved further than 0.05: clipping was active
        for k, v in r["sent"].items():  # integer counters are sent back as received
            if v.dtype.kind != "f":
                assert np.array_equal(v, r["received"][k])
    assert summary["dp_sampled_clients"] == 6 and summary["dp_noise_std"] == 0.0


def test_server_side_dp_averages_clipped_updates_uniformly(tmp_path, replies):
    _, model, _ = _run(tmp_path, "dps", "strategy.name=fedavg-dp-server", "strategy.clipping_norm=0.05",
                       "strategy.noise_multiplier=0.0")
    seen = replies.seen
    received = seen[0]["received"]
    clipped = [clip_update(r["sent"], received, 0.05) for r in seen]
    want = {k: np.mean([np.asarray(c[k], np.float64) for c in clipped], axis=0) for k in model}
    _assert_model(model, want, atol=1e-6)
    assert update_norm(model, received) <= 0.05 * (1 + 1e-5)


def test_dp_noise_is_seeded_and_scaled(tmp_path, replies):
    _, quiet, _ = _run(tmp_path, "n0", "strategy.name=fedavg-dp-client", "strategy.noise_multiplier=0.0")
    before = np.random.get_state()[1].copy()
    summary, noisy, _ = _run(tmp_path, "n1", "strategy.name=fedavg-dp-client", "strategy.noise_multiplier=0.5")
    assert np.array_equal(np.random.get_state()[1], before)  # the noise came from its own seed, not the caller's RNG
    _, again, _ = _run(tmp_path, "n2", "strategy.name=fedavg-dp-client", "strategy.noise_multiplier=0.5")
    _assert_model(noisy, again, atol=0)  # one seed, one noise draw
    key = "head.fc.weight"
    noise = (noisy[key].astype(np.float64) - quiet[key]).ravel()
    assert summary["dp_noise_std"] == pytest.approx(0.5 * 1.0 / 6)
    assert np.std(noise) == pytest.approx(summary["dp_noise_std"], rel=0.3)


def test_dp_examples_weighting_is_flowers_weighted_average(tmp_path, replies):
    _, model, _ = _run(tmp_path, "dpw", "strategy.name=fedavg-dp-server", "strategy.clipping_norm=0.05",
                       "strategy.noise_multiplier=0.0", "strategy.weighting=examples")
    seen = replies.seen
    received = seen[0]["received"]
    weights = np.array([r["n"] for r in seen], dtype=np.float64)
    weights /= weights.sum()
    clipped = [clip_update(r["sent"], received, 0.05) for r in seen]
    _assert_model(model, {k: sum(w * np.asarray(c[k], np.float64) for w, c in zip(weights, clipped))
                          for k in model}, atol=1e-6)


def test_clip_update_bounds_the_norm_and_keeps_small_updates():
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(4, 3)).astype(np.float32), "n": np.array(7, dtype=np.int64)}
    big = {"w": g["w"] + 10 * rng.normal(size=(4, 3)).astype(np.float32), "n": np.array(12, dtype=np.int64)}
    out = clip_update(big, g, 1.0)
    assert update_norm(out, g) == pytest.approx(1.0, rel=1e-6) and out["w"].dtype == np.float32
    assert int(out["n"]) == 7
    small = {"w": g["w"] + np.float32(1e-3), "n": g["n"]}
    np.testing.assert_array_equal(clip_update(small, g, 1.0)["w"], small["w"])


@pytest.mark.parametrize("overrides, field", [
    (["strategy.name=fedtrimmedavg", "strategy.beta=0.5"], "strategy.beta"),
    (["strategy.name=fedavgm", "strategy.server_momentum=1.0"], "strategy.server_momentum"),
    (["strategy.name=fedadam", "strategy.tau=0.0"], "strategy.tau"),
    (["strategy.name=krum", "strategy.num_malicious_nodes=2"], "strategy.num_malicious_nodes"),  # 6 <= 2f + 2
    (["strategy.name=multikrum", "strategy.num_nodes_to_select=7"], "strategy.num_nodes_to_select"),
    (["strategy.name=bulyan", "strategy.num_malicious_nodes=1"], "strategy.num_malicious_nodes"),  # 6 < 4f + 3
    (["strategy.name=qfedavg", "strategy.loss=mean"], "strategy.loss"),
    (["strategy.name=fedavg-dp-server", "strategy.clipping_norm=0"], "strategy.clipping_norm"),
    (["strategy.name=fedavg-dp-client", "strategy.noise_multiplier=-1"], "strategy.noise_multiplier"),
    (["strategy.name=fedbuff", "simulation.clients_per_node=2"], "simulation.clients_per_node"),
])
def test_invalid_parameters_are_refused_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        scenario_config(DIGITS, tmp_path, *overrides)


def test_defaults_follow_the_papers_where_flowers_differ():
    specs = strategies()
    assert specs["fedavgm"].params().server_momentum == 0.9  # Flower's 0.0 would be FedAvg
    assert specs["multikrum"].params().num_nodes_to_select is None  # n - f (Blanchard et al.)
    assert specs["qfedavg"].params().loss == "global-model"
    assert specs["fedavg-dp-server"].params().weighting == "uniform"


def test_protocol_keys_are_flowers():
    from flwr.serverapp.strategy import FedAvg, QFedAvg
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    assert protocol.CLIP_KEY == KEY_CLIPPING_NORM
    default = FedAvg()
    assert (default.arrayrecord_key, default.configrecord_key, default.weighted_by_key) == (
        protocol.ARRAYS_KEY, protocol.CONFIG_KEY, protocol.WEIGHT_KEY)
    assert QFedAvg(client_learning_rate=0.1).train_loss_key == protocol.LOSS_KEY
