"""PUF on hand-computed arrays (pure math, no Flower)."""

import numpy as np
import pytest

from fed_unlearn.aggregation import ClientUpdate
from fed_unlearn.unlearning import make_method
from fed_unlearn.unlearning.puf import PUF, PUFConfig, puf_update

TIER = "unit"  # see tests/conftest.py

G = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.5], dtype=np.float32)}


def upd(cid, w, b, n):
    return ClientUpdate(cid, {"w": np.array(w, np.float32), "b": np.array([b], np.float32)}, n)


def test_regular_matches_hand_computation():
    # Delta_1 = (+1, 0 | 0), n=1; Delta_2 = (0, +2 | +1), n=3 (departing); N = 4, eta = 2.
    rem = [upd(1, [2.0, 2.0], 0.5, 1)]
    dep = [upd(2, [1.0, 4.0], 1.5, 3)]
    out = puf_update(G, rem, dep, eta=2.0, variant="regular")
    # w = (1,2) + 1/4*(1,0) - 2*3/4*(0,2) = (1.25, -1.0); b = 0.5 + 0 - 1.5*1 = -1.0
    np.testing.assert_allclose(out["w"], [1.25, -1.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["b"], [-1.0], atol=1e-6)
    assert out["w"].dtype == np.float32


def test_special_ignores_remaining_and_normalises_by_departing():
    dep = [upd(2, [1.0, 4.0], 1.5, 3), upd(5, [3.0, 2.0], 0.5, 1)]
    out = puf_update(G, [upd(1, [100.0, 100.0], 9.0, 50)], dep, eta=2.0, variant="special")
    # N_U = 4: step = -2 * (3/4*(0,2,1) + 1/4*(2,0,0)) = (-1, -3, -1.5)
    np.testing.assert_allclose(out["w"], [0.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(out["b"], [-1.0], atol=1e-6)


def test_eta_zero_reduces_to_fedavg_of_remaining_weighted_by_all():
    rem = [upd(1, [3.0, 2.0], 0.5, 2)]
    dep = [upd(2, [9.0, 9.0], 9.0, 2)]
    out = puf_update(G, rem, dep, eta=0.0)
    np.testing.assert_allclose(out["w"], [2.0, 2.0], atol=1e-6)  # w + 2/4 * (2, 0)


def test_order_of_replies_does_not_matter():
    rem = [upd(1, [2.0, 1.0], 0.1, 5), upd(3, [0.0, 3.0], 0.7, 2)]
    dep = [upd(2, [1.5, 2.5], 0.9, 4), upd(4, [0.2, 2.2], 0.3, 1)]
    a = puf_update(G, rem, dep, 7.0)
    b = puf_update(G, rem[::-1], dep[::-1], 7.0)
    for k in G:
        np.testing.assert_array_equal(a[k], b[k])


def test_reference_scale_depends_on_variant_and_federation_size():
    assert PUFConfig().eta(10) == 20.0  # the reference code's 20 with 10 clients
    assert PUFConfig(variant="special").eta(10) == 2.0
    assert PUFConfig().eta(5) == 10.0
    assert PUFConfig(scale=3.5).eta(10) == 3.5


def test_method_uses_number_of_participants():
    m = make_method("puf", {"puf.variant": "regular"})
    assert isinstance(m, PUF) and m.remaining_clients_train
    rem = [upd(1, [1.0, 2.0], 0.5, 1)]  # no change
    dep = [upd(2, [2.0, 2.0], 0.5, 1)]  # Delta = (1, 0, 0)
    out = m.aggregate(G, rem, dep)  # K = 2 -> eta = 4; w = w - 4 * 1/2 * (1, 0)
    np.testing.assert_allclose(out["w"], [-1.0, 2.0], atol=1e-6)
    assert not make_method("puf", {"puf.variant": "special"}).remaining_clients_train


def test_no_departing_client_is_an_error():
    with pytest.raises(ValueError, match="departing"):
        puf_update(G, [upd(1, [1.0, 2.0], 0.5, 1)], [], 2.0)


@pytest.mark.parametrize(
    "rc, msg",
    [
        ({"puf.variant": "extra"}, "puf.variant"),
        ({"puf.scale": -1.0}, "puf.scale"),
        ({"puf.scale": "big"}, "puf.scale"),
    ],
)
def test_bad_settings_name_the_key(rc, msg):
    with pytest.raises(ValueError, match=msg):
        make_method("puf", rc)


def test_unknown_method_lists_valid_names():
    with pytest.raises(
        ValueError,
        match="valid: agu, amun, federaser, fine-tune, gradient-ascent, ieu, mpru, not, pga, puf, puf-fixed, "
        "retrain, spectral-puf, sragu, trw",
    ):
        make_method("eraser")
