"""fedsim.codec reads .npy headers once per layout (numpy's parser is ast.literal_eval): what comes back equals
what numpy reads, for every header version and order, and a refused header stays refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array

from fedsim import codec


def _npy(a: np.ndarray, version: tuple[int, int]) -> Array:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=version, allow_pickle=True)
    return Array(dtype=str(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray", data=buf.getvalue())


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8, ">f4"])
def test_a_cached_layout_reads_what_numpy_reads(version, order, dtype):
    a = np.asarray(np.arange(24).reshape(2, 3, 4), dtype=dtype, order=order)
    array = _npy(a, version)
    codec._LAYOUTS.clear()
    first, second = codec.decode_array(array), codec.decode_array(array)  # parsed, then from the cache
    expected = np.load(io.BytesIO(array.data))
    for out in (first, second):
        assert out.dtype == expected.dtype and out.shape == expected.shape
        assert np.array_equal(out, expected) and not out.flags.writeable
    assert len(codec._LAYOUTS) == 1
    assert np.array_equal(codec.decode_array(array, writable=True), expected)


def test_the_second_array_of_a_layout_is_not_parsed_again(monkeypatch):
    codec._LAYOUTS.clear()
    first = codec.encode_array(np.zeros((5, 3), np.float32))
    codec.decode_array(first)

    def refuse(*args, **kwargs):
        raise AssertionError("header parsed again")

    monkeypatch.setattr(np.lib.format, "read_array_header_1_0", refuse)
    other = codec.encode_array(np.ones((5, 3), np.float32))  # same layout, other data
    assert np.array_equal(codec.decode_array(other), np.ones((5, 3), np.float32))
    with pytest.raises(AssertionError, match="parsed again"):  # a new layout is parsed
        codec.decode_array(codec.encode_array(np.ones((4, 3), np.float32)))


def test_object_arrays_and_broken_headers_are_refused_every_time():
    objects = _npy(np.array([{"a": 1}, None], dtype=object), (1, 0))
    for _ in range(2):
        with pytest.raises(TypeError, match="object arrays are not accepted"):
            codec.decode_array(objects)
    assert not [k for k, v in codec._LAYOUTS.items() if v[2].hasobject]
    broken = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"\x93NUMPX\x01\x00" + b"\x00" * 20)
    for _ in range(2):
        with pytest.raises(ValueError):
            codec.decode_array(broken)
