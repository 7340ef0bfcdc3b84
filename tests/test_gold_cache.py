"""The gold cache stores and restores exactly what it was given."""

import numpy as np

from fed_unlearn.gold_cache import load_federation, save_federation

TIER = "unit"  # see tests/conftest.py


def test_roundtrip_and_miss(tmp_path):
    assert load_federation(tmp_path, "abc") is None
    w = {"net.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "net.0.bias": np.ones(2, np.float32)}
    save_federation(tmp_path, "abc", w, {"history": {"1": {"test-acc": 0.5}}})
    got, meta = load_federation(tmp_path, "abc")
    assert list(got) == list(w)
    for k in w:
        np.testing.assert_array_equal(got[k], w[k])
        assert got[k].dtype == w[k].dtype
    assert meta["history"]["1"]["test-acc"] == 0.5
    save_federation(tmp_path, "abc", {k: v + 1 for k, v in w.items()}, {"history": {}})  # overwrite
    np.testing.assert_array_equal(load_federation(tmp_path, "abc")[0]["net.0.bias"], np.full(2, 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["abc"]  # no temporary folders left behind
