"""Erasure certificates: a served request's audit, signed with the server's Ed25519 key.

A certificate is a JSON document ``{"schema", "payload", "signature", "public-key",
"key-id"}``: the payload (who asked and when, the rounds, the model hashes, the audit
figures, and the SHA-256 of every plot) is serialised canonically (sorted keys, no
whitespace) and signed. The same certificate is rendered as one self-contained HTML page
a data-protection officer can open without anything else (plots inlined), with the signed
JSON embedded so the page itself verifies::

    python -m server.erasure_admin verify <state-dir>/audit/<id>.certificate.html --state-dir <state-dir>

Changing any field of the payload, or any inlined plot, makes verification fail.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEMA = "fed-unlearn/erasure-certificate/1"
_EMBED_ID = "erasure-certificate"
_EMBED = re.compile(r'<script type="application/json" id="' + _EMBED_ID + r'">(.*?)</script>', re.DOTALL)
_IMAGE = re.compile(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


class CertificateError(ValueError):
    """A certificate that cannot be read or does not verify (the message says why)."""


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    """The signing key at ``path`` (PEM, PKCS#8), created (mode 0600) with its ``.pub`` if absent."""
    path = Path(path)
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise CertificateError(f"{path}: not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _clean(v: Any) -> Any:
    """JSON-safe: NaN/inf become ``None`` (JSON has neither), tuples lists, keys strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _clean(v.item())
    return v


def canonical(payload: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(_clean(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(payload: Mapping[str, Any], key: Ed25519PrivateKey, images: Mapping[str, bytes] | None = None) -> dict:
    """A signed certificate of ``payload``; ``images`` (name -> PNG bytes) are pinned by their SHA-256."""
    body = dict(_clean(payload))
    body["images-sha256"] = {name: hashlib.sha256(data).hexdigest() for name, data in sorted((images or {}).items())}
    public = _raw(key.public_key())
    return {
        "schema": SCHEMA,
        "payload": body,
        "signature": base64.b64encode(key.sign(canonical(body))).decode(),
        "public-key": base64.b64encode(public).decode(),
        "key-id": key_id(public),
    }


def _strict(v: Any, where: str = "payload") -> None:
    """Refuse values :func:`sign` never writes (NaN, infinities): they would verify as the ``null`` signed."""
    if isinstance(v, float) and not math.isfinite(v):
        raise CertificateError(f"{where} holds {v!r}, which no signed certificate has: it was altered")
    if isinstance(v, Mapping):
        for k, x in v.items():
            _strict(x, f"{where}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _strict(x, f"{where}[{i}]")


def verify(
    cert: Any,
    trusted_key: bytes,
    images: Mapping[str, bytes] | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """Check that ``cert`` is signed by ``trusted_key`` (and that ``images`` and ``request_id`` match).

    A certificate only says something when it is signed by the server's key: anybody can
    sign a certificate with a key of their own, so the key it names is never trusted.

    Parameters
    ----------
    cert : mapping
        As :func:`sign` returns it (or :func:`read` reads it).
    trusted_key : bytes
        The server's public key (raw 32 bytes, or PEM: ``<state-dir>/certificate-key.pub``).
    images : mapping, optional
        Plots shown with the certificate (name -> PNG bytes); each must match its pinned hash.
    request_id : str, optional
        The request the certificate must be for (a certificate renamed to another request
        fails).

    Returns
    -------
    dict
        The verified payload.

    Raises
    ------
    CertificateError
        Naming what does not verify.
    """
    if not isinstance(cert, Mapping):
        raise CertificateError(f"not an erasure certificate (a JSON {type(cert).__name__}, not an object)")
    if cert.get("schema") != SCHEMA:
        raise CertificateError(f"not an erasure certificate (schema {cert.get('schema')!r})")
    want = public_key_bytes(trusted_key)
    payload = cert.get("payload")
    if not isinstance(payload, Mapping):
        raise CertificateError("malformed certificate (its payload is not an object)")
    _strict(payload)
    try:
        public = base64.b64decode(str(cert["public-key"]), validate=True)
        signature = base64.b64decode(str(cert["signature"]), validate=True)
    except (KeyError, ValueError, TypeError) as exc:
        raise CertificateError(f"malformed certificate ({exc})") from None
    if public != want:
        raise CertificateError(f"signed by another key ({key_id(public)}) than the server's ({key_id(want)})")
    try:
        Ed25519PublicKey.from_public_bytes(want).verify(signature, canonical(payload))
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"malformed certificate ({exc})") from None
    except InvalidSignature:
        raise CertificateError("the signature does not match the contents: the certificate was altered") from None
    req = payload.get("request")
    got = req.get("id") if isinstance(req, Mapping) else None
    if request_id is not None and got != request_id:
        raise CertificateError(f"the certificate is for request {got!r}, not {request_id!r}")
    pinned = dict(payload.get("images-sha256", {}))
    for name, data in (images or {}).items():
        if pinned.get(name) != hashlib.sha256(data).hexdigest():
            raise CertificateError(f"the plot {name!r} was altered or is not the one signed")
    if images is not None and set(pinned) - set(images):
        raise CertificateError(f"plots missing from the page: {sorted(set(pinned) - set(images))}")
    return dict(payload)


def key_id(public: bytes) -> str:
    """The short id a certificate names its key by (the SHA-256 of the raw key, 16 hex characters)."""
    return hashlib.sha256(public).hexdigest()[:16]


def public_key_bytes(key: bytes) -> bytes:
    """The raw 32 bytes of an Ed25519 public key given raw or as PEM; raises :class:`CertificateError`."""
    if key.lstrip().startswith(b"-----BEGIN"):
        try:
            loaded = serialization.load_pem_public_key(key)
        except ValueError as exc:
            raise CertificateError(f"the trusted key does not read ({exc})") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise CertificateError("the trusted key is not an Ed25519 public key")
        return _raw(loaded)
    if len(key) != 32:
        raise CertificateError("the trusted key is neither PEM nor 32 raw bytes")
    return key


def _no_constants(name: str) -> Any:
    raise CertificateError(f"the file holds {name}, which is not JSON (a signed certificate never has it)")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constants)


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, bytes] | None]:
    """A certificate from its ``.json`` or ``.html`` file; for HTML also the inlined plots."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".html", ".htm"):
        found = _EMBED.search(text)
        if found is None:
            raise CertificateError(f"{path}: no embedded certificate")
        images = {m.group(1): base64.b64decode(m.group(2)) for m in _IMAGE.finditer(text)}
        return _loads(found.group(1).replace("<\\/", "</")), images
    return _loads(text), None


def _rows(rows: Mapping[str, Any]) -> str:
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_show(v))}</td></tr>" for k, v in rows.items())


