import io

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.images.data import scan
from pipeline.images.decode import decode
from pipeline.images.preprocess import Preprocess

from .conftest import make_folder, make_image

PRE = Preprocess(resize=40, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("fmt,mode", [("PNG", "L"), ("PNG", "P"), ("PNG", "RGBA"), ("JPEG", "CMYK"),
                                      ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("JPEG", "L")])
def test_every_format_and_mode_decodes_to_rgb(tmp_path, fmt, mode):
    path = _save(tmp_path / f"x.{fmt.lower()}", make_image(1, 64).convert(mode), format=fmt)
    out = decode(path, PRE)
    assert isinstance(out, np.ndarray), out
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    pixels = np.full((50, 50), 30000, dtype=np.uint16)  # about 46% grey in 16 bits
    path = _save(tmp_path / "deep.png", Image.fromarray(pixels))
    out = decode(path, PRE)
    assert abs(int(out[0, 0, 0]) - round(30000 / 65535 * 255)) <= 1


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    out = decode(_save(tmp_path / "clear.png", image), PRE)
    assert out.min() == 255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 80, 40))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display: red ends on top
    path = _save(tmp_path / "rotated.jpg", image, exif=exif, quality=95)
    out = decode(path, Preprocess(40, 40, (0.5,) * 3, (0.5,) * 3))
    top, bottom = out[:10].mean((0, 1)), out[-10:].mean((0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 40), c) for c in [(255, 0, 0), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert decode(path, PRE)[..., 0].mean() > 200


def test_large_jpeg_uses_reduced_decoding_and_still_reaches_the_target(tmp_path):
    path = _save(tmp_path / "big.jpg", make_image(3, 1600), quality=90)
    out = decode(path, Preprocess(224, 224, (0.5,) * 3, (0.5,) * 3))
    assert out.shape == (224, 224, 3)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"hello, I am text", "not an image"),
])
def test_non_images_are_reported(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    assert reason in decode(path, PRE)


def test_truncated_jpeg_is_reported(tmp_path):
    buffer = io.BytesIO()
    make_image(2, 256).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert decode(path, PRE).startswith("corrupt or truncated")


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    path = _save(tmp_path / "bomb.png", Image.new("L", (300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)
    assert decode(path, PRE).startswith("refused: decompression bomb")


def test_scan_image_folder_flat_folder_and_list(tmp_path):
    root = make_folder(tmp_path / "set", classes=2, per_class=3)
    (root / "stray.jpg").write_bytes(b"x")
    data = scan(root)
    assert data.class_names == ["class0", "class1"] and list(data.labels) == [0, 0, 0, 1, 1, 1]
    assert data.skipped == [(str(root / "stray.jpg"), "not inside a class folder")]
    flat = scan(root / "class1")
    assert len(flat.paths) == 3 and set(flat.labels) == {-1}
    listing = tmp_path / "list.txt"
    listing.write_text("# new images\nset/class0/img0.jpg\nset/missing.jpg\n")
    listed = scan(listing)
    assert listed.paths == [root / "class0" / "img0.jpg"]
    assert listed.skipped == [(str(tmp_path / "set" / "missing.jpg"), "file not found")]


def test_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        scan(tmp_path / "empty")


def test_a_file_that_changed_since_it_was_hashed_is_skipped(tmp_path):
    from pipeline.images.data import hash_file

    path = _save(tmp_path / "a.png", make_image(5, 40))
    assert isinstance(decode(path, PRE, hash_file(path)), np.ndarray)
    assert decode(path, PRE, "0" * 32).startswith("file changed during the run")
    assert decode(tmp_path / "gone.png", PRE) == "file not found"


def test_read_checked_gives_the_bytes_or_decodes_reasons(tmp_path):
    """The one read that `decode` and the GPU path share: the bytes once, or the skip reason."""
    from pipeline.images.data import content_id
    from pipeline.images.decode import read_checked

    path = _save(tmp_path / "a.png", make_image(5, 40))
    data = path.read_bytes()
    assert read_checked(str(path), content_id(data)) == data == read_checked(path)
    assert read_checked(path, "0" * 32) == "file changed during the run (rerun to pick up the new content)"
    assert read_checked(tmp_path / "gone.png") == "file not found"
    (tmp_path / "empty.png").write_bytes(b"")
    assert read_checked(tmp_path / "empty.png") == "empty file"
    assert read_checked(tmp_path).startswith("unreadable file: ")  # a folder: IsADirectoryError


def test_quick_files_are_hashed_in_the_calling_thread_and_slow_ones_in_threads(tmp_path, monkeypatch):
    import threading
    import time

    from pipeline.images import data
    from pipeline.images.data import hash_file, hash_files, map_files

    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(bytes([i]) * 1000)
    assert hash_files(paths) == [hash_file(p) for p in paths]
    monkeypatch.setattr(data, "QUICK_FILE_S", 0.01)  # so that a busy test machine cannot look slow
    here = threading.current_thread()

    def one(i):
        if i == 10:
            time.sleep(0.3)  # a file that waits on a disk
        return i, threading.current_thread() is here

    assert map_files(one, range(10)) == [(i, True) for i in range(10)]
    result = map_files(one, range(40))
    assert [i for i, _ in result] == list(range(40))
    assert all(in_caller for _, in_caller in result[:11]) and not any(in_caller for _, in_caller in result[11:])
