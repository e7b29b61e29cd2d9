"""Row 3: decompression bombs. A Deflated Explicit VR Little Endian upload of 16384x16384 zero pixels (about 512 KB
on the wire, 512 MiB inflated, 1 GiB as float32) must be refused with a typed 422 before anything inflates or
decodes it. Before the fix it raised the server's memory by GBs and held the model lock for seconds.

The server is real uvicorn in this process, so ``tracemalloc`` sees every allocation the request makes (numpy and
zlib report theirs), and the model's ``predict`` (where pixels are decoded) can be watched.
"""

from __future__ import annotations

import dataclasses
import resource
import tracemalloc

import pytest

from medmm.io.dicom import DicomError, read_dicom
from medmm.serve.study import load_study
from tests.security._studies import ct_header, deflated_bomb, huge_native, post_study, to_bytes

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return deflated_bomb()


@pytest.fixture
def watched(sec_pipeline, monkeypatch):
    """Counts the model's predict calls (pixel decoding happens inside them) while the test runs."""
    calls = []
    inner = sec_pipeline.predictor.predict

    def predict(*a, **k):
        calls.append(1)
        return inner(*a, **k)

    monkeypatch.setattr(sec_pipeline.predictor, "predict", predict)
    return calls


def _refused(url: str, *blobs: bytes) -> tuple[dict, int]:
    """Post a study under tracemalloc; its typed 422 record and the request's peak traced allocation."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        r = post_study(url, *blobs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # ru_maxrss is in KiB
    assert r.status_code == 422, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert detail["error"] == "DicomError" and "budget" in detail["message"], detail
    assert rss_growth < 256 * MiB, f"peak RSS grew by {rss_growth / MiB:.0f} MiB"
    return detail, peak


def test_decompression_bombs_are_refused_before_decoding(api_url, sec_pipeline, bomb, watched, monkeypatch):
    assert len(bomb) < 600_000
    _, peak = _refused(api_url, bomb)  # deflated: 512 MiB of zeros inflated from ~512 KB
    assert peak < 64 * MiB, f"the request allocated {peak / MiB:.0f} MiB"
    # uncompressed, declaring 16384x16384 16-bit pixels it does not hold: refused on its header alone
    _, peak = _refused(api_url, huge_native(16384, 16384, 1))
    assert peak < 64 * MiB, f"the request allocated {peak / MiB:.0f} MiB"
    # a series of files each under the budget whose sum is not (12 x 2048x2048 float32 = 192 MiB > 128 MiB)
    study = ct_header(2048, 2048, 16)
    files = []
    for k in range(12):
        ds = ct_header(2048, 2048, 16)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study.StudyInstanceUID, study.SeriesInstanceUID
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, k], [1, 0, 0, 0, 1, 0]
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"  # deflated: 8 MiB of zeros each
        ds.PixelData = bytes(2048 * 2048 * 2)
        files.append(to_bytes(ds))
    assert sum(map(len, files)) < 4 * MiB
    monkeypatch.setattr(sec_pipeline, "config", dataclasses.replace(sec_pipeline.config, max_decoded_mib=128))
    _refused(api_url, *files)  # api_url serves sec_pipeline
    assert not watched, "the model was asked to decode a refused study"


def test_budget_is_checked_in_load_study(tmp_path, bomb):
    """The same budget holds for every caller of the chain (the listener and pull-run-push load studies too), and
    a deflated file whose header lies (a 16x16 image holding 512 MiB) is stopped where its inflation passes the
    budget."""
    liar = deflated_bomb(16, 16, 16, n=512 * MiB)
    for name, blob in (("bomb", bomb), ("liar", liar)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.dcm").write_bytes(blob)
        tracemalloc.start()
        try:
            with pytest.raises(DicomError, match="budget"):
                load_study(tmp_path / name, tmp_path / f"work_{name}", max_decoded_bytes=64 * MiB)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 32 * MiB, f"load_study allocated {peak / MiB:.0f} MiB for the {name}"


def test_decoding_is_held_to_the_budget_in_force(pydicom_files):
    """The backstop behind the header checks: inside ``pixel_budget`` every decode is charged before it happens."""
    from medmm.io.dicom import pixel_budget

    ct = pydicom_files / "CT_small.dcm"  # 128x128: 64 KiB as float32
    with pixel_budget(100 << 10) as budget:
        assert read_dicom(ct).pixels.shape == (1, 128, 128)
        assert budget.used == 64 << 10
        with pytest.raises(DicomError, match="pixel budget"):
            read_dicom(ct)  # 36 KiB left
    assert read_dicom(ct).pixels.shape == (1, 128, 128)  # outside: only the per-file cap
