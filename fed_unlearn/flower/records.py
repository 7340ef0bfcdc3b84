"""Conversions between Flower records and the library's named numpy arrays.

Shapes and wire dtypes are kept as they are: a 0-dim array stays 0-dim, an int64 buffer
stays int64, float16 stays float16. bfloat16 has no numpy dtype: Flower 1.42 stores such an
array (from ``ml_dtypes``) as 2-byte raw values labelled ``bfloat16``, and refuses torch
bfloat16 tensors outright. Here a ``bfloat16`` Array reads as the float32 values it holds
(exactly: a bfloat16 is the upper half of a float32), and :func:`to_record` writes a
``bfloat16`` Array again, rounding to nearest-even, when asked for that wire dtype.
:func:`torch_record` / :func:`torch_state` do the same for a torch ``state_dict``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from io import BytesIO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

#: The wire name of bfloat16 arrays (torch's and ml_dtypes' name).
BFLOAT16 = "bfloat16"
_NUMPY_STYPE = "numpy.ndarray"


def is_bfloat16(arr: Array) -> bool:
    """Whether a Flower Array holds bfloat16 values."""
    return str(arr.dtype) == BFLOAT16


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (any 2-byte dtype) -> the float32 values they denote, exactly."""
    u16 = np.ascontiguousarray(bits).reshape(-1).view(np.uint16)
    return (u16.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(np.shape(bits))


def float_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Float values -> bfloat16 bit patterns (uint16), rounded to nearest-even; NaN stays NaN."""
    shape = np.shape(values)
    f = np.ascontiguousarray(np.asarray(values, dtype=np.float32)).reshape(-1)
    u = f.view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded.reshape(shape)


#: The header ``np.save`` writes for a plain array of a fixed-size number dtype (anything else
#: is read by ``np.load``): little/big-endian letter + size, the order flag, the shape.
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=][biufc]\d{1,2})', 'fortran_order': (True|False), 'shape': \((\d*(?:, \d+)*),?\), \} *\n"
)


def _npy_view(data: bytes) -> np.ndarray | None:
    """The array an ``.npy`` buffer holds, as a read-only view of it; ``None`` when its header is not a plain one."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        return None
    start = 10 if data[6] == 1 else 12
    size = int.from_bytes(data[8:start], "little")
    m = _NPY_HEADER.fullmatch(data, start, start + size)
    if m is None:
        return None
    shape = tuple(int(x) for x in m[3].split(b",") if x.strip())
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    # frombuffer raises when the buffer holds fewer values than the shape says
    out = np.frombuffer(data, np.dtype(m[1].decode()), count, start + size)
    return out.reshape(shape, order="F" if m[2] == b"True" else "C")


def array_view(arr: Array) -> np.ndarray:
    """One Flower Array as a **read-only** numpy view of its bytes (bfloat16 as its float32 values).

    A plain ``.npy`` buffer (every array Flower's ``Array(ndarray)`` writes) is read without
    copying, an order of magnitude faster than ``Array.numpy()``; anything else goes through
    ``np.load`` (never with pickles).
    """
    remembered = arr.values() if isinstance(arr, DecodedArray) else None
    if remembered is not None:
        return remembered
    if arr.stype != _NUMPY_STYPE:
        return arr.numpy()  # Flower's own error for other serialisations
    out = _npy_view(arr.data)
    if out is None:
        out = arr.numpy()
    if is_bfloat16(arr) and out.dtype.itemsize == 2 and out.dtype.kind in ("V", "u", "i"):
        return bf16_bits_to_float32(out)
    return out


def array_numpy(arr: Array) -> np.ndarray:
    """One Flower Array as a fresh, writable numpy array (bfloat16 as its float32 values)."""
    out = array_view(arr)
    return out.copy() if not out.flags.writeable else out


def bf16_array(values: np.ndarray) -> Array:
    """A ``bfloat16`` Flower Array of ``values`` (2 bytes per value on the wire)."""
    bits = float_to_bf16_bits(values)
    buf = BytesIO()
    np.save(buf, bits.view(np.dtype("V2")), allow_pickle=False)
    return Array(dtype=BFLOAT16, shape=tuple(int(s) for s in bits.shape), stype=_NUMPY_STYPE, data=buf.getvalue())


class DecodedArray(Array):
    """A Flower Array that remembers its decoded values: ``numpy()`` copies them instead of parsing.

    The same fields (and bytes) as the Array it stands for, equal to it, and ``numpy()``
    returns what ``Array.numpy()`` would (a fresh, writable array of the same dtype, shape,
    memory order and values) without ``np.load``: the strategy a checked reply goes to reads
    the values the check already decoded. Setting a field forgets them.
    """

    def __init__(self, arr: Array, values: np.ndarray) -> None:
        super().__init__(dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype, data=arr.data)
        self.__dict__["_values"] = values

    def values(self) -> np.ndarray | None:
        """The remembered read-only values (``None`` once a field was set)."""
        values: np.ndarray | None = self.__dict__.get("_values")
        return values

    def numpy(self) -> np.ndarray:  # noqa: D102
        values = self.values()
        return Array.numpy(self) if values is None else np.array(values, copy=True, order="K")

    def deflate(self) -> bytes:
        """Deflate as the plain Array it stands for (the same bytes and object id on the wire)."""
        return Array(dtype=self.dtype, shape=tuple(self.shape), stype=self.stype, data=self.data).deflate()

    def __setattr__(self, name: str, value: Any) -> None:  # noqa: D105
        if name in ("dtype", "shape", "stype", "data"):
            self.__dict__.pop("_values", None)
        super().__setattr__(name, value)

    def __eq__(self, other: object) -> bool:  # noqa: D105  (an Array of the same fields is the same array)
        if not isinstance(other, Array):
            return NotImplemented
        return (self.dtype, tuple(self.shape), self.stype, self.data) == (
            other.dtype,
            tuple(other.shape),
            other.stype,
            other.data,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like Array


def remember_values(record: ArrayRecord, views: Mapping[str, np.ndarray]) -> None:
    """Swap each Array of ``record`` for a :class:`DecodedArray` of its view in ``views``.

    Only read-only views whose dtype and shape are the Array's own (what ``numpy()`` returns
    for it: a bfloat16 Array reads as float32 and is left as it is).
    """
    for name, arr in list(record.items()):
        view = views.get(name)
        if (
            view is None
            or isinstance(arr, DecodedArray)
            or view.flags.writeable
            or str(view.dtype) != str(arr.dtype)
            or tuple(view.shape) != tuple(arr.shape)
        ):
            continue
        record[name] = DecodedArray(arr, view)


def to_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ``{name: ndarray}`` (bfloat16 arrays as float32), fresh writable arrays."""
    return {name: array_numpy(arr) for name, arr in record.items()}


def read_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ``{name: ndarray}`` as read-only views of its bytes (:func:`array_view`).

    For reading (validation, norms, averages): writing into one raises instead of changing
    the record.
    """
    return {name: array_view(arr) for name, arr in record.items()}


def wire_dtypes(record: ArrayRecord) -> dict[str, str]:
    """``{name: dtype}`` as the record carries it (``bfloat16`` included)."""
    return {name: str(arr.dtype) for name, arr in record.items()}


def to_record(weights: Mapping[str, np.ndarray], dtypes: Mapping[str, str] | None = None) -> ArrayRecord:
    """``{name: ndarray}`` -> ArrayRecord, keeping names and shapes (0-dim stays 0-dim).

    ``dtypes`` (e.g. :func:`wire_dtypes` of the record the arrays came from) gives the wire
    dtype per name: the array is cast to it, ``bfloat16`` written as such.
    """
    out: dict[str, Array] = {}
    for name, w in weights.items():
        want = dtypes.get(name) if dtypes is not None else None
        if want == BFLOAT16:
            out[name] = bf16_array(np.asarray(w))
            continue
        arr = np.asarray(w)
        if want is not None and arr.dtype != np.dtype(want):
            arr = arr.astype(np.dtype(want))
        # np.require keeps 0-dim arrays 0-dim (np.ascontiguousarray would make them 1-dim)
        out[name] = Array(np.require(arr, requirements="C"))
    return ArrayRecord(array_dict=out)


def torch_record(state: Mapping[str, Any]) -> ArrayRecord:
    """A torch ``state_dict`` -> ArrayRecord; bfloat16 tensors travel as ``bfloat16`` (Flower refuses them)."""
    import torch

    out: dict[str, Array] = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            out[name] = bf16_array(bf16_bits_to_float32(t.contiguous().view(torch.int16).numpy()))
        else:
            out[name] = Array(np.require(t.numpy(), requirements="C"))
    return ArrayRecord(array_dict=out)


def torch_state(record: ArrayRecord) -> dict[str, Any]:
    """ArrayRecord -> torch tensors (``bfloat16`` arrays as bfloat16 tensors), for ``load_state_dict``."""
    import torch

    out: dict[str, Any] = {}
    for name, arr in record.items():
        if is_bfloat16(arr):
            bits = np.ascontiguousarray(arr.numpy()).view(np.int16)  # the raw bfloat16 bit patterns
            out[name] = torch.from_numpy(bits.copy()).view(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(np.array(arr.numpy(), copy=True))
    return out


def metric_dict(record: MetricRecord) -> dict[str, float]:
    """MetricRecord -> plain dict (scalars only)."""
    return {k: v for k, v in record.items() if not isinstance(v, list)}


def metric_records(content: RecordDict) -> dict[str, MetricRecord]:
    """The MetricRecords of ``content``, a plain dict (``RecordDict.metric_records`` builds a checked copy per call)."""
    return {k: v for k, v in content.items() if isinstance(v, MetricRecord)}


def array_records(content: RecordDict) -> dict[str, ArrayRecord]:
    """The ArrayRecords of ``content`` as a plain dict (see :func:`metric_records`)."""
    return {k: v for k, v in content.items() if isinstance(v, ArrayRecord)}


def with_content(msg: Message, content: RecordDict) -> Message:
    """``msg`` with other content and the same metadata (sender, reply-to, type): e.g. a reply with fewer records."""
    return Message(metadata=msg.metadata, content=content)  # type: ignore[call-overload]


def number(record: MetricRecord | Any, key: str) -> float:
    """A scalar of a record as ``float``.

    Raises
    ------
    ValueError
        If the key is missing or not a single number.
    """
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{key}' must be a number, got {value!r}")
    return float(value)
