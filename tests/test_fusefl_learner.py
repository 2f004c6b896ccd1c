"""FuseFL's fused network: block cuts, fusion semantics by hand, frozen lower parts, heads, baseline modules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.averaging import weighted_average
from fedsim.catalog import MODEL_BLOCKS, MODELS
from fedsim.algorithms.fusefl.learner import StageModel, ridge_head
from fedsim.frameworks.oneshot import Column, Ensemble, FusedNet, FusedStage, Merge, build_fused, fused_embedding, \
    stage_modules, stage_output_shapes
from fedsim.nn.models import build_model, num_parameters
from fedsim.nn.training import train_epochs

SHAPES = {"cnn": (1, 28, 28), "resnet18": (1, 28, 28), "mlp": (1, 8, 8)}


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_stages_composed_in_order_equal_the_unsplit_model(name, stages):
    net = build_model(name, SHAPES[name], num_classes=10, width=4, seed=1).eval()
    x = torch.rand(5, *SHAPES[name])
    modules = [m.eval() for m in stage_modules(net, stages)]
    assert len(modules) == stages
    assert sum(num_parameters(m) for m in modules) == num_parameters(net) - num_parameters(net.head)
    with torch.no_grad():
        h = x
        for m in modules:
            h = m(h)
        torch.testing.assert_close(h, net.features(x), rtol=0, atol=0)
        torch.testing.assert_close(net.head(h), net(x), rtol=0, atol=0)
        # a fused network of one column per stage is the unsplit model, exactly
        fused = build_fused(modules, [1] * stages, "avg", SHAPES[name], head=net.head)
        fused.load_state_dict({k: v for k, v in _one_column_state(net, stages).items()})
        torch.testing.assert_close(fused(x), net(x), rtol=0, atol=0)


def _one_column_state(net, stages):
    state = {}
    for k, module in enumerate(stage_modules(net, stages)):
        for key, value in module.state_dict().items():
            state[f"stages.{k}.columns.0.block.{key}"] = value
    for key, value in net.head.state_dict().items():
        state[f"head.{key}"] = value
    return state


def test_resnet18_stage_cuts_follow_fusefl():
    net = build_model("resnet18", (1, 28, 28), num_classes=10, width=4)
    shapes = stage_output_shapes(stage_modules(net, 2), (1, 28, 28))
    assert shapes == [(8, 14, 14), (32, 4, 4)]  # cut after layer2; layer4 output before pooling
    # the official cuts (models/fl_exnn.py): blocks 0 stem | 1-2 layer1 | 3-4 layer2 | 5-6 layer3 | 7-8 layer4
    assert net.group_blocks(2) == [(0, 5), (5, 9)]
    assert net.group_blocks(3) == [(0, 1), (1, 5), (5, 9)]  # stem | layer1+2 | layer3+4
    assert net.group_blocks(4) == [(0, 1), (1, 5), (5, 7), (7, 9)]
    assert stage_output_shapes(stage_modules(net, 3), (1, 28, 28)) == [(4, 28, 28), (8, 14, 14), (32, 4, 4)]


def _two_clients(rule: str, seed: int = 0):
    """Two clients' known stage blocks for a 2-stage cnn; their fused net and the pieces to compute by hand."""
    torch.manual_seed(seed)
    nets = [build_model("cnn", (1, 12, 12), num_classes=3, width=2, seed=s).eval() for s in (11, 12)]
    stages = [stage_modules(n, 2) for n in nets]
    shape = stage_output_shapes(stages[0][:1], (1, 12, 12))[0]
    cols1 = [Column(stages[m][0]) for m in range(2)]
    cols2 = [Column(stages[m][1], Merge(rule, 2, shape)) for m in range(2)]
    if rule == "conv1x1":
        for col in cols2:
            nn.init.normal_(col.merge.adaptor.weight)
            nn.init.normal_(col.merge.adaptor.bias)
    fused = FusedNet([FusedStage(cols1), FusedStage(cols2)], nets[0].head).eval()
    return fused, stages, cols2, nets[0].head


