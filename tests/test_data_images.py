"""Image and mask files: modes, and clear errors naming the file."""

import numpy as np
import pytest
from PIL import Image

from anomax.data.images import read_image, read_mask, read_pair
from anomax.errors import DatasetError


def test_modes(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], -1)).save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert np.array_equal(read_image(tmp_path / "gray.png"), gray[..., None])
    assert np.array_equal(read_image(tmp_path / "rgba.png"), np.stack([gray] * 3, -1))
    assert np.array_equal(read_image(tmp_path / "deep.png"), gray[..., None])
    # an opaque alpha channel is not a defect; every pixel > 0 of a colour channel is
    assert np.array_equal(read_mask(tmp_path / "rgba.png"), gray > 0)
    assert read_mask(tmp_path / "gray.png").dtype == bool


def test_masks_count_stored_values_not_their_drawn_colours(tmp_path):
    """A label array saved as a palette image (index 1 drawn black, or index 0 drawn white) keeps its
    indices; a transparent background is no defect whatever colour it holds."""
    indices = np.zeros((4, 4), np.uint8)
    indices[0, 0] = 1
    Image.fromarray(indices, "P").save(tmp_path / "palette.png")  # one palette entry: every index drawn black
    white_background = Image.fromarray(indices, "P")
    white_background.putpalette([255, 255, 255, 255, 0, 0])
    white_background.save(tmp_path / "white0.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255  # white, but transparent
    rgba[0, 0] = (255, 0, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "transparent.png")
    # a drawn black-and-white mask converted to a palette: PIL puts white at index 0
    drawn = Image.fromarray(np.where(indices > 0, 255, 0).astype(np.uint8)).convert("RGB")
    drawn.save(tmp_path / "drawn.gif")
    drawn.quantize(2).save(tmp_path / "quantized.png")
    assert Image.open(tmp_path / "drawn.gif").getpalette()[:3] == [255, 255, 255]
    for name in ("palette.png", "white0.png", "transparent.png", "drawn.gif", "quantized.png"):
        assert np.array_equal(read_mask(tmp_path / name), indices > 0), name


def test_float_images_are_refused_naming_the_file(tmp_path):
    Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)).save(tmp_path / "float.tif")
    with pytest.raises(DatasetError, match="float.tif holds 32-bit float pixels"):
        read_image(tmp_path / "float.tif")


