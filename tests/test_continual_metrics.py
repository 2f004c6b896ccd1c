"""fedsim.results.continual: accuracy matrix, average incremental accuracy, forgetting, backward transfer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.results.continual import (
    AccuracyMatrix,
    accuracy_on,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
)


def test_accuracy_on_counts_only_the_given_classes():
    y = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    pred = np.array([0, 1, 1, 1, 2, 0, 0, 3])
    assert accuracy_on(pred, y, [0]) == 0.5
    assert accuracy_on(pred, y, [1, 2]) == pytest.approx(3 / 5)
    assert accuracy_on(pred, y, [0, 1, 2, 3]) == pytest.approx(5 / 8)
    assert math.isnan(accuracy_on(pred, y, [7]))
    with pytest.raises(ValueError, match="differ in length"):
        accuracy_on(pred[:3], y, [0])


def test_metrics_of_a_hand_computed_matrix():
    a = np.array([[0.9, np.nan, np.nan],
                  [0.6, 0.8, np.nan],
                  [0.5, 0.7, 0.95]])
    # forgetting: task 0: max(0.9, 0.6) - 0.5 = 0.4; task 1: 0.8 - 0.7 = 0.1
    assert forgetting(a) == pytest.approx((0.4 + 0.1) / 2)
    # BWT: (0.5 - 0.9 + 0.7 - 0.8) / 2
    assert backward_transfer(a) == pytest.approx(-0.25)
    assert average_incremental_accuracy([0.9, 0.7, 0.6]) == pytest.approx(2.2 / 3)
    assert math.isnan(forgetting(a[:1, :1]))
    assert math.isnan(backward_transfer(a[:1, :1]))


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    a = np.array([[0.5, np.nan, np.nan],
                  [0.8, 0.9, np.nan],
                  [0.6, 0.9, 0.9]])
    assert forgetting(a) == pytest.approx(((0.8 - 0.6) + 0.0) / 2)
    assert backward_transfer(a) == pytest.approx(((0.6 - 0.5) + 0.0) / 2)


def test_accuracy_matrix_records_rows_from_predictions():
    # two tasks: classes [3, 1] then [0, 2]; 4 test samples per class
    y = np.repeat([0, 1, 2, 3], 4)
    m = AccuracyMatrix([[3, 1], [0, 2]])
    pred0 = np.where(np.isin(y, [3, 1]), y, 3)  # perfect on task 0 classes, says 3 for the rest
    assert m.record(0, pred0, y) == 1.0
    pred1 = y.copy()
    pred1[y == 1] = 0  # class 1 forgotten, the rest right
    acc1 = m.record(1, pred1, y)
    assert acc1 == pytest.approx(12 / 16)
    assert m.values[0, 0] == 1.0 and math.isnan(m.values[0, 1])
    assert m.values[1, 0] == pytest.approx(0.5) and m.values[1, 1] == 1.0
    s = m.summary()
    assert s["final_accuracy"] == pytest.approx(0.75)
    assert s["average_incremental_accuracy"] == pytest.approx((1.0 + 0.75) / 2)
    assert s["forgetting"] == pytest.approx(0.5)
    assert s["backward_transfer"] == pytest.approx(-0.5)
    frame = m.to_frame()
    assert list(frame.columns) == ["task_0", "task_1", "seen"]
    assert list(frame.index) == ["after_task_0", "after_task_1"]
    assert frame.loc["after_task_1", "seen"] == pytest.approx(0.75)


def test_partial_matrix_summary_and_bad_index():
    m = AccuracyMatrix([[0], [1], [2]])
    y = np.array([0, 1, 2])
    m.record(0, y, y)
    s = m.summary()
    assert m.done == 1
    assert s["final_accuracy"] == 1.0 and s["forgetting"] is None and s["backward_transfer"] is None
    with pytest.raises(ValueError, match="task index 3"):
        m.record(3, y, y)
