"""The typed contracts of a strategy's parts (``fedsim.engine.parts``): the engine refuses a part that misses a
hook, naming the hook, when it builds it; every registered strategy's parts keep the contracts; what the engine
needs of a strategy (the model of a reply, the server's holdout) is declared on its spec."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from conftest import DIGITS, scenario_config
from fedsim.engine import ClientPart, ModelCodec, PartContractError, ReducibleClientPart, ServerPart
from fedsim.engine.runner import run_scenario
from fedsim.frameworks.model_rounds_protocol import MODEL_CODEC, model_request
from fedsim.registry import StrategySpec, get_strategy, strategies
from fedsim.scenario import server_holdout_fraction


@dataclass
class _Params:
    value: int = 1


class _Server:
    def __init__(self, params: _Params) -> None:
        self.params = params

    def run(self, ctx) -> None:  # noqa: ANN001
        ctx.send(RecordDict(), round=1)
        ctx.log(1, accuracy=0.0)
        ctx.summary(final_accuracy=0.0)


class _Client:
    def __init__(self, params: _Params) -> None:
        self.params = params

    def train(self, content: RecordDict, env) -> RecordDict:  # noqa: ANN001
        return RecordDict({"m": MetricRecord({"n": 1})})


class _NoTrain:
    def __init__(self, params: _Params) -> None:
        self.params = params

    def fit(self, content: RecordDict, env) -> RecordDict:  # noqa: ANN001  (Flower's old name, not the hook)
        return RecordDict()


class _NoRun:
    def __init__(self, params: _Params) -> None:
        self.params = params

    def start(self, ctx) -> None:  # noqa: ANN001
        pass


class _NoParams:
    def run(self, ctx) -> None:  # noqa: ANN001
        pass


class _ReadOnlyCodec:
    def read(self, content):  # noqa: ANN001, ANN201
        return None


def _spec(**fields) -> StrategySpec:
    base = StrategySpec(name="test-parts", params=_Params, server=_Server, client=_Client, description="test only")
    return replace(base, **fields)


def test_a_client_part_without_train_is_refused_naming_the_hook():
    with pytest.raises(PartContractError, match=r"client part .*_NoTrain has no train\(content, env\) hook"):
        _spec(client=_NoTrain).client_class()


def test_a_server_part_without_run_is_refused_naming_the_hook():
    with pytest.raises(PartContractError, match=r"server part .*_NoRun has no run\(ctx\) hook"):
        _spec(server=_NoRun).server_class()


def test_a_declared_reducible_part_needs_reduce():
    with pytest.raises(PartContractError, match=r"has no reduce\(replies\) hook, but the spec declares reducible"):
        _spec(reducible=True).client_class()


def test_a_part_must_be_built_from_the_parameters():
    with pytest.raises(PartContractError, match=r"cannot be built as _NoParams\(params\)"):
        _spec(server=_NoParams).server_class()


def test_a_model_codec_without_write_is_refused():
    with pytest.raises(PartContractError, match=r"model codec .*_ReadOnlyCodec has no write hook"):
        _spec(model_codec=_ReadOnlyCodec()).model_codec_object()


def test_the_engine_refuses_a_part_without_train_before_any_client_runs(tmp_path, monkeypatch):
    import fedsim.registry

    # registered for this test only: every other test walks the registry and expects its parts to be sound
    strategies()  # discover the shipped strategies first
    monkeypatch.setitem(fedsim.registry._REGISTRY, "test-parts-no-train", _spec(name="test-parts-no-train",
                                                                                 client=_NoTrain))
    config = scenario_config(DIGITS, tmp_path, "strategy.name=test-parts-no-train")
    with pytest.raises(PartContractError, match=r"has no train\(content, env\) hook"):
        run_scenario(config, tmp_path / "run", show_progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "train(content, env)" in summary["error"]


@pytest.mark.parametrize("name", sorted(n for n in strategies() if not n.startswith("test-")))
def test_every_registered_part_keeps_its_contract(name):
    spec = strategies()[name]
    server = spec.server_class()
    assert issubclass(server, ServerPart) and isinstance(server(spec.params()), ServerPart)
    client = spec.client_class()
    if client is not None:
        assert issubclass(client, ClientPart) and isinstance(client(spec.params()), ClientPart)
        assert spec.reducible == issubclass(client, ReducibleClientPart), f"{name}: reducible is declared wrong"
    codec = spec.model_codec_object()
    assert spec.model_replies == (codec is not None)
    if codec is not None:
        assert isinstance(codec, ModelCodec)


def test_the_sgd_family_declares_the_shared_model_codec():
    assert get_strategy("fedavg").model_codec_object() is MODEL_CODEC
    assert get_strategy("krum").model_replies and not get_strategy("afl").model_replies
    arrays = {"w": np.arange(3, dtype=np.float32)}
    content = model_request(arrays)
    assert np.array_equal(MODEL_CODEC.read(content)["w"], arrays["w"]) and MODEL_CODEC.read(RecordDict()) is None
    MODEL_CODEC.write(content, {"w": np.zeros(3, np.float32)})
    assert MODEL_CODEC.read(content)["w"].tolist() == [0.0, 0.0, 0.0]


def test_the_server_holdout_is_declared_on_the_spec(tmp_path):
    config = scenario_config(DIGITS, tmp_path, "strategy.name=feddf", "rounds=1")
    assert get_strategy("feddf").server_holdout is not None
    assert server_holdout_fraction(config) == pytest.approx(0.1)
    assert server_holdout_fraction(scenario_config(DIGITS, tmp_path, filename="fedavg.toml")) == 0.0
    other = scenario_config(DIGITS, tmp_path, "strategy.name=feddf", "rounds=1", "strategy.distill_data=dataset",
                            "strategy.dataset=digits", filename="dataset.toml")
    assert server_holdout_fraction(other) == 0.0


def test_grouped_nodes_need_reduce_unless_the_server_addresses_each_client():
    """check_parts with a node serving 4 clients: a client part without reduce is refused, naming both ways out,
    unless the spec is client_addressed (its server answers each client on its own: no reduce is ever called)."""
    from fedsim.errors import ConfigError
    from fedsim.registry import check_parts

    plain = replace(_spec(), client="tests_no_such_module:_Client")  # parts by path: read from source if any
    with pytest.raises(ConfigError, match=r"combines their replies .* or a server that addresses each client"):
        check_parts(plain, 4)
    addressed = replace(plain, client_addressed=True)
    assert addressed.groups_clients and not addressed.needs_reduce(4)
    check_parts(addressed, 4)
    assert get_strategy("krum").groups_clients and not get_strategy("krum").reducible