def test_bad_files_are_named(tmp_path):
    with pytest.raises(DatasetError, match="missing.png does not exist"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("this is not an image")
    with pytest.raises(DatasetError, match="cannot read image file .*text.png"):
        read_image(tmp_path / "text.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:2000])
    with pytest.raises(DatasetError, match="cannot read image file .*cut.png"):
        read_image(tmp_path / "cut.png")


def test_mask_size_must_match_image(tmp_path):
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(DatasetError, match=r"mask .*mask.png has size 5x4 but its image .*image.png has 6x4"):
        read_pair(tmp_path / "image.png", tmp_path / "mask.png")
    image, mask = read_pair(tmp_path / "image.png", None)
    assert image.shape == (4, 6, 1) and mask.shape == (4, 6) and not mask.any()


def bomb_png(path, side=14000):
    """A 1-bit PNG of side x side zeros: about 24 KB on disk, side² pixels once decoded."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(bytes((side + 7) // 8 + 1) * side, 9)  # each row: filter byte 0, then packed bits
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns, then anomax refuses
def test_decompression_bomb_is_refused_naming_the_file(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    with pytest.raises(DatasetError, match=r"bomb.png has 14000x14000 = 196,000,000 pixels.*ANOMAX_MAX_IMAGE_PIXELS"):
        read_image(bomb)


def test_pixel_limit_can_be_raised_and_lowered(tmp_path, monkeypatch):
    import anomax.data.images as images

    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "small.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 599)
    with pytest.raises(DatasetError, match=r"small.png has 30x20 = 600 pixels, more than the limit of 599"):
        read_image(tmp_path / "small.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 600)
    assert read_image(tmp_path / "small.png").shape == (20, 30, 1)
    # PIL's own guard (an error above twice its limit) is turned into the same clear error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(DatasetError, match=r"small.png .*ANOMAX_MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "small.png")
    # a limit above PIL's is honoured: PIL must not refuse what anomax allows
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10_000)
    assert read_image(tmp_path / "small.png").shape == (20, 30, 1)
    assert Image.MAX_IMAGE_PIXELS == 100  # for anomax's reads only: the application's guard is as it set it
    # a compressed TIFF checks PIL's guard again when it decodes: the raise lasts the whole read
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "small.tif", compression="tiff_lzw")
    assert read_image(tmp_path / "small.tif").shape == (20, 30, 1) and Image.MAX_IMAGE_PIXELS == 100


def test_pixel_limit_from_the_environment(tmp_path):
    import subprocess
    import sys

    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "small.png")
    script = f"from anomax.data.images import read_image; read_image({str(tmp_path / 'small.png')!r})"
    done = subprocess.run([sys.executable, "-c", script], env={**__import__("os").environ,
                          "ANOMAX_MAX_IMAGE_PIXELS": "599"}, capture_output=True, text=True)
    assert done.returncode != 0 and "more than the limit of 599" in done.stderr
    done = subprocess.run([sys.executable, "-c", "import anomax.data.images"], capture_output=True, text=True,
                          env={**__import__("os").environ, "ANOMAX_MAX_IMAGE_PIXELS": "lots"})
    assert done.returncode != 0 and "ANOMAX_MAX_IMAGE_PIXELS must be a positive integer, got 'lots'" in done.stderr


def test_dropped_alpha_is_logged_once_with_the_count(tmp_path, caplog):
    from anomax.data.images import log_conversions

    gray = np.zeros((3, 4), np.uint8)
    for name in ("a", "b", "c"):
        Image.fromarray(np.stack([gray] * 4, -1)).save(tmp_path / f"{name}.png")  # RGBA
    Image.fromarray(np.stack([gray, gray], -1), mode="LA").save(tmp_path / "d.png")
    Image.fromarray(gray).save(tmp_path / "plain.png")
    log_conversions("before")  # forget what earlier tests read
    caplog.clear()
    with caplog.at_level("INFO", logger="anomax"):
        for name in ("a", "b", "c", "d", "plain"):
            read_image(tmp_path / f"{name}.png")
        log_conversions("the test images")
        log_conversions("the test images")  # nothing new read: nothing logged
    lines = [r.getMessage() for r in caplog.records if "alpha" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("the test images: 4 images had an alpha channel")
    assert "a.png" in lines[0]


def test_listing_skips_broken_symlinks_once_with_the_count(tmp_path, caplog):
    from anomax.data.images import list_files

    (tmp_path / "good").mkdir()
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "good" / "a.png")
    (tmp_path / "good" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "good" / "gone2.png").symlink_to(tmp_path / "nowhere2.png")
    (tmp_path / "good" / "x.png").symlink_to(tmp_path / "good" / "y.png")  # a loop of two file links
    (tmp_path / "good" / "y.png").symlink_to(tmp_path / "good" / "x.png")
    (tmp_path / "good" / "again").symlink_to(tmp_path / "good")  # a folder link back to an ancestor
    (tmp_path / "linked").mkdir()
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "linked" / "b.png")
    (tmp_path / "good" / "more").symlink_to(tmp_path / "linked")  # a genuine folder link is followed
    with caplog.at_level("INFO", logger="anomax"):
        found = list_files(tmp_path / "good", {".png"})
    assert found == [tmp_path / "good" / "a.png", tmp_path / "good" / "more" / "b.png"]
    messages = sorted(r.getMessage() for r in caplog.records)
    assert len(messages) == 3, messages
    assert any("2 dangling symlinks" in m and "gone.png" in m for m in messages)
    assert any("2 symlink loops" in m for m in messages)
    assert any("1 folder reached again through a symlink" in m and "again" in m for m in messages)


def test_twelve_bit_data_in_16_bit_images_is_warned_of_and_32_bit_integers_refused(tmp_path, caplog):
    """12-bit camera data saved as 16 bits keeps 16 gray levels once read as 0..65535 → 0..255: warned
    of, once with the count; full-range 16-bit images are not. Mode I beyond 16 bits is refused."""
    from anomax.data.images import log_conversions

    twelve_bit = (np.arange(64, dtype=np.uint16) * 64).reshape(8, 8)  # 0..4032
    Image.fromarray(twelve_bit).save(tmp_path / "twelve.png")
    Image.fromarray(twelve_bit * 16).save(tmp_path / "full.png")
    log_conversions("before")
    caplog.clear()
    with caplog.at_level("WARNING", logger="anomax"):
        assert len(np.unique(read_image(tmp_path / "twelve.png"))) == 17  # what the warning is about
        read_image(tmp_path / "full.png")
        log_conversions("caching train")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("caching train: 1 16-bit image used only values below 4096") and "twelve.png" in line
    Image.fromarray(np.full((4, 4), 70000, np.int32), mode="I").save(tmp_path / "wide.tif")
    with pytest.raises(DatasetError, match=r"wide.tif holds 32-bit integer pixels \(70000..70000\)"):
        read_image(tmp_path / "wide.tif")


def test_a_cmyk_mask_marks_its_drawn_pixels(tmp_path):
    drawn = np.zeros((6, 6), np.uint8)
    drawn[1:3, 2:5] = 255
    Image.fromarray(drawn).convert("CMYK").save(tmp_path / "mask.tif")  # black is K = 255
    assert np.array_equal(read_mask(tmp_path / "mask.tif"), drawn > 0)


def test_gif_files_are_listed_and_other_suffixes_skipped_with_a_warning(tmp_path, caplog):
    from anomax.data.images import IMAGE_SUFFIXES, list_files

    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "a.gif")
    (tmp_path / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("x")
    with caplog.at_level("WARNING", logger="anomax"):
        assert list_files(tmp_path, IMAGE_SUFFIXES) == [tmp_path / "a.gif"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "skipped 2 files without an image suffix" in line and "Thumbs.db" in line
