"""Whole-slide reading, MPP and level choice, tissue, tile grid, and ``medmm prepare wsi`` (shards, errors, resume).

Real data: the two SVS slides, the H&E tiles, the broken slide and highdicom's DICOM slide-microscopy
file (``sm_image.dcm``: 25 frames of 10x10 RGB, 0.499 µm/px) in ``../shared/data/pathology``.
Ground truth the real slides cannot give (exact tissue region, exact MPP per level, a slide that breaks
half-way) comes from pyramidal TIFFs written here with tifffile, and from DICOM pyramids written here
with pydicom on ``sm_image.dcm``'s header (TILED_FULL, TILED_SPARSE, RLE that OpenSlide cannot read).
"""

from __future__ import annotations

import json
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from medmm.errors import InvalidInputError, SlideError
from medmm.io import wsi

BASE_MPP = 0.25
SM_IMAGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pathology" / "wsi" / "sm_image.dcm"
W0, H0 = 4032, 2688
# Tissue aligned to the 0.5 µm grid (tile 224 px at 0.5 = 448 level-0 px): columns 2-5, rows 1-3 -> 12 tiles.
TISSUE = (896, 448, 2688, 1792)  # x0, y0, x1, y1 in level-0 pixels
TILE0 = 448


def slide_array(w=W0, h=H0, tissue=TISSUE, seed=0) -> np.ndarray:
    """Glass (bright, low saturation) with an H&E-like rectangle: eosin pink stroma and hematoxylin nuclei."""
    rng = np.random.default_rng(seed)
    img = (236 + rng.integers(-4, 5, (h, w, 1))).repeat(3, 2).astype(np.uint8)
    x0, y0, x1, y1 = tissue
    th, tw = y1 - y0, x1 - x0
    pink = np.array([222, 140, 186]) + rng.integers(-18, 19, (th, tw, 3))
    nuclei = rng.random((th, tw)) < 0.08
    pink[nuclei] = np.array([92, 52, 140]) + rng.integers(-15, 16, (int(nuclei.sum()), 3))
    img[y0:y1, x0:x1] = np.clip(pink, 0, 255).astype(np.uint8)
    return img


def write_pyramid(path: Path, base: np.ndarray, mpp: float | None = BASE_MPP, levels: int = 3, compression="zlib",
                  subifds: bool = False, tile=(256, 256)) -> list[np.ndarray]:
    """Tiled pyramidal TIFF; level k = base[::2**k, ::2**k] (decimated, so expected pixels are exact)."""
    import tifffile

    arrs = [base[:: 2**k, :: 2**k] for k in range(levels)]
    res = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    comp = {"compression": compression}
    if compression == "zlib":
        comp["compressionargs"] = {"level": 1}
    with tifffile.TiffWriter(path) as t:
        if subifds:
            t.write(arrs[0], tile=tile, photometric="rgb", subifds=levels - 1, **res, **comp)
            for a in arrs[1:]:
                t.write(a, tile=tile, photometric="rgb", subfiletype=1, **comp)
        else:
            for k, a in enumerate(arrs):
                t.write(a, tile=tile, photometric="rgb", subfiletype=0 if k == 0 else 1, **(res if k == 0 else {}),
                        **comp)
    return arrs


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    d = tmp_path_factory.mktemp("pyr")
    base = slide_array()
    arrs = write_pyramid(d / "synthetic.tif", base)
    return d / "synthetic.tif", arrs


def expected_tiles() -> set[tuple[int, int]]:
    x0, y0, x1, y1 = TISSUE
    return {(x, y) for x in range(x0, x1, TILE0) for y in range(y0, y1, TILE0)}


