"""Row 5: a stranger's raw TCP connection declaring a 4 GiB A-ASSOCIATE-RQ, then streaming its body. pynetdicom
reads whatever length a PDU header declares (``maximum_pdu_size`` only negotiates P-DATA), so the listener took
in everything sent (+240 MiB per connection for 200 MiB) before any AE title check. The listener must close the
connection on the header, before the body is read, close connections beyond its cap unread, and go on serving
callers (the largest sane A-ASSOCIATE-RQ included)."""

import select
import socket
import struct

import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

from medmm.serve.listener import MAX_CONNECTIONS
from tests.security._listener import associate, listening, store, study_files, wait

pytestmark = pytest.mark.integration
BODY = 64 << 20  # what the stranger tries to push after its header


def _push(port: int, pdu_type: int, declared: int) -> tuple[int, bool]:
    """Send a PDU header declaring ``declared`` bytes, then up to BODY bytes of body. Returns (bytes the kernel
    took before the listener closed the connection, whether the connection was closed by the listener)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack(">BBL", pdu_type, 0, declared))
        chunk = b"\0" * (1 << 20)
        try:
            while sent < BODY:
                sent += s.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return sent, True
        except TimeoutError:  # the listener neither reads nor closes: cannot be the fixed listener
            return sent, False
        try:
            closed = s.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        return sent, closed


def test_oversized_pdus_are_refused_before_their_body_is_read(sec_pipeline, pydicom_files, tmp_path):
    with listening(sec_pipeline, tmp_path / "pacs") as (listener, port):
        for pdu_type, declared in ((0x01, 0xFFFFFFFF), (0x04, 64 << 20), (0x01, 1 << 20)):
            sent, closed = _push(port, pdu_type, declared)
            assert closed, f"PDU type {pdu_type:#04x} declaring {declared} bytes: the connection stayed open"
            # only socket buffers' worth got through, never the body the header asked the listener to read
            assert sent < 16 << 20, f"the listener took {sent >> 20} MiB of a PDU it should have refused"
        wait(lambda: listener.counts["refused_connections"] == 3, 10, "3 refusals counted")
        # a flood of silent connections: the ones beyond the connection cap are closed unread, not given threads
        flood = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS + 8)]
        try:
            wait(lambda: listener.counts["refused_connections"] == 3 + 8, 10, "8 connections closed by the listener")
            readable, _, _ = select.select(flood, [], [], 5)
            assert len(readable) == 8 and all(s.recv(1) == b"" for s in readable)
        finally:
            for s in flood:
                s.close()
        wait(lambda: not listener._server.active_associations, 30, "the silent connections to be let go")
        # and it still serves: a C-ECHO and a C-STORE of a real caller
        assoc = associate(port)
        assert assoc.is_established
        try:
            assert int(assoc.send_c_echo().Status) == 0
        finally:
            assoc.release()
        assert store(port, study_files(pydicom_files, tmp_path / "study")) == [0]
        # the cap leaves room for the largest sane A-ASSOCIATE-RQ: 120 storage contexts, every transfer syntax
        ae = AE(ae_title="SCU")
        for cx in AllStoragePresentationContexts[:120]:
            ae.add_requested_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDMM")
        assert assoc.is_established
        assoc.release()
