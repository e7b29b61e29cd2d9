"""DICOM TLS for the listener (``--tls-cert``, ``--tls-key``, ``--tls-ca``): with a CA given, only callers that
present a client certificate signed by it get an association; plain DIMSE, TLS without a certificate and TLS with
a stranger CA's certificate are refused. Certificates are made at test time with ``openssl``."""

import ssl

import pytest

from medmm.config import ListenerConfig
from tests.security._listener import listening, make_certs, records, store, study_files, wait

pytestmark = pytest.mark.integration


def _client(certs, name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if name is not None:
        ctx.load_cert_chain(certs / f"{name}.pem", certs / f"{name}.key")
    return ctx


def test_tls_listener_requires_a_client_certificate(sec_pipeline, pydicom_files, tmp_path):
    certs = make_certs(tmp_path / "certs")
    out = tmp_path / "pacs"
    study = study_files(pydicom_files, tmp_path / "study")
    with listening(sec_pipeline, out, tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                   tls_ca=str(certs / "ca.pem")) as (listener, port):
        assert store(port, study) == []  # plain DIMSE
        assert store(port, study, tls=_client(certs, None)) == []  # TLS, no client certificate
        assert store(port, study, tls=_client(certs, "stranger")) == []  # signed by another CA
        wait(lambda: listener.counts["refused_connections"] == 3, 10, "three refused connections")
        assert store(port, study, tls=_client(certs, "client")) == [0]
        wait(lambda: records(out), 60, "the study's record")
    assert [r["outcome"] for r in records(out)] == ["ok"]


def test_tls_settings_go_together(tmp_path):
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        ListenerConfig(allowed_aets=["SCU"], tls_cert=str(tmp_path / "c.pem"))
    with pytest.raises(ValueError, match="--tls-ca"):
        ListenerConfig(allowed_aets=["SCU"], tls_ca=str(tmp_path / "ca.pem"))
