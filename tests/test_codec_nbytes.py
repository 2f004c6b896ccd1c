"""`fedsim.codec.array_item_nbytes`: the wire size of an ArrayRecord item from its arrays' dtypes and shapes alone
equals `record_nbytes` of the real record (Flower's protobuf), across dtypes, empty and 0-d arrays, several arrays
per record and every varint width the lengths cross (1 to 4 bytes)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

from fedsim.codec import array_item_nbytes, encode_array, encoded_nbytes, to_record
from fedsim.engine.accounting import record_nbytes

SHAPES = [(), (0,), (1,), (0, 64), (3, 4), (15,), (16,), (100,), (127,), (2047,), (2048,), (1, 16383), (2, 8191),
          (16384,), (262100,), (300000,)]
DTYPES = [np.float64, np.float32, np.int64, np.int32, np.bool_, np.uint8, np.dtype(">f8")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_item_size_from_the_layout_equals_the_serialized_record(dtype):
    for shape in SHAPES:
        a = np.zeros(shape, dtype)
        arrays = {"factor": a, "count": np.array([7], np.int64)}
        layout = {k: (v.dtype, v.shape) for k, v in arrays.items()}
        assert encoded_nbytes(a.dtype, a.shape) == len(encode_array(a).data), shape
        assert array_item_nbytes("afl", layout) == record_nbytes(RecordDict({"afl": to_record(arrays)})), shape


def test_keys_and_many_arrays():
    rng = np.random.default_rng(0)
    arrays = {f"k{i}" * (i + 1): rng.normal(size=(i * 37, 5)) for i in range(40)}  # long keys, 1-2 byte items
    layout = {k: (v.dtype, v.shape) for k, v in arrays.items()}
    for key in ["", "x", "a-much-longer-record-key" * 8]:
        assert array_item_nbytes(key, layout) == record_nbytes(RecordDict({key: to_record(arrays)}))
    assert array_item_nbytes("r", {}) == record_nbytes(RecordDict({"r": to_record({})}))
