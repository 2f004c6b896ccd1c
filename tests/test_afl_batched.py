"""AFL's batched node path (issue #26): a node serving many clients answers for all of them with one forward over
their rows (`AFLClient.train_group`, the engine's `train_group` hook) instead of one forward, QR and record per
client. It must give the per-client path's combined reply to float64 round-off, each client's bytes exactly as if
it had sent alone, the same clients.csv and the same failures; a crash falls back to the per-client path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import scenario_config
import fedsim.clients.afl
from fedsim.algorithms.afl import protocol
from fedsim.algorithms.afl.learner import AFLLearner, client_form, factor_is_smaller, reduce_replies
from fedsim.analytic import unpack_upper
from fedsim.clients.afl import AFLClient, reply_nbytes
from fedsim.engine.accounting import failing_clients, record_nbytes
from fedsim.engine.node import ClientEnv
from fedsim.engine.runner import run_scenario
from fedsim.scenario import partition_for

D, C = 64, 10
# quantity skew over 16 clients of 1,500 rows: empty clients, clients below d / 2 rows (factor), above d (Gram)
BASE = f"""
seed = 4
rounds = 1
[data]
name = "fashion-mnist"
max_train = 1500
max_test = 300
[partition]
kind = "quantity"
num_clients = 16
quantity_alpha = 0.2
[model]
feature_map = "random"
feature_dim = {D}
[simulation]
backend = "inline"
[strategy]
name = "afl"
"""


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def gram_of(arrays) -> np.ndarray:
    """C of a reply's raw statistics, whatever its form."""
    if "factor" in arrays:
        f = np.asarray(arrays["factor"])
        return f.T @ f
    return unpack_upper(np.asarray(arrays["gram"]), D)


def envs_of(config, pids):
    parts = partition_for(config)
    return [ClientEnv(config, pid, 1, parts[pid]) for pid in pids]


def test_the_scenario_mixes_every_client_shape(tmp_path):
    config = scenario_config(BASE, tmp_path)
    sizes = [len(p) for p in partition_for(config)]
    assert 0 in sizes, sizes
    assert any(0 < n and factor_is_smaller(n, D) for n in sizes), sizes
    assert any(n > D for n in sizes), sizes


@pytest.mark.parametrize("upload", ["auto", "statistics", "factor"])
@pytest.mark.parametrize("pids", [list(range(16)), [0], [3, 7, 11], list(range(4, 12))])
def test_group_reply_equals_the_per_client_replies_reduced(tmp_path, upload, pids):
    config = scenario_config(BASE, tmp_path, f"strategy.upload={upload}")
    request = protocol.request(config.strategy.params)
    client = AFLClient(config.strategy.params)
    singles = [client.train(request, env) for env in envs_of(config, pids)]
    grouped = client.train_group(request, envs_of(config, pids))
    # per client: exactly the bytes, examples and (absent) loss of its own reply
    assert grouped.client_bytes == [record_nbytes(r) for r in singles]
    assert grouped.client_examples == [protocol.parse_reply(r)[1] for r in singles]
    assert all(v != v for v in grouped.client_train_loss)
    # combined: what the per-client replies reduce to, to float64 round-off, in the same form
    expected, n_expected = protocol.parse_reply(AFLClient.reduce(singles))
    got, n_got = protocol.parse_reply(grouped.content)
    assert n_got == n_expected == sum(grouped.client_examples)
    assert int(got["count"][0]) == int(expected["count"][0])
    assert set(got) == set(expected)
    assert rel_err(gram_of(got), gram_of(expected)) < 1e-12
    assert rel_err(got["cross"], expected["cross"]) < 1e-12
    w_got = AFLLearner().add_reply(got, clients=len(pids)).solve().coef_
    w_expected = AFLLearner().add_reply(expected, clients=len(pids)).solve().coef_
    assert rel_err(w_got, w_expected) < 1e-10


def test_solution_uploads_keep_the_per_client_path(tmp_path):
    config = scenario_config(BASE, tmp_path, "strategy.upload=solution")
    request = protocol.request(config.strategy.params)
    assert AFLClient(config.strategy.params).train_group(request, envs_of(config, [0, 1])) is None
    with pytest.raises(ValueError, match="client_form: upload must be one of"):
        client_form(3, D, "solution")


def test_reply_nbytes_is_the_size_of_the_reply_for_every_row_count():
    rng = np.random.default_rng(0)
    for upload in ("auto", "statistics", "factor"):
        for n in [0, 1, 2, 31, 32, 33, 63, 64, 65, 200, 1000, 10**6]:
            kind, rows = client_form(n, D, upload)
            if kind == "factor":
                arrays = {"factor": rng.normal(size=(rows, D)), "cross": rng.normal(size=(D, C)),
                          "count": np.array([n], np.int64)}
            else:
                arrays = {"gram": rng.normal(size=rows), "cross": rng.normal(size=(D, C)),
                          "count": np.array([n], np.int64)}
            assert reply_nbytes(kind, rows, D, C, n) == record_nbytes(protocol.reply(arrays, n)), (upload, n)


def run(tmp_path, name, *overrides):
    config = scenario_config(BASE, tmp_path, *overrides)
    summary = run_scenario(config, tmp_path / name, show_progress=False)
    model = torch.load(tmp_path / name / "model.pt", weights_only=False)
    table = pd.read_csv(tmp_path / name / "clients.csv")
    return summary, model[-1].weight.detach().numpy().T.astype(np.float64), table


SAME = ["final_accuracy", "bytes_up", "bytes_down", "messages_up", "messages_down", "answered_clients",
        "dropped_clients", "dropped_client_ids", "train_samples", "failed_client_rounds"]


