"""Helpers of the HTTP API probes: raw HTTP over a socket, chunked bodies, a throw-away PKI made with openssl.

The PKI is made at test time with the ``openssl`` command (the `cryptography` package is not a dependency of
medmm): a CA, a server certificate for 127.0.0.1 and a client certificate, all signed by that CA.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

BOUNDARY = "medmm-probe-boundary"


def raw_exchange(url: str, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``request`` as it is to the server of ``url`` and read one response: (status, head + body).

    Reads the head, then the body its Content-Length declares. A server that waits for more (a body never sent)
    ends in ``socket.timeout`` after ``timeout`` seconds: the probe fails instead of hanging."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(head.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


def zeros(n_bytes: int, chunk: int = 64 << 10):
    """A generator body (httpx sends it chunked, with no Content-Length) of ``n_bytes`` zero bytes."""
    for start in range(0, n_bytes, chunk):
        yield b"\0" * min(chunk, n_bytes - start)


def multipart_upload(n_bytes: int):
    """A chunked multipart body: one ``files`` part of ``n_bytes`` zero bytes (for /v1/studies/report)."""
    yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n'
           "Content-Type: application/dicom\r\n\r\n").encode()
    yield from zeros(n_bytes)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA and two leaf certificates it signs (server for IP 127.0.0.1, client): paths by name."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS probes make their certificates with the openssl command, which is missing")
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=medmm test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    for name, ext in [("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")]:
        (folder / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n" + ext)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=medmm test {name}",
                 cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
