"""A small, strict reader for IDX files (the MNIST / Fashion-MNIST format), gzip-compressed or raw.

Reading the files directly avoids torchvision's layout rules (it wants them uncompressed under
``ROOT/FashionMNIST/raw``), so the Debian package's ``.gz`` files work as they are. Strict because a truncated
download otherwise turns into a silent reshape error or garbage images.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from fedsim.errors import DataUnavailableError

__all__ = ["read_idx", "read_idx_header", "write_idx", "IDX_DTYPES"]

# IDX type byte -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _corrupt(path: Path, why: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"IDX file {path} is corrupt or not an IDX file: {why}. Delete it and provide the original file "
        f"(e.g. reinstall the dataset package or download it again)."
    )


CHUNK = 1 << 20  # bytes decompressed at a time
MAX_DEFLATE_RATIO = 1100  # deflate expands at most ~1032:1; a gzip claiming more than this cannot hold the data


def _read_exact(fh, n: int) -> bytes:  # noqa: ANN001
    """Up to ``n`` bytes from ``fh`` (fewer only at the end of the stream), in bounded chunks."""
    out = bytearray()
    while len(out) < n:
        part = fh.read(min(n - len(out), CHUNK))
        if not part:
            break
        out += part
    return bytes(out) if n <= 4096 else out  # type: ignore[return-value]  # large payloads: no extra copy


def read_idx(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip detected from its content, not its name) into a native-endian array.

    Checks the magic number (two zero bytes, a known type byte, ndim >= 1), that the payload size equals
    the product of the dimensions exactly, and ``expect_ndim`` when given; raises ``DataUnavailableError``
    naming the file otherwise. The header is read first: at most the bytes it announces (and one more, to see
    trailing data) are read or decompressed, so a small gzip that inflates to gigabytes costs no more memory
    than its header claims.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
            size = fh.seek(0, 2)
    except OSError as err:
        raise DataUnavailableError(f"cannot read IDX file {path}: {err}") from err
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            return _read_idx_stream(path, fh, gz, size, expect_ndim)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise _corrupt(path, f"broken gzip stream ({err})") from err
    except OSError as err:
        if gz:
            raise _corrupt(path, f"broken gzip stream ({err})") from err
        raise DataUnavailableError(f"cannot read IDX file {path}: {err}") from err


def _read_idx_stream(path: Path, fh, gz: bool, size: int, expect_ndim: int | None) -> np.ndarray:  # noqa: ANN001
    head = _read_exact(fh, 4)
    if len(head) < 4:
        raise _corrupt(path, f"only {len(head)} bytes, shorter than the 4-byte magic number")
    if head[0] != 0 or head[1] != 0:
        raise _corrupt(path, f"magic number starts with {head[0]:#04x} {head[1]:#04x}, expected 0x00 0x00")
    type_code, ndim = head[2], head[3]
    if type_code not in IDX_DTYPES:
        raise _corrupt(path, f"unknown data type byte {type_code:#04x} (known: 0x08 0x09 0x0b 0x0c 0x0d 0x0e)")
    if ndim < 1:
        raise _corrupt(path, "zero dimensions")
    if expect_ndim is not None and ndim != expect_ndim:
        raise _corrupt(path, f"{ndim} dimensions, expected {expect_ndim}")
    header = 4 + 4 * ndim
    raw_dims = _read_exact(fh, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise _corrupt(path, f"header needs {header} bytes, file has {4 + len(raw_dims)}")
    dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4", count=ndim))
    dtype = IDX_DTYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize
    if not gz:
        if size - header != expected:
            raise _corrupt(path, f"dimensions {dims} need {expected} data bytes, file has {size - header}")
    elif expected > MAX_DEFLATE_RATIO * size + CHUNK:
        raise _corrupt(path, f"dimensions {dims} need {expected} data bytes, more than a gzip file of {size} bytes "
                             "can hold")
    payload = _read_exact(fh, expected)
    if len(payload) != expected:
        raise _corrupt(path, f"dimensions {dims} need {expected} data bytes, file has {len(payload)}")
    if fh.read(1):  # trailing data: refused without decompressing the rest
        raise _corrupt(path, f"dimensions {dims} need {expected} data bytes, file has more")
    data = np.frombuffer(payload, dtype=dtype).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # a writeable, native-endian copy


def read_idx_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """The dimensions and dtype of an IDX file from its header alone, when the file's length shows the payload is
    complete (raw: the file size; gzip: the uncompressed size its trailer records); None when only a full
    ``read_idx`` can tell (an odd header, a size that does not match, several gzip members).

    Lets ``fedsim validate`` learn a split's size without decompressing its images; whatever is wrong with a
    file is reported by ``read_idx``, which the caller falls back to.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
            if gz:
                fh.seek(-4, 2)
                recorded = int.from_bytes(fh.read(4), "little")  # ISIZE: uncompressed size mod 2**32
            size = fh.seek(0, 2)
        opener = gzip.open if gz else open
        with opener(path, "rb") as fh:
            head = fh.read(4)
            if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] not in IDX_DTYPES or head[3] < 1:
                return None
            raw_dims = fh.read(4 * head[3])
    except (OSError, EOFError, zlib.error):
        return None
    ndim = head[3]
    if len(raw_dims) < 4 * ndim:
        return None
    dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4", count=ndim))
    dtype = IDX_DTYPES[head[2]]
    total = 4 + 4 * ndim + math.prod(dims) * dtype.itemsize
    if (recorded != total % 2**32) if gz else (size != total):
        return None
    return dims, dtype.newbyteorder("=")


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip when ``compress`` or the name ends in ``.gz``); for tests/tools."""
    path = Path(path)
    arr = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = arr.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    code = codes[native]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = header + arr.astype(IDX_DTYPES[code]).tobytes()
    if compress or (compress is None and path.name.endswith(".gz")):
        payload = gzip.compress(payload, compresslevel=1)
    path.write_bytes(payload)
    return path