@pytest.mark.parametrize("upload", ["auto", "statistics", "factor"])
def test_batched_nodes_equal_the_per_client_path_end_to_end(tmp_path, monkeypatch, upload):
    """Same weights (1e-10), same clients.csv (bytes, examples, failures per client), same summary counts, with
    injected failures inside the groups; the reference run has no train_group hook (the per-client loop)."""
    over = [f"strategy.upload={upload}", "simulation.clients_per_node=5", "simulation.failure_rate=0.25"]
    calls = []
    real = AFLClient.train_group

    def counted(self, content, envs):
        calls.append([e.partition_id for e in envs])
        return real(self, content, envs)

    monkeypatch.setattr(AFLClient, "train_group", counted)
    batched, w_batched, t_batched = run(tmp_path, "batched", *over)
    failed = failing_clients(4, 1, 16, 0.25)
    assert len(failed) == 4 and sorted(p for c in calls for p in c) == sorted(set(range(16)) - failed)
    monkeypatch.delattr(AFLClient, "train_group")
    single, w_single, t_single = run(tmp_path, "single", *over)
    assert rel_err(w_batched, w_single) < 1e-10
    pd.testing.assert_frame_equal(t_batched, t_single)
    assert set(t_batched.loc[t_batched["failed"], "client"]) == set(failed)
    for key in SAME:
        assert batched[key] == single[key], key


def test_a_crash_in_the_group_falls_back_to_the_per_client_path(tmp_path, monkeypatch):
    """The group's computation fails (here: because of clients 3 and 9's data); the node then serves its clients
    one by one, and only the clients that crash there are dropped."""
    real_train, real_group = AFLClient.train, AFLClient.train_group

    def flaky(self, content, env):
        if env.partition_id in (3, 9):
            raise RuntimeError("corrupt image")
        return real_train(self, content, env)

    def flaky_group(self, content, envs):
        if {3, 9} & {e.partition_id for e in envs}:
            raise RuntimeError("corrupt image")
        return real_group(self, content, envs)

    monkeypatch.setattr(AFLClient, "train", flaky)
    monkeypatch.setattr(AFLClient, "train_group", flaky_group)
    summary, w, table = run(tmp_path, "crash", "simulation.clients_per_node=4")
    assert summary["dropped_client_ids"] == [3, 9] and summary["failed_client_rounds"] == 2
    assert table.loc[table["failed"], "client"].tolist() == [3, 9]
    monkeypatch.setattr(AFLClient, "train", real_train)
    monkeypatch.delattr(AFLClient, "train_group")

    def without(self, content, env):
        if env.partition_id in (3, 9):
            raise RuntimeError("left out")
        return real_train(self, content, env)

    monkeypatch.setattr(AFLClient, "train", without)
    _, w_ref, t_ref = run(tmp_path, "reference", "simulation.clients_per_node=4")
    assert rel_err(w, w_ref) < 1e-10
    pd.testing.assert_frame_equal(table, t_ref)


def test_reply_nbytes_at_the_scenario_dimension_counts_without_building_the_form():
    """At d = 2048 (scenarios/afl-fmnist.toml) a Gram-form client's count is the size of its real 16.8 MB reply;
    the count builds no array (it once built a zeros(d (d + 1) / 2, d) factor, 32 GiB, for every Gram client: the
    batched path then raised MemoryError and the node fell back to the per-client loop, computing twice)."""
    dim, n = 2048, 6000
    kind, rows = client_form(n, dim, "auto")
    assert (kind, rows) == ("statistics", dim * (dim + 1) // 2)
    arrays = {"gram": np.zeros(rows), "cross": np.zeros((dim, C)), "count": np.array([n], np.int64)}
    assert reply_nbytes(kind, rows, dim, C, n) == record_nbytes(protocol.reply(arrays, n))
    kind, rows = client_form(1000, dim, "auto")
    arrays = {"factor": np.ones((rows, dim)), "cross": np.zeros((dim, C)), "count": np.array([1000], np.int64)}
    assert reply_nbytes(kind, rows, dim, C, 1000) == record_nbytes(protocol.reply(arrays, 1000))
    with pytest.raises(ValueError, match="kind must be"):
        reply_nbytes("solution", 3, dim, C, 3)


@pytest.mark.parametrize("upload", ["auto", "statistics"])
def test_a_group_holding_a_gram_client_is_bit_for_bit_the_reduced_replies(tmp_path, upload):
    """A group with a client above d / 2 rows (a Gram upload) answers exactly what `reduce` of the clients' own
    replies gives (same arrays, bit for bit), as the per-client loop does; so does a group of one such client."""
    config = scenario_config(BASE, tmp_path, f"strategy.upload={upload}")
    sizes = [len(p) for p in partition_for(config)]
    gram_pid = next(i for i, n in enumerate(sizes) if not factor_is_smaller(n, D))
    request = protocol.request(config.strategy.params)
    client = AFLClient(config.strategy.params)
    for pids in (list(range(16)), [gram_pid], sorted({0, gram_pid, 15})):
        singles = [client.train(request, env) for env in envs_of(config, pids)]
        expected = singles[0] if len(singles) == 1 else AFLClient.reduce(singles)
        grouped = client.train_group(request, envs_of(config, pids))
        got, n_got = protocol.parse_reply(grouped.content)
        want, n_want = protocol.parse_reply(expected)
        assert n_got == n_want and list(got) == list(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), (pids, key)
        assert grouped.client_bytes == [record_nbytes(r) for r in singles]