def _show(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.4f}"
    return str(v)


def render_html(cert: Mapping[str, Any], images: Mapping[str, bytes] | None = None) -> str:
    """One self-contained page: the certificate's facts, figures, plots and the signed JSON."""
    cert = json.loads(json.dumps(cert, sort_keys=True))  # the page depends on the contents, not on key order
    p = cert["payload"]
    req = p.get("request", {})
    stages = ("before", "after-unlearning", "after-recovery")
    hashes = {k: p.get("model-sha256", {})[k] for k in stages if k in p.get("model-sha256", {})}
    order = ("received", "unlearning", "served", "recovered", "recovery-rounds")
    rounds = {
        k: p.get("rounds", {})[k]
        for k in sorted(p.get("rounds", {}), key=lambda k: (k not in order, order.index(k) if k in order else 0, k))
    }
    strong = p.get("strong-audit") or {}
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Erasure certificate {html.escape(str(req.get('id', '')))}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 10px;"
        "text-align:left}th{background:#f4f4f4}code{word-break:break-all}.verdict{font-size:1.1em;padding:0.6em;"
        "border-left:4px solid #888;background:#fafafa}</style></head><body>",
        "<h1>Erasure certificate</h1>",
        f"<p class='verdict'>{html.escape(str(p.get('verdict', '')))}</p>",
        "<h2>Request</h2><table>"
        + _rows(
            {
                "request id": req.get("id"),
                "site": req.get("site"),
                "requested by": req.get("requested-by"),
                "reason": req.get("reason"),
                "received (UTC)": p.get("received-at"),
                "method": p.get("method"),
                "fallback used": p.get("fallback-used"),
            }
        )
        + "</table>",
        "<h2>Rounds</h2><table>" + _rows(rounds) + "</table>",
        "<h2>Global model (SHA-256)</h2><table>" + _rows(hashes) + "</table>",
    ]
    if strong:
        figures: Mapping[str, Mapping[str, Any]] = strong.get("figures", {})
        cols = list(figures)
        keys = [k for k in strong.get("keys", []) if any(k in figures[c] for c in cols)]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{_show(figures[c].get(k))}</td>" for c in cols) + "</tr>"
            for k in keys
        )
        parts += [
            "<h2>Membership-inference audit</h2>",
            f"<p>{html.escape(str(strong.get('reading', '')))}</p>",
            f"<table><tr><th>figure</th>{head}</tr>{body}</table>",
        ]
    for name, data in sorted((images or {}).items()):
        parts.append(
            f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}" '
            f'width="520"><figcaption>{html.escape(name)}</figcaption></figure>'
        )
    embedded = json.dumps(cert, sort_keys=True, indent=1).replace("</", "<\\/")
    parts += [
        "<h2>Signature</h2><table>"
        + _rows({"algorithm": "Ed25519", "key id": cert.get("key-id"), "public key": cert.get("public-key")})
        + "</table>",
        "<p>Verify with <code>python -m server.erasure_admin verify &lt;this file&gt; --public-key "
        "&lt;state-dir&gt;/certificate-key.pub</code>. Any change to this page's facts or plots fails it.</p>",
        f'<script type="application/json" id="{_EMBED_ID}">{embedded}</script>',
        "</body></html>",
    ]
    return "\n".join(parts)


def verify_file(path: str | Path, trusted_key: bytes, request_id: str | None = None) -> dict[str, Any]:
    """Verify a certificate file (``.json`` or ``.html``) against the server's key; returns the payload.

    An HTML page must also be exactly the page the signed certificate renders to, so a
    changed table cell, caption or plot fails even though the embedded JSON is intact.

    Raises
    ------
    CertificateError
        Naming what does not verify.
    """
    try:
        cert, images = read(path)
    except CertificateError as exc:
        raise CertificateError(f"{path}: {exc}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise CertificateError(f"{path}: cannot read a certificate ({exc})") from None
    payload = verify(cert, trusted_key, images, request_id)
    if images is not None and render_html(cert, images) != Path(path).read_text(encoding="utf-8"):
        raise CertificateError("the page differs from the signed certificate it embeds: it was altered")
    return payload