def write_dicom_pyramid(folder: Path, name: str, base: np.ndarray, mpp: float, levels: int = 2, tile: int = 64,
                        sparse: bool = False, skip_glass: bool = False, rle: bool = False, label: bool = False,
                        seed: int = 0) -> tuple[list[Path], list[np.ndarray]]:
    """A DICOM VL WSI series, one instance per level (level k = base[::2**k, ::2**k]), on sm_image.dcm's header.

    ``sparse``: TILED_SPARSE with the frames shuffled (and, with ``skip_glass``, all-glass tiles left out).
    ``rle``: RLE Lossless, a transfer syntax OpenSlide 4 does not read. ``label``: add a LABEL instance."""
    import copy

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import RLELossless, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    tmpl = pydicom.dcmread(SM_IMAGE)
    series, rng = generate_uid(), np.random.default_rng(seed)
    paths, arrs = [], []
    for k in range(levels + int(label)):
        a = base[:: 2**k, :: 2**k] if k < levels else base[::8, ::8]
        H, W = a.shape[:2]
        across, down = -(-W // tile), -(-H // tile)
        padded = np.full((down * tile, across * tile, 3), 255, np.uint8)
        padded[:H, :W] = a
        tiles = padded.reshape(down, tile, across, tile, 3).transpose(0, 2, 1, 3, 4)  # (down, across, t, t, 3)
        order = [(r, c) for r in range(down) for c in range(across)]
        ds = copy.deepcopy(tmpl)
        if sparse and k < levels:
            if skip_glass:
                order = [(r, c) for r, c in order if not (tiles[r, c] >= 230).all()]
            order = [order[i] for i in rng.permutation(len(order))]
            ds.DimensionOrganizationType = "TILED_SPARSE"
            items = []
            for r, c in order:
                pos = Dataset()
                pos.ColumnPositionInTotalImagePixelMatrix = c * tile + 1  # 1-based
                pos.RowPositionInTotalImagePixelMatrix = r * tile + 1
                pos.XOffsetInSlideCoordinateSystem, pos.YOffsetInSlideCoordinateSystem = 20.0, 40.0
                pos.ZOffsetInSlideCoordinateSystem = 0.0
                item = Dataset()
                item.PlanePositionSlideSequence = Sequence([pos])
                items.append(item)
            ds.PerFrameFunctionalGroupsSequence = Sequence(items)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImageType = (["DERIVED", "PRIMARY", "LABEL", "NONE"] if k == levels else
                        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if k == 0 else
                        ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
        ds.Rows = ds.Columns = tile
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = W, H
        ds.NumberOfFrames = len(order)
        sp = f"{mpp * base.shape[1] / W / 1000:.8g}"  # mm
        ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [sp, sp]
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = base.shape[1] * mpp / 1000, base.shape[0] * mpp / 1000
        ds.PixelData = b"".join(tiles[r, c].tobytes() for r, c in order)
        if rle:
            ds.compress(RLELossless)
        path = folder / (f"{name}_label.dcm" if k == levels else f"{name}_level{k}.dcm")
        ds.save_as(path, enforce_file_format=True)
        if k < levels:
            paths.append(path)
            arrs.append(a)
    return paths, arrs


def region(arr: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """What read_region should return from a level array: the crop, white beyond its edge."""
    out = np.full((h, w, 3), 255, np.uint8)
    src = arr[y:y + h, x:x + w]
    out[:src.shape[0], :src.shape[1]] = src
    return out


# ------------------------------------------------------------------ tissue


def test_otsu_threshold_separates_two_modes():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.1, 0.03, 5000), rng.normal(0.6, 0.05, 3000)])
    t = wsi.otsu_threshold(v)
    assert 0.15 < t < 0.45  # anywhere in the gap maximises the between-class variance
    assert abs((v > t).mean() - 3000 / 8000) < 0.002
    # Overlapping modes: the threshold moves between them (the brute-force optimum over 256 bins).
    v = np.concatenate([rng.normal(0.3, 0.1, 4000), rng.normal(0.6, 0.1, 4000)])
    t = wsi.otsu_threshold(v)
    cand = np.linspace(v.min(), v.max(), 257)[1:-1]
    between = [(v <= c).mean() * (v > c).mean() * (v[v <= c].mean() - v[v > c].mean()) ** 2 for c in cand]
    assert abs(t - cand[int(np.argmax(between))]) < 2 * (v.max() - v.min()) / 256
    assert 0.4 < t < 0.5


def test_tissue_detection_on_real_he_tiles(shared_data):
    from PIL import Image

    d = shared_data / "pathology" / "he_tiles"

    def frac(name, **kw):
        return wsi.detect_tissue(np.asarray(Image.open(d / name).convert("RGB")), **kw)[0].mean()

    for name in ("tissue-level0-7352-11762-7864-12274.png", "medium-nuclei-score-level2.png",
                 "tcga-lung-rgb_thumbnail.png"):
        assert frac(name) > 0.6, name
    for name in ("no-tissue.png", "almost-white-1.png"):
        assert frac(name) < 0.001, name
    # Red pen ink is saturated like tissue; the pen filter removes most of it.
    assert frac("no-tissue-red-pen.png") < 0.6 * frac("no-tissue-red-pen.png", remove_pen=False)


