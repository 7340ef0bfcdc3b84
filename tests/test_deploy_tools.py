"""Deployment tooling without processes: certificates for a SuperLink on another host."""

import ipaddress

import pytest
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


def test_every_bad_argument_of_the_deployment_tool_is_one_line_and_exit_2(tmp_path, capsys):
    from simulations.deploy import main as deploy

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "deployment.json").write_text("{not json")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "deployment.json").write_text("[1]")
    (tmp_path / "afile").write_text("x")
    probes = [
        ["down", "--dir", str(tmp_path / "none")],
        ["status", "--dir", str(tmp_path / "none")],
        ["status", "--dir", str(tmp_path / "bad")],
        ["run", "--dir", str(tmp_path / "list")],
        ["certs", "--dir", str(tmp_path / "afile" / "certs")],  # a folder that cannot be made
    ]
    for argv in probes:
        assert deploy(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    for sites in ("0", "1"):
        with pytest.raises(SystemExit) as stop:
            deploy(["up", "--sites", sites, "--dir", str(tmp_path / "x")])
        assert stop.value.code == 2 and "at least 2 sites" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing was started