def test_averaged_head_reads_the_sum_of_the_final_features():
    # FuseFL's official averaged classifier: classifier(sum_m h_m) (models/fl_exnn.py, forward with "avg")
    fused, _, _, head = _two_clients("avg")
    net = FusedNet(fused.stages, head, head_rule="sum").eval()
    x = torch.rand(3, 1, 12, 12)
    with torch.no_grad():
        hs = net.features(x)
        torch.testing.assert_close(net(x), head(hs[0] + hs[1]), rtol=0, atol=0)
        pooled = fused_embedding(FusedNet(fused.stages), head, x, "sum")
        torch.testing.assert_close(net(x), head.fc(pooled), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["avg", "sum"])
def test_fused_forward_equals_the_merge_rule_by_hand(rule):
    fused, stages, _, head = _two_clients(rule)
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        h1 = [stages[m][0](x) for m in range(2)]  # every client's block 1 on the input
        merged = h1[0] + h1[1]
        if rule == "avg":
            merged = merged / 2
        h2 = [stages[m][1](merged) for m in range(2)]  # every client's block 2 reads the merge of all blocks 1
        expected = head((h2[0] + h2[1]) / 2)  # head "avg": the head on the mean of the final outputs
        hs = fused.features(x)
        torch.testing.assert_close(hs[0], h2[0], rtol=0, atol=0)
        torch.testing.assert_close(hs[1], h2[1], rtol=0, atol=0)
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)


def test_conv1x1_merge_concatenates_channels_and_maps_back_to_the_block_width():
    fused, stages, cols2, _ = _two_clients("conv1x1")
    x = torch.rand(4, 1, 12, 12)
    adaptor = cols2[0].merge.adaptor
    c = stage_output_shapes(stages[0][:1], (1, 12, 12))[0][0]
    assert isinstance(adaptor, nn.Conv2d) and adaptor.kernel_size == (1, 1)
    assert adaptor.in_channels == 2 * c and adaptor.out_channels == c
    with torch.no_grad():
        h1 = [stages[m][0](x) for m in range(2)]
        cat = torch.cat(h1, dim=1)
        assert cat.shape[1] == 2 * c
        by_hand = torch.einsum("oi,nihw->nohw", adaptor.weight[:, :, 0, 0], cat) + adaptor.bias[None, :, None, None]
        torch.testing.assert_close(cols2[0].merge(h1), by_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.features(x)[0], stages[0][1](by_hand), rtol=1e-5, atol=1e-5)
    # a flat (MLP) input gets a Linear adaptor of the same shape rule
    flat = Merge("conv1x1", 3, (7,))
    assert isinstance(flat.adaptor, nn.Linear) and flat.adaptor.in_features == 21 and flat.adaptor.out_features == 7
    assert flat([torch.rand(2, 7)] * 3).shape == (2, 7)