def test_a_field_that_is_all_tissue_gives_a_full_mask(shared_data, tmp_path):
    from PIL import Image

    # Uniform pink: Otsu's threshold is the one value, so nothing passed it; noisy pink: Otsu split it in half.
    pink = np.zeros((64, 64, 3), np.uint8) + np.array([222, 140, 186], np.uint8)
    rng = np.random.default_rng(0)
    noisy = np.clip(pink + rng.integers(-18, 19, pink.shape), 0, 255).astype(np.uint8)
    for img in (pink, noisy):
        mask, thr = wsi.detect_tissue(img)
        assert mask.all() and thr == wsi.MIN_SATURATION
    # Pink with 8% nuclei (whose synthetic purple falls in the blue-pen colour box at full resolution).
    mask, thr = wsi.detect_tissue(slide_array(200, 150, (0, 0, 200, 150)), remove_pen=False)
    assert mask.all() and thr == wsi.MIN_SATURATION
    # Real H&E crops with no glass: Otsu alone kept 74% and 85% of them (pale stroma counted as background).
    d = shared_data / "pathology" / "he_tiles"
    for name, box in (("tissue-level0-7352-11762-7864-12274.png", (0, 0, 256, 256)),
                      ("medium-nuclei-score-level2.png", (50, 50, 250, 250))):
        crop = np.asarray(Image.open(d / name).convert("RGB").crop(box))
        assert wsi.detect_tissue(crop)[0].mean() > 0.97, name
        assert wsi.tissue_threshold(wsi.saturation(crop))[1] == "floor-all-tissue"
    # The floor does not turn glass into tissue: blank fields stay empty, fields with glass keep Otsu.
    glass = np.full((64, 64, 3), 236, np.uint8)
    assert not wsi.detect_tissue(glass)[0].any() and wsi.tissue_threshold(wsi.saturation(glass))[1] == "floor"
    whole = np.asarray(Image.open(d / "tissue-level0-7352-11762-7864-12274.png").convert("RGB"))
    assert wsi.tissue_threshold(wsi.saturation(whole))[1] == "otsu"
    assert wsi.tissue_threshold(np.array([]))[1] == "floor"
    # A slide that is all tissue: every grid tile is kept, and the coords JSON says how the mask was made.
    write_pyramid(tmp_path / "all.tif", slide_array(1024, 768, (0, 0, 1024, 768)))
    with wsi.open_slide(tmp_path / "all.tif") as s:
        tm = wsi.tissue_mask(s, mask_mpp=4.0)
        assert tm.fraction == 1.0 and tm.method == "floor-all-tissue"
        grid = wsi.tile_grid(s, wsi.select_level(s, 0.5, 64), tm, min_tissue=0.9)
        assert len(grid) == grid.grid[0] * grid.grid[1] == 8 * 6
        wsi.save_coords(tmp_path / "c" / "all", s, grid, tm)
        assert wsi.load_coords(tmp_path / "c" / "all")[2]["tissue_mask"]["method"] == "saturation-floor-all-tissue"


# ------------------------------------------------------------------ reading and resolution


