"""Reader for the IDX format of (Fashion-)MNIST (LeCun et al.).

Layout: two zero bytes, a type code byte, the number of dimensions byte, then one
big-endian uint32 per dimension, then the data in C order, big-endian.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

_IDX_TYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def parse_idx(buf: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file into an array.

    Parameters
    ----------
    buf : bytes
        Whole file content (already decompressed).
    source : str
        Name used in error messages.

    Raises
    ------
    ValueError
        On a bad magic number, unknown type code or wrong payload length.
    """
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        raise ValueError(f"{source}: not an IDX file (bad magic)")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{source}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{source}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) - header != expected:
        raise ValueError(f"{source}: IDX payload is {len(buf) - header} bytes, dims {dims} need {expected}")
    data = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzipped (``.gz``) or not."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({exc})") from None
    return parse_idx(raw, str(path))