def test_conv1x1_starts_at_the_average():
    merge = Merge("conv1x1", 3, (4, 5, 5))
    xs = [torch.rand(2, 4, 5, 5) for _ in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(merge(xs), (xs[0] + xs[1] + xs[2]) / 3, rtol=1e-6, atol=1e-6)


def test_logits_head_averages_each_columns_own_head():
    fused, _, _, head = _two_clients("avg")
    heads = [copy.deepcopy(head), copy.deepcopy(head)]
    nn.init.normal_(heads[1].fc.weight)
    net = FusedNet(fused.stages, heads, head_rule="logits").eval()
    x = torch.rand(3, 1, 12, 12)
    with torch.no_grad():
        hs = net.features(x)
        torch.testing.assert_close(net(x), (heads[0](hs[0]) + heads[1](hs[1])) / 2, rtol=0, atol=0)


def test_ridge_head_is_the_linear_layer_on_the_fused_embedding():
    fused, _, _, head = _two_clients("avg")
    x = torch.rand(6, 1, 12, 12)
    for features, rule, width in (("mean", "avg", 16), ("concat", "concat", 32)):
        weights = np.random.default_rng(0).normal(size=(width + 1, 3))
        model = FusedNet(fused.stages, ridge_head(head, weights), head_rule=rule).eval()
        with torch.no_grad():
            e = fused_embedding(FusedNet(fused.stages), head, x, features)
            assert e.shape == (6, width)
            expected = e.double() @ torch.as_tensor(weights[:-1]) + torch.as_tensor(weights[-1])
            torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_stage_model_trains_only_its_column_and_head_and_keeps_the_lower_part_frozen_in_eval_mode():
    net = build_model("cnn", (1, 12, 12), num_classes=3, width=2, seed=0)
    templates = stage_modules(net, 2)
    shapes = stage_output_shapes(templates, (1, 12, 12))
    lower = build_fused(templates, [2], "avg", (1, 12, 12))
    for m in lower.modules():  # give the frozen BatchNorms non-trivial statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(0, 1)
    before = {k: v.clone() for k, v in lower.state_dict().items()}
    column = Column(copy.deepcopy(templates[1]), Merge("avg", 2, shapes[0]))
    model = StageModel(lower, column, nn.Sequential(), copy.deepcopy(net.head))
    col_before = {k: v.clone() for k, v in column.state_dict().items()}
    x, y = torch.rand(40, 1, 12, 12), torch.randint(0, 3, (40,))
    train_epochs(model, x, y, epochs=2, batch_size=8, lr=0.1, seed=0)
    model.train()
    assert not lower.training and all(not m.training for m in lower.modules())
    for k, v in lower.state_dict().items():  # weights and BatchNorm running statistics untouched
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, col_before[k]) for k, v in column.state_dict().items())


def test_weighted_average_weights_floats_in_their_dtype_as_the_avg_head_needs():
    # the fused "avg" head is the uniform weighted_average of the clients' heads (float-only: fc weight and bias);
    # integer buffers follow the FedAvg rule (averaged, float64) instead of the former average_states' maximum
    a = {"w": np.array([1.0, 3.0], dtype=np.float32), "n": np.array(4)}
    b = {"w": np.array([3.0, 7.0], dtype=np.float32), "n": np.array(9)}
    out = weighted_average([a, b], [1, 3])
    np.testing.assert_array_equal(out["w"], np.array([2.5, 6.0], dtype=np.float32))
    assert out["w"].dtype == np.float32 and out["n"] == 7.75
    np.testing.assert_array_equal(weighted_average([a, b])["w"], np.array([2.0, 5.0], dtype=np.float32))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_heads_hold_only_float_entries(name):
    net = build_model(name, SHAPES[name], num_classes=10, width=4)
    assert all(v.is_floating_point() for v in net.head.state_dict().values())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_catalog_model_blocks_match_the_built_models(name):
    # fusefl's config check reads MODEL_BLOCKS instead of building a torch model
    assert set(MODEL_BLOCKS) == set(MODELS)
    for shape in ((3, 32, 32), (1, 28, 28), (1, 8, 8)):
        assert build_model(name, shape, num_classes=2, width=2).num_blocks == MODEL_BLOCKS[name], shape


def test_ensemble_averages_probabilities_or_logits():
    models = [nn.Linear(4, 3), nn.Linear(4, 3)]
    x = torch.rand(5, 4)
    with torch.no_grad():
        p = (torch.softmax(models[0](x), 1) + torch.softmax(models[1](x), 1)) / 2
        torch.testing.assert_close(Ensemble(models, "softmax")(x).exp(), p)
        # the default is FuseFL's baseline: the mean of the logits
        torch.testing.assert_close(Ensemble(models)(x), (models[0](x) + models[1](x)) / 2)
        torch.testing.assert_close(Ensemble(models, "logits")(x), (models[0](x) + models[1](x)) / 2)
    with pytest.raises(ValueError, match="combine"):
        Ensemble(models, "vote")


def test_fused_net_saved_whole_reloads_without_the_simulator(tmp_path):
    fused, _, _, _ = _two_clients("conv1x1")
    torch.save(fused, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.rand(3, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(again(x), fused(x), rtol=0, atol=0)
    assert num_parameters(again) == num_parameters(fused)
