"""Erasure certificates: signed, self-contained, and any change fails verification."""

import json

import pytest

from fed_unlearn import certificate as C

TIER = "unit"  # see tests/conftest.py

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))  # content does not matter: it is pinned by its hash
PAYLOAD = {
    "request": {"id": "r-1", "site": "hospital-b", "requested-by": "site:hospital-b", "reason": "withdrawal"},
    "rounds": {"received": 3, "unlearning": 4, "recovered": 5},
    "model-sha256": {"before": "aa", "after-recovery": "bb"},
    "strong-audit": {
        "figures": {"after": {"rmia-tpr@1%": 0.012, "rmia-auc": float("nan")}, "retrained": {"rmia-tpr@1%": 0.01}},
        "keys": ["rmia-tpr@1%", "rmia-auc"],
        "reading": "target: the retrained figures",
    },
    "verdict": "the site's data looks unseen",
}


def make(tmp_path):
    key = C.load_or_create_key(tmp_path / "certificate-key.pem")
    cert = C.sign(PAYLOAD, key, images={"roc.png": PNG})
    page = tmp_path / "c.html"
    page.write_text(C.render_html(cert, {"roc.png": PNG}), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(cert))
    return cert, page, (tmp_path / "certificate-key.pub").read_bytes()


def test_a_certificate_verifies_as_json_and_as_its_html_page(tmp_path):
    cert, page, pub = make(tmp_path)
    for f in (tmp_path / "c.json", page):
        payload = C.verify_file(f, trusted_key=pub)
        assert (
            payload["request"]["site"] == "hospital-b"
            and payload["strong-audit"]["figures"]["after"]["rmia-auc"] is None
        )
    assert oct((tmp_path / "certificate-key.pem").stat().st_mode & 0o777) == "0o600"
    text = page.read_text()
    assert "hospital-b" in text and "data:image/png;base64," in text and "<script" in text  # self-contained
    # the key is reused, not replaced
    again = C.sign(PAYLOAD, C.load_or_create_key(tmp_path / "certificate-key.pem"))
    assert again["key-id"] == cert["key-id"]


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["payload"]["request"].update(site="hospital-c"),
        lambda c: c["payload"]["rounds"].update(recovered=6),
        lambda c: c["payload"]["strong-audit"]["figures"]["after"].update({"rmia-tpr@1%": 0.011}),
        lambda c: c["payload"].update({"images-sha256": {}}),
        lambda c: c.update(signature=c["signature"][:-4] + "AAA="),
    ],
)
def test_changing_any_field_fails(tmp_path, edit):
    cert, _, pub = make(tmp_path)
    edit(cert)
    (tmp_path / "c.json").write_text(json.dumps(cert))
    with pytest.raises(C.CertificateError):
        C.verify_file(tmp_path / "c.json", trusted_key=pub)


def test_an_altered_page_or_plot_or_another_key_fails(tmp_path):
    cert, page, pub = make(tmp_path)
    text = page.read_text()
    for altered in (
        text.replace("withdrawal</td>", "court order</td>"),  # a visible cell, the embedded JSON intact
        text.replace(C.base64.b64encode(PNG).decode(), C.base64.b64encode(PNG + b"x").decode()),  # the plot
    ):
        page.write_text(altered)
        with pytest.raises(C.CertificateError, match="altered"):
            C.verify_file(page, trusted_key=pub)
    other = C.load_or_create_key(tmp_path / "other.pem")
    (tmp_path / "c.json").write_text(json.dumps(C.sign(PAYLOAD, other)))
    with pytest.raises(C.CertificateError, match="another key"):
        C.verify_file(tmp_path / "c.json", trusted_key=pub)
    with pytest.raises(TypeError):
        C.verify_file(tmp_path / "c.json")  # the server's key is required: a re-signed certificate is self-consistent


@pytest.mark.parametrize(
    "text, why",
    [
        ("[1, 2]", "a JSON list, not an object"),
        ('"a string"', "a JSON str"),
        ("null", "a JSON NoneType"),
        ("{not json", "cannot read"),
    ],
)
def test_a_file_that_is_no_certificate_is_one_line(tmp_path, text, why):
    _, _, pub = make(tmp_path)
    (tmp_path / "x.json").write_text(text)
    with pytest.raises(C.CertificateError, match=why):
        C.verify_file(tmp_path / "x.json", pub)


def test_nan_where_null_was_signed_and_another_requests_id_fail(tmp_path):
    cert, _, pub = make(tmp_path)
    text = json.dumps(cert).replace('"rmia-auc": null', '"rmia-auc": NaN')
    assert "NaN" in text
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(C.CertificateError, match="NaN"):
        C.verify_file(tmp_path / "c.json", pub)
    cert["payload"]["strong-audit"]["figures"]["after"]["rmia-auc"] = float("nan")  # built in memory
    with pytest.raises(C.CertificateError, match="nan"):
        C.verify(cert, pub)
    (tmp_path / "c.json").write_text(json.dumps(make(tmp_path)[0]))
    assert C.verify_file(tmp_path / "c.json", pub, request_id="r-1")
    with pytest.raises(C.CertificateError, match="for request 'r-1', not 'r-2'"):
        C.verify_file(tmp_path / "c.json", pub, request_id="r-2")


def test_the_admin_tool_requires_the_servers_key_and_names_the_signer(tmp_path, capsys):
    from server.erasure_admin import main as admin

    make(tmp_path)
    cert = str(tmp_path / "c.json")
    assert admin(["verify", cert]) == 2 and "needs the server's public key" in capsys.readouterr().err
    assert admin(["verify", cert, "--state-dir", str(tmp_path), "--request", "r-1"]) == 0
    assert "signed by key" in capsys.readouterr().out
    other = C.load_or_create_key(tmp_path / "o" / "other.pem")  # re-signed with anybody's key
    (tmp_path / "r.json").write_text(json.dumps(C.sign(PAYLOAD, other)))
    assert admin(["verify", str(tmp_path / "r.json"), "--state-dir", str(tmp_path)]) == 1
    assert "signed by another key" in capsys.readouterr().err
    assert admin(["verify", cert, "--state-dir", str(tmp_path), "--request", "r-2"]) == 1
    (tmp_path / "l.json").write_text("[]")
    assert admin(["verify", str(tmp_path / "l.json"), "--state-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.count("\n") == 2
