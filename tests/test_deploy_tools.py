"""Deployment tooling without processes: certificates for a SuperLink on another host."""

import ipaddress

from cryptography import x509

from simulations.deploy import main, make_tls

TIER = "unit"  # see tests/conftest.py


def test_the_superlink_certificate_names_the_hosts_sites_connect_to_and_is_signed_by_the_ca(tmp_path, capsys):
    assert main(["certs", "--dir", str(tmp_path), "--host", "superlink.example.org", "--host", "10.0.0.5"]) == 0
    assert "give it to every site" in capsys.readouterr().out
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a) for a in ("127.0.0.1", "10.0.0.5")}
    cert.verify_directly_issued_by(ca)
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    loopback = make_tls(tmp_path / "lo")  # the loopback demo's certificate: 127.0.0.1 and localhost only
    lo = x509.load_pem_x509_certificate(loopback["cert"].read_bytes())
    assert len(lo.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == 2