def test_pyramidal_tiff_levels_mpp_and_level_choice(pyramid):
    path, arrs = pyramid
    with wsi.open_slide(path) as s:
        assert s.backend == "tifffile"
        assert s.dimensions == [(W0, H0), (W0 // 2, H0 // 2), (W0 // 4, H0 // 4)]
        assert s.downsamples == [1.0, 2.0, 4.0]
        assert s.mpp == pytest.approx(BASE_MPP) and "Resolution" in s.mpp_source
        c = wsi.select_level(s, 0.5, 224)
        assert (c.level, c.read_size, c.tile0, c.effective_mpp) == (1, 224, 448.0, 0.5)
        c = wsi.select_level(s, 1.0, 224)
        assert (c.level, c.read_size) == (2, 224)
        c = wsi.select_level(s, 0.7, 224)  # between levels: read the finer one and downsample
        assert (c.level, c.read_size) == (1, 314) and c.effective_mpp == pytest.approx(0.5 * 314 / 224)
        assert wsi.select_level(s, 0.26, 224).level == 0  # within 10% of the scan: no resampling claim
        with pytest.raises(SlideError, match="finer than the scan"):
            wsi.select_level(s, 0.2, 224)
        # Pixels come back exactly as written, at every level, in level-0 coordinates.
        for lv in range(3):
            got = s.read_region((1000, 600), lv, (300, 200))
            y, x = 600 // 2**lv, 1000 // 2**lv
            assert np.array_equal(got, arrs[lv][y:y + 200, x:x + 300]), lv
        # Outside the image is white glass, not black.
        assert (s.read_region((W0 - 10, H0 - 10), 0, (40, 40))[20:, 20:] == 255).all()


def test_missing_mpp_is_a_clear_error(tmp_path, shared_data):
    write_pyramid(tmp_path / "nompp.tif", slide_array(1024, 768, (256, 256, 768, 512)), mpp=None)
    with wsi.open_slide(tmp_path / "nompp.tif") as s:
        assert s.mpp is None
        with pytest.raises(SlideError, match="--slide-mpp") as e:
            wsi.select_level(s, 0.5, 224)
        assert "nompp.tif" in str(e.value)
    with wsi.open_slide(tmp_path / "nompp.tif", slide_mpp=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source.startswith("user")
        assert wsi.select_level(s, 0.5, 224).level == 1
    tcga = shared_data / "pathology" / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"
    with wsi.open_slide(tcga) as s:  # a real Aperio slide whose metadata has no MPP
        assert s.backend == "openslide" and s.mpp is None
        with pytest.raises(SlideError, match="no microns-per-pixel"):
            wsi.select_level(s, 0.5, 224)


def test_openslide_and_tifffile_agree_and_subifd_pyramids(tmp_path, pyramid):
    path, _ = pyramid
    with wsi.open_slide(path, backend="openslide") as a, wsi.open_slide(path, backend="tifffile") as b:
        assert a.dimensions == b.dimensions and a.mpp == pytest.approx(b.mpp)
        for lv in range(3):  # at level-aligned positions (OpenSlide interpolates sub-pixel offsets; tifffile floors)
            assert np.array_equal(a.read_region((776, 552), lv, (200, 150)), b.read_region((776, 552), lv, (200, 150)))
    # A SubIFD pyramid: OpenSlide sees one level; auto picks tifffile, which sees all three.
    arrs = write_pyramid(tmp_path / "sub.tif", slide_array(1024, 768, (256, 256, 768, 512)), subifds=True)
    with wsi.open_slide(tmp_path / "sub.tif", backend="openslide") as a:
        assert a.level_count == 1
    with wsi.open_slide(tmp_path / "sub.tif") as b:
        assert b.backend == "tifffile" and b.level_count == 3
        want = arrs[2][50 // 4:50 // 4 + 32, 100 // 4:100 // 4 + 64]
        assert np.array_equal(b.read_region((100, 50), 2, (64, 32)), want)


def test_plain_stripped_tiff(tmp_path):
    import tifffile

    img = slide_array(900, 700, (300, 200, 600, 500))
    tifffile.imwrite(tmp_path / "plain.tiff", img, photometric="rgb", rowsperstrip=37,
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with wsi.open_slide(tmp_path / "plain.tiff") as s:
        assert s.backend == "tifffile" and s.level_count == 1 and s.mpp == pytest.approx(0.5)
        assert np.array_equal(s.read_region((123, 45), 0, (400, 300)), img[45:345, 123:523])


# ------------------------------------------------------------------ tissue and grid


def test_tiles_fall_inside_tissue_and_count_matches_grid(pyramid, tmp_path):
    path, arrs = pyramid
    with wsi.open_slide(path) as s:
        choice = wsi.select_level(s, 0.5, 224)
        tm = wsi.tissue_mask(s, mask_mpp=8.0)
        assert tm.downsample == pytest.approx(32.0)
        area = (TISSUE[2] - TISSUE[0]) * (TISSUE[3] - TISSUE[1]) / (W0 * H0)
        assert tm.fraction == pytest.approx(area, abs=0.01)
        grid = wsi.tile_grid(s, choice, tm, min_tissue=0.5)
        assert grid.grid == (W0 // TILE0, H0 // TILE0) == (9, 6)
        assert {tuple(c) for c in grid.coords.tolist()} == expected_tiles()
        assert len(grid) == 12 and (grid.tissue > 0.95).all()
        x0, y0, x1, y1 = TISSUE
        for x, y in grid.coords:
            assert x0 <= x and x + TILE0 <= x1 and y0 <= y and y + TILE0 <= y1
            tile = wsi.read_tile(s, choice, int(x), int(y))
            assert np.array_equal(tile, arrs[1][y // 2:y // 2 + 224, x // 2:x // 2 + 224])
        # Without a mask every full grid tile is kept; with min_tissue=0 too.
        assert len(wsi.tile_grid(s, choice, None)) == 54
        assert len(wsi.tile_grid(s, choice, tm, min_tissue=0.0)) == 54
        stem = tmp_path / "coords" / "synthetic"
        wsi.save_coords(stem, s, grid, tm)
        coords, tissue, meta = wsi.load_coords(stem)
        assert np.array_equal(coords, grid.coords) and meta["level_choice"]["level"] == 1 and meta["tiles"] == 12


def test_real_svs_slides(shared_data, tmp_path):
    d = shared_data / "pathology" / "wsi"
    with wsi.open_slide(d / "CMU-1-Small-Region.svs") as s:
        assert s.backend == "openslide" and s.mpp == pytest.approx(0.499)
        c = wsi.select_level(s, 0.5, 224)
        assert (c.level, c.read_size) == (0, 224)
        tm = wsi.tissue_mask(s)
        grid = wsi.tile_grid(s, c, tm, 0.5)
        assert grid.grid == (9, 13) and 20 <= len(grid) < 9 * 13
        everything = wsi.tile_grid(s, c, tm, 0.0)
        kept = {tuple(v) for v in grid.coords.tolist()}
        rejected = [tuple(v) for v in everything.coords.tolist() if tuple(v) not in kept]
        sat = [wsi.saturation(wsi.read_tile(s, c, x, y)).mean() for x, y in kept]
        sat_bg = [wsi.saturation(wsi.read_tile(s, c, x, y)).mean() for x, y in rejected]
        assert np.median(sat) > 2 * np.median(sat_bg)  # kept tiles are stained tissue, the rest mostly glass
    with wsi.open_slide(d / "tcga-cr-7395-01a-01-ts1.svs", slide_mpp=0.25) as s:
        c = wsi.select_level(s, 0.5, 224)  # level 1 is 2.0005x: 0.50013 µm/px
        assert (c.level, c.read_size) == (1, 224)
        grid = wsi.tile_grid(s, c, wsi.tissue_mask(s), 0.5)
        assert len(grid) > 10
        assert wsi.read_tile(s, c, *map(int, grid.coords[0])).shape == (224, 224, 3)


def test_dicom_slide_microscopy_file_both_readers(shared_data, tmp_path):
    import pydicom

    path = shared_data / "pathology" / "wsi" / "sm_image.dcm"
    frames = pydicom.dcmread(path).pixel_array  # (25, 10, 10, 3): TILED_FULL, row-major 5x5 tiles
    want = frames.reshape(5, 5, 10, 10, 3).transpose(0, 2, 1, 3, 4).reshape(50, 50, 3)
    with wsi.open_slide(path) as a, wsi.open_slide(path, backend="dicom") as b:
        assert a.backend == "openslide" and b.backend == "dicom"  # OpenSlide 4 reads a single .dcm itself
        for s in (a, b):
            assert s.dimensions == [(50, 50)] and s.mpp == pytest.approx(0.499)
            assert np.array_equal(s.read_region((0, 0), 0, (50, 50)), want)
            assert (s.read_region((40, 40), 0, (20, 20))[10:, 10:] == 255).all()  # beyond the matrix: white
        assert a.mpp_source == "openslide.mpp-x/mpp-y" and b.mpp_source == "DICOM PixelSpacing"
        assert np.array_equal(a.read_region((13, 7), 0, (30, 21)), b.read_region((13, 7), 0, (30, 21)))
    (tmp_path / "no_suffix").write_bytes(path.read_bytes())  # DICOM is known by its DICM magic too
    for backend in ("auto", "dicom"):
        with wsi.open_slide(tmp_path / "no_suffix", backend=backend) as s:
            assert np.array_equal(s.read_region((0, 0), 0, (50, 50)), want)


@pytest.mark.parametrize("sparse", [False, True])
def test_dicom_pyramid_levels_mpp_and_pixels(tmp_path, sparse):
    base = slide_array(400, 300, (100, 60, 300, 240))
    paths, arrs = write_dicom_pyramid(tmp_path, "pyr", base, 0.25, levels=3, sparse=sparse, skip_glass=sparse)
    for backend in ("openslide", "dicom"):
        with wsi.open_slide(paths[1], backend=backend) as s:  # any level opens the whole series
            assert s.dimensions == [(400, 300), (200, 150), (100, 75)] and s.downsamples == [1.0, 2.0, 4.0]
            assert s.mpp == pytest.approx(0.25) and s.level_mpp(2) == pytest.approx(1.0)
            assert wsi.select_level(s, 0.5, 32).level == 1
            for lv in range(3):
                got = s.read_region((8, 12), lv, (120, 100))
                want = region(arrs[lv], 8 // 2**lv, 12 // 2**lv, 120, 100)
                if sparse:  # tiles left out of a sparse image are unscanned: white, not the glass that was there
                    kept = (want != 255).any(-1) & (got != 255).any(-1)
                    assert np.array_equal(got[kept], want[kept]) and kept.mean() > 0.3
                    assert ((got == 255).all(-1) | kept).all()
                else:
                    assert np.array_equal(got, want), (backend, lv)


def test_dicom_openslide_cannot_read_falls_back_to_highdicom(tmp_path):
    paths, arrs = write_dicom_pyramid(tmp_path, "rle", slide_array(256, 192, (64, 64, 192, 128)), 0.5, rle=True)
    with pytest.raises(SlideError, match="transfer syntax"):
        wsi.open_slide(paths[0], backend="openslide")
    with wsi.open_slide(paths[0]) as s:
        assert s.backend == "dicom" and "transfer syntax" in s.properties["medmm.openslide_error"]
        assert s.mpp == pytest.approx(0.5) and s.level_count == 2
        assert np.array_equal(s.read_region((0, 0), 0, (256, 192)), arrs[0])
        assert np.array_equal(s.read_region((64, 32), 1, (50, 40)), arrs[1][16:56, 32:82])


def test_non_slide_dicom_files_raise_slide_error(shared_data, tmp_path):
    hd = shared_data / "dicom" / "highdicom"
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all" * 20)
    write_dicom_pyramid(tmp_path, "withlabel", slide_array(128, 128, (32, 32, 96, 96)), 0.5, label=True)
    cases = {hd / "ct_image.dcm": "CT Image Storage", hd / "sm_annotations.dcm": "Bulk Simple Annotations",
             tmp_path / "junk.dcm": "not a DICOM file", tmp_path / "withlabel_label.dcm": "LABEL image"}
    for path, why in cases.items():
        for backend in ("auto", "dicom", "openslide"):
            with pytest.raises(SlideError, match=why) as e:
                wsi.open_slide(path, backend=backend)
            assert e.value.to_record()["path"] == str(path)
    with pytest.raises(SlideError, match="not a DICOM file"):
        wsi.open_slide(shared_data / "pathology" / "wsi" / "CMU-1-Small-Region.svs", backend="dicom")
    with pytest.raises(SlideError, match="a DICOM slide"):
        wsi.open_slide(SM_IMAGE, backend="tifffile")
    with pytest.raises(ValueError, match="unknown slide backend"):
        wsi.open_slide(SM_IMAGE, backend="pydicom")
    # One file per series stands for the slide; the label travels with it; non-slides stay, to fail on opening.
    files = sorted(tmp_path.glob("*.dcm")) + [hd / "ct_image.dcm"]
    names = sorted(p.name for p in wsi.group_dicom_slides(files))
    assert names == ["ct_image.dcm", "junk.dcm", "withlabel_level0.dcm"]


def test_broken_and_truncated_slides_raise_slide_error(shared_data, tmp_path, pyramid):
    broken = shared_data / "pathology" / "broken" / "broken.svs"
    with pytest.raises(SlideError) as e:
        wsi.open_slide(broken)
    assert e.value.to_record()["path"] == str(broken)
    cmu = (shared_data / "pathology" / "wsi" / "CMU-1-Small-Region.svs").read_bytes()
    (tmp_path / "cut.svs").write_bytes(cmu[: len(cmu) * 6 // 10])
    with pytest.raises(SlideError, match="cut.svs"):
        wsi.open_slide(tmp_path / "cut.svs")
    data = pyramid[0].read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated|corrupt"):
        with wsi.open_slide(tmp_path / "cut.tif") as s:
            s.read_downsampled(16)
    with pytest.raises(SlideError, match="not found"):
        wsi.open_slide(tmp_path / "missing.svs")


# ------------------------------------------------------------------ prepare wsi


def corrupt_level(path: Path, level: int, tiles: slice) -> None:
    """Overwrite the bytes of some tiles of ``level`` (its header stays valid): the slide breaks half-way."""
    import tifffile

    with tifffile.TiffFile(path) as t:
        page = t.series[0].levels[level].keyframe
        spans = list(zip(page.dataoffsets, page.databytecounts))[tiles]
    with open(path, "r+b") as f:
        for off, n in spans:
            f.seek(off)
            f.write(b"\x00" * n)


@pytest.fixture
def slide_folder(tmp_path, shared_data, pyramid):
    src = tmp_path / "slides"
    src.mkdir()
    wsi_dir = shared_data / "pathology" / "wsi"
    (src / "CMU-1-Small-Region.svs").symlink_to(wsi_dir / "CMU-1-Small-Region.svs")
    (src / "synthetic.tif").symlink_to(pyramid[0])
    (src / "broken.svs").symlink_to(shared_data / "pathology" / "broken" / "broken.svs")
    cmu = (wsi_dir / "CMU-1-Small-Region.svs").read_bytes()
    (src / "truncated.svs").write_bytes(cmu[: len(cmu) // 2])
    # JPEG pyramid whose level-1 tiles (read for tiles at 0.5 µm) are zeroed in the lower half only:
    # planning (level 2) succeeds, the first tiles read fine, then the slide breaks.
    write_pyramid(src / "breaks_midway.tif", slide_array(2048, 1536, (0, 0, 2048, 1536), seed=1), compression="jpeg")
    corrupt_level(src / "breaks_midway.tif", 1, slice(8, 12))
    (tmp_path / "labels.csv").write_text("slide,label\nCMU-1-Small-Region.svs,tumor\nsynthetic.tif,normal\n"
                                         "not_here.svs,normal\n")
    return src, tmp_path / "labels.csv"


def shard_samples(out: Path) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as t:
            for m in t:
                key, ext = m.name.split(".", 1)
                assert (key, ext) not in {(k, e) for k in samples for e in samples[k]}, f"duplicate {m.name}"
                samples.setdefault(key, {})[ext] = t.extractfile(m).read()
    return samples


def test_prepare_wsi_shards_errors_and_resume(slide_folder, tmp_path):
    from medmm.prepare.wsi import prepare_wsi

    src, labels = slide_folder
    out = tmp_path / "out"
    m = prepare_wsi(src, out, mpp=0.5, tile=224, labels=labels, shard_maxcount=20, chunk=2, progress=False)

    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert {Path(e["path"]).name for e in errors} == {"broken.svs", "truncated.svs", "breaks_midway.tif"}
    assert all(e["error"] == "SlideError" and e["message"] for e in errors)
    assert m["counts"]["slides"] == 5 and m["counts"]["slides_ok"] == 2 and m["counts"]["slides_failed"] == 3
    assert m["labels_unmatched"] == ["not_here"]
    assert m["slides"]["synthetic"]["tiles"] == 12 and m["slides"]["synthetic"]["level"] == 1
    n_cmu = m["slides"]["CMU-1-Small-Region"]["tiles"]
    assert m["counts"]["tiles"] == 12 + n_cmu

    samples = shard_samples(out)
    assert len(samples) == 12 + n_cmu
    assert not any(k.startswith(("breaks_midway", "broken", "truncated")) for k in samples)  # nothing half-written
    assert m["shards"] == [p.name for p in sorted(out.glob("shard-*.tar"))] and len(m["shards"]) == 3
    syn = {k: json.loads(v["json"]) for k, v in samples.items() if k.startswith("synthetic__")}
    assert {(j["x"], j["y"]) for j in syn.values()} == expected_tiles()
    assert all(j["label"] == "normal" and j["level"] == 1 and j["mpp"] == 0.5 for j in syn.values())
    coords, _, _ = wsi.load_coords(out / "coords" / "CMU-1-Small-Region")
    cmu = {k: json.loads(v["json"]) for k, v in samples.items() if k.startswith("CMU")}
    assert sorted((j["x"], j["y"]) for j in cmu.values()) == sorted(map(tuple, coords.tolist()))
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(next(iter(samples.values()))["jpg"])).size == (224, 224)

    # The shards read back through webdataset itself.
    import webdataset as wds

    ds = wds.WebDataset([str(out / s) for s in m["shards"]], shardshuffle=False).decode("rgb8").to_tuple("jpg", "json")
    assert sum(1 for _ in ds) == len(samples)

    # Resume: the last shard was written but its commit never logged (a crash while closing it).
    lines = (out / "progress.jsonl").read_text().splitlines()
    (out / "progress.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    (out / "manifest.json").unlink()
    m2 = prepare_wsi(src, out, mpp=0.5, tile=224, labels=labels, shard_maxcount=20, chunk=2, progress=False)
    assert shard_samples(out).keys() == samples.keys()  # re-written once, no duplicates, nothing lost
    assert m2["counts"]["tiles"] == m["counts"]["tiles"] and len(m2["shards"]) == 3
    m3 = prepare_wsi(src, out, mpp=0.5, tile=224, labels=labels, shard_maxcount=20, chunk=2, progress=False)
    assert m3["shards"] == m2["shards"] and shard_samples(out).keys() == samples.keys()  # all committed: no-op
    with pytest.raises(InvalidInputError, match="other settings"):
        prepare_wsi(src, out, mpp=1.0, progress=False)


@pytest.mark.slow
def test_cli_prepare_wsi_with_workers_matches_single_process(slide_folder, tmp_path, capsys):
    from medmm.cli import main

    src, _ = slide_folder
    for f in ("broken.svs", "truncated.svs", "breaks_midway.tif"):
        (src / f).unlink()
    main(["prepare", "wsi", str(src), "--out", str(tmp_path / "w0"), "--no-progress"])
    main(["prepare", "wsi", str(src), "--out", str(tmp_path / "w2"), "--workers", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert printed.count('"slides_ok": 2') == 2
    a, b = shard_samples(tmp_path / "w0"), shard_samples(tmp_path / "w2")
    assert a.keys() == b.keys() and len(a) > 12
    assert all(a[k]["jpg"] == b[k]["jpg"] and a[k]["json"] == b[k]["json"] for k in a)
    m = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert m["timing"]["workers"] == 2 and (tmp_path / "w2" / "errors.jsonl").read_text() == ""


@pytest.mark.slow
def test_cli_prepare_wsi_dicom_folder(shared_data, tmp_path, capsys):
    from PIL import Image

    from medmm.cli import main

    src = tmp_path / "dicom"
    src.mkdir()
    for f in ("sm_image.dcm", "sm_annotations.dcm"):
        (src / f).write_bytes((shared_data / "pathology" / "wsi" / f).read_bytes())
    (src / "ct_image.dcm").write_bytes((shared_data / "dicom" / "highdicom" / "ct_image.dcm").read_bytes())
    (src / "junk.dcm").write_bytes(b"\x00" * 300)
    # A two-level pyramid (+ label) with known tissue, and an RLE copy only the highdicom reader reads.
    # Tissue aligned to the 0.5 µm grid of 32 px tiles (64 level-0 px): columns 2-5, rows 2-4 -> 12 tiles.
    base = slide_array(512, 384, (128, 128, 384, 320), seed=3)
    _, arrs = write_dicom_pyramid(src / "pyr", "pyr", base, 0.25, label=True)
    write_dicom_pyramid(src / "rle", "rle", base, 0.25, rle=True)

    def run(out, *extra, folder=src):
        main(["prepare", "wsi", str(folder), "--out", str(out), "--mpp", "0.5", "--format", "png", "--no-progress",
              *extra])
        m = json.loads((out / "manifest.json").read_text())
        errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
        return m, errors, shard_samples(out)

    m, errors, samples = run(tmp_path / "a", "--tile", "32", "--mask-mpp", "2")
    assert {Path(e["path"]).name: e["error"] for e in errors} == {
        "sm_annotations.dcm": "SlideError", "ct_image.dcm": "SlideError", "junk.dcm": "SlideError"}
    assert m["counts"]["slides"] == 6 and m["counts"]["slides_failed"] == 3  # label + level 1 are not slides
    for sid, backend in (("pyr_level0", "openslide"), ("rle_level0", "dicom")):
        e = m["slides"][sid]
        assert (e["status"], e["backend"], e["tiles"], e["level"]) == ("ok", backend, 12, 1)
        assert e["slide_mpp"] == pytest.approx(0.25)
        tiles = {k: v for k, v in samples.items() if k.startswith(sid + "__")}
        assert len(tiles) == 12
        for v in tiles.values():
            j = json.loads(v["json"])
            assert 128 <= j["x"] < 384 and 128 <= j["y"] < 320 and j["tile_size"] == 32
            img = np.asarray(Image.open(BytesIO(v["png"])).convert("RGB"))
            assert np.array_equal(img, arrs[1][j["y"] // 2:j["y"] // 2 + 32, j["x"] // 2:j["x"] // 2 + 32])
    assert m["slides"]["sm_image"]["status"] == "no_tissue"  # the real file is (nearly) blank glass
    printed = capsys.readouterr().out
    assert '"slides_ok": 2' in printed and '"slides_no_tissue": 1' in printed
    # --backend dicom reads the same tiles OpenSlide read.
    m2, errors2, samples2 = run(tmp_path / "c", "--tile", "32", "--mask-mpp", "2", "--backend", "dicom",
                                folder=src / "pyr")
    assert m2["slides"]["pyr_level0"]["backend"] == "dicom" and not errors2
    assert samples2 == {k: v for k, v in samples.items() if k.startswith("pyr_level0__")}

    # The tiny real slide (50x50 px) through tiling: 10 px tiles, every tile kept.
    m, _, samples = run(tmp_path / "b", "--tile", "10", "--min-tissue", "0")
    e = m["slides"]["sm_image"]
    assert (e["status"], e["tiles"], e["grid"], e["backend"]) == ("ok", 25, [5, 5], "openslide")
    assert e["slide_mpp"] == pytest.approx(0.499) and e["mpp_source"] == "openslide.mpp-x/mpp-y"
    sm = {k: v for k, v in samples.items() if k.startswith("sm_image__")}
    assert len(sm) == 25 and all(Image.open(BytesIO(v["png"])).size == (10, 10) for v in sm.values())
    coords, _, meta = wsi.load_coords(tmp_path / "b" / "coords" / "sm_image")
    assert sorted(map(tuple, coords.tolist())) == [(x, y) for x in range(0, 50, 10) for y in range(0, 50, 10)]
    assert meta["slide"]["mpp"] == pytest.approx(0.499)


@pytest.mark.slow
def test_heatmap_png(shared_data, tmp_path):
    from PIL import Image

    from medmm.inference.heatmap import render_slide_heatmap

    path = shared_data / "pathology" / "wsi" / "CMU-1-Small-Region.svs"
    with wsi.open_slide(path) as s:
        c = wsi.select_level(s, 0.5, 224)
        grid = wsi.tile_grid(s, c, wsi.tissue_mask(s), 0.5)
    scores = np.linspace(0, 1, len(grid))
    info = render_slide_heatmap(path, grid.coords, c.tile0, scores, tmp_path / "h.png")
    img = np.asarray(Image.open(tmp_path / "h.png").convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert info["tiles"] == len(grid) and info["top_tiles"][0]["attention"] == pytest.approx(1.0)
    assert tuple(grid.coords[-1]) == (info["top_tiles"][0]["x"], info["top_tiles"][0]["y"])
    # The right half carries the colour map (jet reds and blues the left half does not have).
    right, left = img[:, img.shape[1] // 2:], img[:, : img.shape[1] // 2]
    blue = lambda a: ((a[..., 2] > 150) & (a[..., 0] < 100)).mean()  # noqa: E731
    assert blue(right) > 10 * max(blue(left), 1e-4)
