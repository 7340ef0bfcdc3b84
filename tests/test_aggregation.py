"""FedAvg, pseudo-gradients and update validation (pure math)."""

import numpy as np
import pytest

from fed_unlearn.aggregation import (
    ClientUpdate,
    InvalidUpdateError,
    fedavg,
    pseudo_gradient,
    validate_update,
    validate_updates,
)

TIER = "unit"  # see tests/conftest.py

REF = {"a": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}


def test_fedavg_weights_by_examples():
    u1 = ClientUpdate(0, {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}, 1)
    u2 = ClientUpdate(1, {"a": np.full((2, 2), 5.0, np.float32), "b": np.full(3, 4.0, np.float32)}, 3)
    out = fedavg([u2, u1])
    np.testing.assert_allclose(out["a"], np.full((2, 2), 4.0))  # (1*1 + 3*5) / 4
    np.testing.assert_allclose(out["b"], np.full(3, 3.0))
    assert out["a"].dtype == np.float32


def test_pseudo_gradient_is_local_minus_global():
    d = pseudo_gradient({"a": np.full((2, 2), 3.0), "b": np.arange(3.0)}, {"a": np.ones((2, 2)), "b": np.ones(3)})
    np.testing.assert_array_equal(d["a"], np.full((2, 2), 2.0))
    np.testing.assert_array_equal(d["b"], [-1.0, 0.0, 1.0])


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"a": np.full((2, 2), np.nan, np.float32), "b": np.zeros(3, np.float32)}, "4 NaN/inf"),
        ({"a": np.zeros((2, 2), np.float32), "b": np.array([0, np.inf, 0], np.float32)}, "'b' contains 1 NaN/inf"),
        ({"a": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}, r"'a' has shape \(2, 3\)"),
        ({"a": np.zeros((2, 2), np.float32)}, r"missing \['b'\]"),
        ({"a": np.zeros((2, 2)), "b": np.zeros(3), "c": np.zeros(1)}, r"unexpected \['c'\]"),
    ],
)
def test_invalid_updates_are_named(bad, msg):
    with pytest.raises(InvalidUpdateError, match=msg):
        validate_update(bad, REF, "client 7")
    with pytest.raises(InvalidUpdateError, match="client 7"):
        validate_update(bad, REF, "client 7")


def test_non_positive_example_count_is_rejected():
    with pytest.raises(InvalidUpdateError, match="num-examples"):
        validate_updates([ClientUpdate(2, dict(REF), 0)], REF)


def test_streamed_delta_sum_equals_the_sum_of_pseudo_gradients():
    from fed_unlearn.aggregation import pseudo_gradient, weighted_delta_sum, weighted_sum

    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(3, 4)).astype(np.float32), "steps": np.array([7], np.int64)}
    locs = [{"w": rng.normal(size=(3, 4)).astype(np.float32), "steps": np.array([9], np.int64)} for _ in range(4)]
    coefs = [0.5, -2.0, 0.25, 1.0]
    got = weighted_delta_sum(locs, coefs, g)
    want = weighted_sum([pseudo_gradient(loc, g) for loc in locs], coefs, {"w": np.zeros((3, 4)), "steps": np.zeros(1)})
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-12)
    assert got["w"].dtype == np.float64 and got["steps"].tolist() == [0.0]  # counters never move
    np.testing.assert_allclose(
        got["w"][0, 0],
        sum(c * (float(loc["w"][0, 0]) - float(g["w"][0, 0])) for loc, c in zip(locs, coefs, strict=True)),
    )


def test_update_norms_float32_fast_and_every_other_dtype_in_float64():
    """||w - s|| over the named arrays: 3-4-12 gives 13; float32 agrees with float64 to 1e-6, 0-dim counts."""
    from fed_unlearn.aggregation import clip_update, mean_update_norm, update_norm

    s = {"a": np.zeros(2, np.float32), "b": np.float64(1.0), "c": np.zeros(3, np.float16), "skip": np.zeros(1)}
    w = {"a": np.array([3, 4], np.float32), "b": np.float64(13.0), "c": np.zeros(3, np.float16), "skip": np.ones(1)}
    assert update_norm(w, s, ["a", "b", "c"]) == pytest.approx(13.0, rel=1e-12)
    rng = np.random.default_rng(0)
    big = {"x": rng.standard_normal((300, 200)).astype(np.float32)}
    zero = {"x": np.zeros((300, 200), np.float32)}
    exact = float(np.sqrt(np.sum(big["x"].astype(np.float64) ** 2)))
    assert update_norm(big, zero, ["x"]) == pytest.approx(exact, rel=1e-6)
    huge = {"x": np.full(4, 1e38, np.float32)}  # its square overflows float32: the norm comes from float64
    assert update_norm(huge, {"x": np.zeros(4, np.float32)}, ["x"]) == pytest.approx(2e38)
    u = ClientUpdate(0, w, 1.0)
    assert mean_update_norm([u, u], s, ["a"]) == pytest.approx(5.0) and mean_update_norm([], s, ["a"]) is None
    clipped = clip_update(w, s, 2.5, ["a"])
    assert clipped is not None and update_norm(clipped, s, ["a"]) == pytest.approx(2.5, rel=1e-6)
    assert clipped["a"].dtype == np.float32 and clipped["skip"] is w["skip"]  # only the named arrays move
    assert clip_update(w, s, 6.0, ["a"]) is None  # within the bound: untouched


def test_conform_update_norm_doubles_as_the_finiteness_check():
    """The norm over the measured arrays equals update_norm; NaN/inf there or elsewhere is still refused by name."""
    from fed_unlearn.aggregation import InvalidUpdateError, conform_update, update_norm

    ref = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32), "n": np.array(4, np.int64)}
    upd = {"w": np.full((2, 3), 2.0, np.float32), "b": np.array([1.0, 2.0, 2.0]), "n": np.array(5, np.int64)}
    scratch: dict[str, np.ndarray] = {}
    out, cast, norm = conform_update(upd, ref, "c1", ["w", "b"], scratch)
    assert cast and out["b"].dtype == np.float32  # float64 cast down to the model's float32
    assert norm == pytest.approx(update_norm(out, ref, ["w", "b"]), rel=1e-12) and norm == pytest.approx(np.sqrt(33))
    assert scratch["w"].shape == (2, 3)  # the buffer is kept for the next reply
    assert conform_update(upd, ref, "c1")[2] is None  # nothing measured: no norm
    for name, bad in (("w", np.float32("nan")), ("w", np.float32("inf")), ("b", np.nan)):
        hostile = {k: np.array(v, copy=True) for k, v in upd.items()}
        hostile[name].flat[1] = bad
        with pytest.raises(InvalidUpdateError, match=f"array '{name}' contains 1 NaN/inf"):
            conform_update(hostile, ref, "c1", ["w", "b"], scratch)
    # an array outside the measured names is scanned on its own
    with pytest.raises(InvalidUpdateError, match="array 'w' contains"):
        conform_update({**upd, "w": np.full((2, 3), np.nan, np.float32)}, ref, "c1", ["b"])
    # finite float64 that does not fit float32 is refused after the cast
    with pytest.raises(InvalidUpdateError, match=r"as float32\): array 'b'"):
        conform_update({**upd, "b": np.array([1e300, 0.0, 0.0])}, ref, "c1", ["w", "b"])
