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


def test_header_cached_arrays_give_flowers_numpy_and_flowers_average_bitwise():
    """Flower's aggregation reads every reply array with Array.numpy(): after cache_headers it gets the same
    writable arrays (dtype, order, values) and the same weighted average, bit for bit, from the same bytes."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    rng = np.random.default_rng(0)
    layouts = {"w": ((4, 3), np.float32, "C"), "v": ((3, 5), np.float64, "F"), "n": ((), np.int64, "C")}

    def replies() -> list[RecordDict]:
        out = []
        for i in range(7):
            arrays = {k: Array(np.asarray(rng.standard_normal(shape) * 10, dtype=dtype, order=order))
                      for k, (shape, dtype, order) in layouts.items()}
            out.append(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"n": 3 + i})}))
        return out

    rng = np.random.default_rng(0)
    plain = replies()
    rng = np.random.default_rng(0)
    cached = replies()
    for reply in cached:
        before = {k: a.data for k, a in reply["arrays"].items()}
        codec.cache_headers(reply["arrays"])
        assert all(type(a) is codec.HeaderCachedArray and a.data is before[k] for k, a in reply["arrays"].items())
    for a, b in zip(plain, cached):
        for key in layouts:
            want, got = a["arrays"][key].numpy(), b["arrays"][key].numpy()
            assert got.dtype == want.dtype and got.shape == want.shape and got.flags.writeable
            assert got.flags.f_contiguous == want.flags.f_contiguous and np.array_equal(got, want)
    ref, out = aggregate_arrayrecords(plain, "n"), aggregate_arrayrecords(cached, "n")
    assert list(ref.keys()) == list(out.keys())
    assert all(ref[k].data == out[k].data for k in ref)  # the same .npy bytes: bitwise the same average


def test_to_record_is_the_record_flower_builds_from_the_same_arrays():
    """to_record fills the record item by item (not through ArrayRecord(dict), which builds each Array twice):
    the same keys in order, the same bytes and Flower's same content id, and what it decodes to is the input."""
    from flwr.app import ArrayRecord

    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float64),
              "steps": np.array(7, dtype=np.int64), "empty": np.zeros((0, 2), np.float32)}
    record = codec.to_record(arrays)
    flowers = ArrayRecord({k: codec.encode_array(v) for k, v in arrays.items()})
    assert type(record) is ArrayRecord and list(record.keys()) == list(arrays)
    assert [record[k].data for k in arrays] == [flowers[k].data for k in arrays]
    assert record.object_id == flowers.object_id
    back = codec.from_record(record)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert np.array_equal(back[key], value)
