"""The engine features AFL relies on, checked through AFL: grouped nodes keep per-client bytes and failures, and
injected failures / real client crashes drop exactly the chosen clients (inline backend, real Fashion-MNIST)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import scenario_config
import fedsim.clients.afl
from fedsim.engine.accounting import failing_clients, node_group
from fedsim.scenario import partition_for, train_split
from fedsim.engine.runner import run_scenario

BASE = """
seed = 5
rounds = 1
[data]
name = "fashion-mnist"
max_train = 2000
max_test = 500
[partition]
kind = "dirichlet"
num_clients = 24
alpha = 0.3
[model]
feature_map = "random"
feature_dim = 96
[simulation]
backend = "inline"
[strategy]
name = "afl"
upload = "statistics"  # the byte counts below are those of the packed Gram
"""
D, C = 96, 10
# one client's upload: packed Gram d (d + 1) / 2 and Q (d x c), float64
PAYLOAD = 8 * (D * (D + 1) // 2 + D * C)


def run(tmp_path, name, *overrides):
    config = scenario_config(BASE, tmp_path, *overrides)
    summary = run_scenario(config, tmp_path / name, show_progress=False)
    model = torch.load(tmp_path / name / "model.pt", weights_only=False)
    table = pd.read_csv(tmp_path / name / "clients.csv")
    return config, summary, model[-1].weight.detach().numpy().T, table


def ridge_on(config, model_dir, keep):
    """numpy ridge on the clients in `keep` (features from the saved projection)."""
    model = torch.load(model_dir / "model.pt", weights_only=False)
    proj = model[0].weight.numpy().astype(np.float64)
    parts = partition_for(config)
    idx = np.sort(np.concatenate([parts[k] for k in keep]))
    train = train_split(config)
    x = np.maximum(train.x[idx].reshape(len(idx), -1).numpy().astype(np.float64) @ proj, 0.0)
    return np.linalg.solve(x.T @ x + np.eye(D), x.T @ np.eye(C)[train.labels[idx]])


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("upload", ["statistics", "solution"])
def test_grouped_nodes_same_weights_same_per_client_bytes(tmp_path, upload):
    _, single, w1, t1 = run(tmp_path, "single", f"strategy.upload={upload}")
    _, grouped, w5, t5 = run(tmp_path, "grouped", f"strategy.upload={upload}", "simulation.clients_per_node=5")
    assert rel_err(w5, w1) < 1e-12
    # 24 clients on 5 nodes: 5 messages each way instead of 24, but every client's bytes are counted as if alone
    assert single["messages_up"] == 24 and grouped["messages_up"] == 5 and grouped["messages_down"] == 5
    pd.testing.assert_frame_equal(t1, t5)
    assert grouped["bytes_up"] == single["bytes_up"] == t1["bytes_up"].sum()
    assert grouped["bytes_down"] == single["bytes_down"]
    # every client uploads the same shapes whatever its data (empty clients included): one payload + metadata
    assert t1["bytes_up"].between(PAYLOAD, PAYLOAD + 1024).all()


def _seed_with_full_and_partial_group_failure(n: int, rate: float, per_node: int) -> int:
    """A seed whose round-1 failures wipe out one whole node group and hit another one partly."""
    for seed in range(200):
        failed = failing_clients(seed, 1, n, rate)
        hits = [len(failed.intersection(node_group(q, per_node, n))) for q in range(-(-n // per_node))]
        if per_node in hits and any(0 < h < per_node for h in hits):
            return seed
    raise AssertionError("no such seed in 0..199")


def test_failures_inside_groups_are_counted_per_client(tmp_path):
    seed = _seed_with_full_and_partial_group_failure(24, 0.25, 3)
    config, summary, w, table = run(tmp_path, "fail", f"seed={seed}", "simulation.failure_rate=0.25",
                                    "simulation.clients_per_node=3")
    failed = failing_clients(seed, 1, 24, 0.25)
    assert len(failed) == 6
    assert summary["dropped_clients"] == summary["failed_client_rounds"] == 6
    assert summary["dropped_client_ids"] == sorted(failed)
    assert set(table.loc[table["failed"], "client"]) == set(failed)  # clients.csv: the engine's (run-files.md)
    assert not table["silent"].any()
    # failed clients upload nothing; the survivors' bytes are counted one by one
    assert (table.loc[table["failed"], "bytes_up"] == 0).all()
    assert table.loc[~table["failed"], "bytes_up"].between(PAYLOAD, PAYLOAD + 1024).all()
    assert summary["bytes_up"] == table["bytes_up"].sum()
    # every one of the 8 nodes answered once, the one that lost all its clients with an error reply
    assert summary["messages_up"] == 8
    keep = [k for k in range(24) if k not in failed]
    assert rel_err(w, ridge_on(config, tmp_path / "fail", keep)) < 1e-9


def test_crashing_clients_are_left_out(tmp_path, monkeypatch):
    real_train = fedsim.clients.afl.AFLClient.train

    def flaky(self, content, env):
        if env.partition_id in (3, 4, 17):
            raise RuntimeError("disk full")
        return real_train(self, content, env)

    real_group = fedsim.clients.afl.AFLClient.train_group

    def flaky_group(self, content, envs):  # the batched path fails on the same data, the node falls back
        if {3, 4, 17} & {e.partition_id for e in envs}:
            raise RuntimeError("disk full")
        return real_group(self, content, envs)

    monkeypatch.setattr(fedsim.clients.afl.AFLClient, "train", flaky)
    monkeypatch.setattr(fedsim.clients.afl.AFLClient, "train_group", flaky_group)
    config, summary, w, table = run(tmp_path, "crash", "simulation.clients_per_node=4")
    assert summary["dropped_client_ids"] == [3, 4, 17] and summary["failed_client_rounds"] == 3
    keep = [k for k in range(24) if k not in (3, 4, 17)]
    assert rel_err(w, ridge_on(config, tmp_path / "crash", keep)) < 1e-9


def test_silent_nodes_time_out_and_are_dropped(tmp_path, monkeypatch):
    """Nodes that never answer (lost, hung) are given up after `simulation.timeout`: counted as failed, listed as
    dropped, and the model is the ridge solution on the clients that did answer."""
    from flwr.app import MessageType

    from fedsim.engine.inline import NODE_ID_OFFSET, InlineGrid

    silent_nodes = {NODE_ID_OFFSET + 2, NODE_ID_OFFSET + 5}  # 4 clients per node: clients 8-11 and 20-23
    real_pull = InlineGrid.pull_messages

    def lossy_pull(self, message_ids):
        replies = real_pull(self, message_ids)
        return [m for m in replies
                if m.metadata.message_type == MessageType.QUERY or m.metadata.src_node_id not in silent_nodes]

    monkeypatch.setattr(InlineGrid, "pull_messages", lossy_pull)
    config, summary, w, table = run(tmp_path, "silent", "simulation.clients_per_node=4", "simulation.timeout=0.5")
    lost = list(range(8, 12)) + list(range(20, 24))
    assert summary["dropped_client_ids"] == lost and summary["answered_clients"] == 16
    assert summary["failed_client_rounds"] == 8 and summary["messages_up"] == 4  # 6 nodes, 2 silent
    assert table.loc[table["client"].isin(lost), "silent"].all()
    assert table["failed"].tolist() == table["silent"].tolist() == [k in lost for k in range(24)]
    keep = [k for k in range(24) if k not in lost]
    assert rel_err(w, ridge_on(config, tmp_path / "silent", keep)) < 1e-9


def test_every_client_failing_is_a_clear_error(tmp_path, monkeypatch):
    from fedsim.engine.runner import RunFailed
    from fedsim.strategies.afl import AllClientsFailed

    def broken(self, content, env):
        raise RuntimeError("no backbone")

    monkeypatch.setattr(fedsim.clients.afl.AFLClient, "train", broken)
    monkeypatch.setattr(fedsim.clients.afl.AFLClient, "train_group", lambda self, content, envs: broken(self, content,
                                                                                                        envs[0]))
    with pytest.raises((AllClientsFailed, RunFailed), match="none of the 24 clients answered"):
        run(tmp_path, "none")


@pytest.mark.parametrize("upload", ["statistics", "solution"])
def test_nodes_fold_early_beyond_the_memory_bound(tmp_path, monkeypatch, upload):
    """With a tiny REDUCE_EVERY_BYTES a node folds after every reply (memory of two replies): same weights. (The
    per-client loop: without the batched train_group hook, which folds in one pass and holds no replies.)"""
    import fedsim.engine.node as engine_node

    monkeypatch.delattr(fedsim.clients.afl.AFLClient, "train_group")

    _, _, w_all_at_once, t1 = run(tmp_path, "once", f"strategy.upload={upload}", "simulation.clients_per_node=12")
    monkeypatch.setattr(engine_node, "REDUCE_EVERY_BYTES", 1)
    _, _, w_pairwise, t2 = run(tmp_path, "pairwise", f"strategy.upload={upload}", "simulation.clients_per_node=12")
    assert rel_err(w_pairwise, w_all_at_once) < 1e-12
    pd.testing.assert_frame_equal(t1, t2)


def test_record_nbytes_is_exactly_the_protobuf_size():
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.common.serde import recorddict_to_proto

    from fedsim.engine.accounting import record_nbytes

    rng = np.random.default_rng(0)
    for _ in range(100):
        items = {}
        for j in range(int(rng.integers(0, 4))):
            kind = int(rng.integers(0, 3))
            if kind == 0:
                items[f"a{j}"] = ArrayRecord({
                    f"x{i}": Array(rng.normal(size=tuple(rng.integers(0, 200, size=int(rng.integers(1, 3)))))
                                   .astype(str(rng.choice(["float32", "float64", "int64"]))))
                    for i in range(int(rng.integers(0, 3)))})
            elif kind == 1:
                items[f"m{j}"] = MetricRecord({"n": int(rng.integers(0, 10**9)), "v": [1.0] * int(rng.integers(0, 50))})
            else:
                items[f"c{j}"] = ConfigRecord({"s": "x" * int(rng.integers(0, 300))})
        content = RecordDict(items)
        expected = recorddict_to_proto(content).ByteSize()
        assert record_nbytes(content) == expected and record_nbytes(content) == expected  # cached layout too
