"""Reading Flower Arrays without copying: the same values as ``Array.numpy()``, hostile bytes refused."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fed_unlearn.flower.records import (
    array_records,
    array_view,
    bf16_array,
    metric_records,
    read_weights,
    remember_values,
    to_record,
    to_weights,
)

TIER = "integration"  # see tests/conftest.py (Flower's records only)

VALUES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(3.5, dtype=np.float32),  # 0-dim
    np.arange(5, dtype=np.int64),  # a BatchNorm counter
    np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3),
    np.zeros((0, 4), dtype=np.float64),
    np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    np.arange(4, dtype=">f4"),  # big-endian
    np.array([True, False]),
    np.arange(4, dtype=np.uint8),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: f"{v.dtype.str}{v.shape}")
def test_a_view_holds_what_array_numpy_gives_and_cannot_be_written(value):
    arr = Array(value)
    view, loaded = array_view(arr), arr.numpy()
    assert view.dtype == loaded.dtype and view.shape == loaded.shape
    assert np.array_equal(view, loaded)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[...] = 0


def test_to_weights_copies_and_read_weights_views():
    rec = to_record({"w": np.ones((2, 2), np.float32), "c": np.array(7, np.int64)})
    fresh, views = to_weights(rec), read_weights(rec)
    fresh["w"] += 1  # a fresh array may be changed; the record is not
    assert np.array_equal(read_weights(rec)["w"], np.ones((2, 2)))
    assert not views["w"].flags.writeable and views["c"].shape == ()


def test_bfloat16_reads_as_its_float32_values():
    values = np.array([1.0, -2.5, 3.140625], np.float32)  # exact in bfloat16
    assert np.array_equal(array_view(bf16_array(values)), values)


def _npy(header: bytes, body: bytes) -> Array:
    head = header + b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + body
    return Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=data)


def test_a_buffer_shorter_than_its_header_claims_is_refused():
    arr = _npy(b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000,), }", np.zeros(3, np.float32).tobytes())
    with pytest.raises(ValueError):
        array_view(arr)


def test_an_object_array_is_never_unpickled():
    buf = BytesIO()
    np.save(buf, np.array([1, "a"], dtype=object), allow_pickle=True)
    arr = Array(dtype="object", shape=(2,), stype="numpy.ndarray", data=buf.getvalue())
    with pytest.raises(ValueError, match="pickle"):
        array_view(arr)  # not our fast path; np.load with allow_pickle=False refuses it


def test_an_unusual_header_goes_to_numpys_reader():
    # a valid .npy header with the keys in another order: numpy reads it, so do we
    arr = _npy(b"{'shape': (3,), 'fortran_order': False, 'descr': '<f4', }", np.arange(3, dtype=np.float32).tobytes())
    assert np.array_equal(array_view(arr), np.arange(3, dtype=np.float32))


def test_record_lookups_are_plain_dicts_of_the_records():
    content = RecordDict({"a": ArrayRecord(), "m": MetricRecord({"n": 1}), "b": ArrayRecord()})
    assert list(array_records(content)) == ["a", "b"] and list(metric_records(content)) == ["m"]
    assert metric_records(content)["m"] is content["m"]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: f"{v.dtype.str}{v.shape}")
def test_a_remembered_array_gives_what_numpy_gives_fresh_each_time(value):
    rec = ArrayRecord({"x": Array(value)})
    plain = rec["x"]
    remember_values(rec, read_weights(rec))
    got, want = rec["x"].numpy(), plain.numpy()
    assert type(rec["x"]) is not Array and rec["x"] == plain and plain == rec["x"]  # same fields, equal
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert got.flags.writeable and got.flags.f_contiguous == want.flags.f_contiguous
    if got.size:
        got.flat[0] = 1
        assert np.array_equal(rec["x"].numpy(), want)  # a fresh copy: the record is not changed
    # on the wire it is the plain Array: the same deflated bytes and object id, inflated as an Array
    assert rec["x"].deflate() == plain.deflate() and rec["x"].object_id == plain.object_id
    assert rec.object_id == ArrayRecord({"x": plain}).object_id  # so is a record holding it
    rec["x"].data = Array(np.ones(2, np.float32)).data  # new bytes: the remembered values are forgotten
    rec["x"].dtype, rec["x"].shape = "float32", (2,)
    assert rec["x"].numpy().tolist() == [1.0, 1.0]


def test_only_views_of_the_arrays_own_values_are_remembered():
    rec = to_record({"w": np.ones(3, np.float32), "b": np.zeros(2, np.float32)})
    rec_bf = ArrayRecord({"h": bf16_array(np.ones(2, np.float32))})
    remember_values(rec, {"w": np.ones(3, np.float32), "b": read_weights(rec)["b"].astype(np.float64)})
    remember_values(rec_bf, read_weights(rec_bf))  # bfloat16 reads as float32: not what numpy() gives
    assert type(rec["w"]) is Array and type(rec["b"]) is Array and type(rec_bf["h"]) is Array


def test_a_checked_reply_reaches_the_strategy_holding_the_values_the_check_read():
    """Plain and cast replies alike: their arrays remember the checked values, so FedAvg never parses them again."""
    from flwr.app import Message

    from fed_unlearn.flower.records import DecodedArray
    from fed_unlearn.flower.replies import check_role

    ref = {"w": np.zeros((2, 3), np.float32), "n": np.array(1, np.int64)}
    for wire in (np.float32, np.float64):  # float64 is cast to the model's float32 and written again
        content = RecordDict(
            {
                "arrays": to_record({"w": np.ones((2, 3), wire), "n": np.array(2, np.int64)}),
                "metrics": MetricRecord({"num-examples": 5}),
            }
        )
        reply = Message(content, reply_to=Message(RecordDict(), 1, "train"))
        checked, _ = check_role(reply, "arrays", "metrics", ref, "num-examples", 0, measured=["w"])
        record = checked.message.content.array_records["arrays"]
        assert all(type(a) is DecodedArray for a in record.values())
        assert record["w"].dtype == "float32" and checked.norm == pytest.approx(np.sqrt(6))
        for name, arr in record.items():  # what FedAvg reads is what was checked
            assert arr.values() is checked.update.weights[name]
            np.testing.assert_array_equal(
                arr.numpy(), Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data).numpy()
            )
