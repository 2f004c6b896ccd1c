"""Flower's strategies average integer arrays (BatchNorm's num_batches_tracked) as float64: fedsim turns each
reply's integer arrays into float64 ones before aggregation and leaves the others untouched, deciding from the
declared dtype (no decode of a float array) and decoding where the dtype is not declared."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedsim.algorithms.fedavg import protocol
from fedsim.codec import encode_array
from strategies.fedavg import _integer_arrays_as_float


def _content(arrays: dict) -> RecordDict:
    return RecordDict({protocol.ARRAYS_KEY: ArrayRecord(arrays)})


def test_integer_arrays_become_float64_and_float_arrays_are_not_decoded(monkeypatch):
    decoded = []
    numpy_of = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(self.dtype) or numpy_of(self))
    weight = np.arange(4, dtype=np.float32).reshape(2, 2)
    content = _content({"w": encode_array(weight), "steps": encode_array(np.array(7, np.int64))})
    _integer_arrays_as_float(content)
    assert decoded == ["int64"]  # the float array was judged by its declared dtype
    record = content[protocol.ARRAYS_KEY]
    assert np.array_equal(numpy_of(record["w"]), weight) and numpy_of(record["w"]).dtype == np.float32
    steps = numpy_of(record["steps"])
    assert steps.dtype == np.float64 and steps == 7.0


def test_held_counters_take_the_global_models_values():
    content = _content({"steps": encode_array(np.array(9, np.int64))})
    _integer_arrays_as_float(content, hold=ArrayRecord({"steps": encode_array(np.array(4, np.int64))}))
    assert content[protocol.ARRAYS_KEY]["steps"].numpy() == 4.0


def test_an_undeclared_dtype_is_decoded_and_checked():
    real = encode_array(np.array([3, 5], np.int32))
    hidden = Array(dtype="", shape=real.shape, stype=real.stype, data=real.data)
    content = _content({"counts": hidden})
    _integer_arrays_as_float(content)
    out = content[protocol.ARRAYS_KEY]["counts"].numpy()
    assert out.dtype == np.float64 and out.tolist() == [3.0, 5.0]
