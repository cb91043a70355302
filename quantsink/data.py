"""Calibration samples: raw PIL images or strings, split into a calibration set and a disjoint
holdout set that fidelity is measured on.

A source is "bundled" (the photographs and prose shipped in the top-level calibration/ folder,
installed as `quantsink._bundled`), a folder of images, a folder of text files, or one text
file. Everything is seeded: the same arguments give the same samples.
"""
from __future__ import annotations

import importlib.resources
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, TypeVar

from PIL import Image, ImageChops, ImageOps

from quantsink.errors import CalibrationDataError, UserError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

logger = logging.getLogger(__name__)

T = TypeVar("T")

BUNDLED = "bundled"
MODALITIES = ("image", "text")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
TEXT_SUFFIXES = frozenset({".txt", ".md"})

# Larger than any model input quantsink handles (SigLIP 384-512, DINOv2 518), small enough that
# a hundred camera photos fit in memory.
MAX_SHORT_SIDE = 768
# Bundled photographs are too few for whole-image samples, so samples are random crops of them.
CROP_SCALE = (0.35, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
HOLDOUT_PHOTO_FRACTION = 0.25
# Shorter paragraphs are headings or fragments, poor stand-ins for a sentence encoder's input.
MIN_PARAGRAPH_WORDS = 8
# English prose runs at about 4-4.5 characters per token (4.3 for the bundled text with the
# all-MiniLM-L6-v2 WordPiece tokenizer); 5 makes a chunk at least seq_len tokens long, so the
# tokenizer's truncation, not the text running out, sets the length.
CHARS_PER_TOKEN = 5
_NON_SPACE = re.compile(r"\S")
_WORD_END = re.compile(r"(?<=\S)\s")


@dataclass
class Samples:
    """Raw samples for an adapter's `preprocess`: RGB PIL images or strings.

    Images carry where they came from in `image.info["source"]` (file or photograph name).
    """

    calibration: list[Any]
    holdout: list[Any]  # disjoint from calibration: other files, photographs or text positions
    description: str


def load_samples(
    data: str = BUNDLED,
    modality: str = "image",
    num_samples: int = 64,
    holdout: int = 32,
    seed: int = 0,
    seq_len: int | None = None,
) -> Samples:
    """Load `num_samples` calibration and `holdout` holdout samples of `modality` from `data`.

    For text, a sample is one paragraph when `seq_len` is None (sentence encoders), else a chunk
    of consecutive text long enough to fill `seq_len` tokens (causal LMs).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
    if num_samples < 1 or holdout < 0:
        raise UserError(
            f"asked for {num_samples} calibration and {holdout} holdout samples; "
            "use at least 1 calibration sample and 0 or more holdout samples"
        )
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"seq_len must be positive, not {seq_len}")
    rng = random.Random(seed)

    if data == BUNDLED:
        root = bundled_root()
        if not root.is_dir():
            raise CalibrationDataError(
                f"the bundled calibration data is missing (looked in {root}); reinstall quantsink "
                "or pass a folder of images or text files"
            )
        if modality == "image":
            return _bundled_crops(root / "images", num_samples, holdout, rng)
        return _text_samples([root / "text.txt"], "bundled text", num_samples, holdout, rng, seq_len)

    path = Path(data).expanduser()
    if not path.exists():
        raise CalibrationDataError(
            f"calibration data {data!r} does not exist; pass a folder of images, a text file, "
            f"a folder of text files, or {BUNDLED!r}"
        )
    images, texts = _files_by_kind(path)
    if modality == "image":
        if not images:
            _raise_missing(path, wanted="image", other="text" if texts else None)
        return _image_files(images, str(path), num_samples, holdout, rng)
    if not texts:
        _raise_missing(path, wanted="text", other="image" if images else None)
    return _text_samples(texts, str(path), num_samples, holdout, rng, seq_len)


def batched(samples: Sequence[T], batch_size: int) -> Iterator[list[T]]:
    """Consecutive batches of `batch_size` samples; the last one may be shorter."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    for start in range(0, len(samples), batch_size):
        yield list(samples[start : start + batch_size])


def bundled_root() -> Traversable:
    """The bundled calibration/ folder: package data when installed, the repo folder otherwise."""
    try:
        return importlib.resources.files("quantsink._bundled")
    except ModuleNotFoundError:  # a source checkout that was never pip-installed
        return Path(__file__).resolve().parent.parent / "calibration"


# --- sources ------------------------------------------------------------------------------
def _files_by_kind(path: Path) -> tuple[list[Path], list[Path]]:
    """Image files and text files at `path` (one file, or a folder searched recursively),
    sorted so the result does not depend on the file system's listing order."""
    if path.is_file():
        files = [path]
    else:
        # Hidden files are editor and OS litter (.DS_Store, macOS "._photo.jpg" forks).
        files = sorted(
            file
            for file in path.rglob("*")
            if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
    images = [file for file in files if file.suffix.lower() in IMAGE_SUFFIXES]
    texts = [file for file in files if file.suffix.lower() in TEXT_SUFFIXES]
    return images, texts


def _raise_missing(path: Path, wanted: str, other: str | None) -> None:
    image_kinds = " ".join(sorted(IMAGE_SUFFIXES))
    text_kinds = " ".join(sorted(TEXT_SUFFIXES))
    fix = (
        f"pass a folder of images ({image_kinds}) or {BUNDLED!r}"
        if wanted == "image"
        else f"pass a text file or a folder of text files ({text_kinds}), or {BUNDLED!r}"
    )
    if other is not None:
        raise UserError(f"{path} holds {other} files but this model takes {wanted}s; {fix}")
    raise CalibrationDataError(f"{path} holds no {wanted} files; {fix}")


def _bundled_crops(folder: Traversable, num_samples: int, holdout: int, rng: random.Random) -> Samples:
    """Seeded random crops of the bundled photographs; holdout crops come from photographs
    that no calibration crop was taken from."""
    files = sorted((file for file in folder.iterdir() if file.name.endswith(".jpg")), key=lambda f: f.name)
    photos = [photo for photo in map(_open_image, files) if photo is not None]
    if len(photos) < 2:
        raise CalibrationDataError(
            f"the bundled photographs in {folder} are missing; reinstall quantsink or pass a folder of images"
        )
    held_photos = 0
    if holdout:
        held_photos = min(len(photos) - 1, max(1, round(len(photos) * HOLDOUT_PHOTO_FRACTION)))
    # Evenly spaced picks from a list ordered colour-then-grayscale (random within each) give
    # the holdout the colour/grayscale mix of the whole set.
    rng.shuffle(photos)
    photos.sort(key=_is_grayscale)
    picks = {round(i * len(photos) / held_photos) for i in range(held_photos)}
    holdout_photos = [photo for i, photo in enumerate(photos) if i in picks]
    calibration_photos = [photo for i, photo in enumerate(photos) if i not in picks]
    rng.shuffle(calibration_photos)
    # Cycling through the photographs gives each the same share and mixes every batch.
    calibration = [
        _random_crop(calibration_photos[i % len(calibration_photos)], rng) for i in range(num_samples)
    ]
    held = [_random_crop(holdout_photos[i % len(holdout_photos)], rng) for i in range(holdout)]
    return Samples(
        calibration,
        held,
        f"bundled images ({len(photos)} photographs: {num_samples} calibration crops of "
        f"{len(calibration_photos)}, {holdout} holdout crops of the other {len(holdout_photos)})",
    )


def _image_files(
    files: list[Path], source: str, num_samples: int, holdout: int, rng: random.Random
) -> Samples:
    """Whole images, drawn at random from `files`; calibration and holdout are different files."""
    order = list(files)
    rng.shuffle(order)
    images: list[Image.Image] = []
    for file in order:
        if len(images) == num_samples + holdout:
            break
        image = _open_image(file)
        if image is not None:
            images.append(image)
    if not images:
        raise CalibrationDataError(
            f"none of the {len(files)} image files in {source} could be read; pass a folder of valid images"
        )
    n_calibration, n_holdout = _split_counts(len(images), num_samples, holdout, source, "images")
    return Samples(
        images[:n_calibration],
        images[n_calibration : n_calibration + n_holdout],
        f"{source} ({len(files)} image files: {n_calibration} calibration, {n_holdout} holdout)",
    )


def _text_samples(
    files: Sequence[Traversable],
    source: str,
    num_samples: int,
    holdout: int,
    rng: random.Random,
    seq_len: int | None,
) -> Samples:
    """Paragraphs or chunks in text order, split by position (holdout from the end, so it does
    not share neighbouring text with calibration), then drawn at random within each side."""
    paragraphs = [paragraph for file in files for paragraph in _paragraphs(file)]
    if seq_len is None:
        units = [p for p in paragraphs if len(p.split()) >= MIN_PARAGRAPH_WORDS]
        unit_name = "paragraphs"
        shortage_fix = f"paragraphs (separated by blank lines) of at least {MIN_PARAGRAPH_WORDS} words"
    else:
        chunk_chars = seq_len * CHARS_PER_TOKEN
        units = _chunks("\n\n".join(paragraphs), chunk_chars)
        unit_name = f"chunks of ~{chunk_chars} characters"
        shortage_fix = f"at least {2 * chunk_chars} characters of text"
    if not units:
        raise CalibrationDataError(
            f"{source} holds no usable text samples; pass text files with {shortage_fix}"
        )
    n_calibration, n_holdout = _split_counts(len(units), num_samples, holdout, source, unit_name)
    if n_holdout == 0:
        boundary = len(units)
    else:
        share = round(len(units) * num_samples / (num_samples + holdout))
        boundary = min(max(share, n_calibration), len(units) - n_holdout)
    return Samples(
        rng.sample(units[:boundary], n_calibration),
        rng.sample(units[boundary:], n_holdout),
        f"{source} ({len(units)} {unit_name}: {n_calibration} calibration, {n_holdout} holdout)",
    )


def _split_counts(available: int, num_samples: int, holdout: int, source: str, unit: str) -> tuple[int, int]:
    """How many calibration and holdout samples to use when `available` may fall short."""
    if available >= num_samples + holdout:
        return num_samples, holdout
    n_holdout = 0 if holdout == 0 else max(1, round(available * holdout / (num_samples + holdout)))
    n_calibration = available - n_holdout
    if n_calibration < 1:
        raise CalibrationDataError(
            f"{source} gives only {available} {unit}, too few for both calibration and holdout; add more data"
        )
    logger.warning(
        "%s gives %d %s, fewer than the %d calibration + %d holdout asked for; using %d + %d",
        source, available, unit, num_samples, holdout, n_calibration, n_holdout,
    )
    return n_calibration, n_holdout


# --- reading ------------------------------------------------------------------------------
def _open_image(file: Traversable) -> Image.Image | None:
    """An RGB image upright as its EXIF says, or None (with a warning) when it cannot be read."""
    try:
        with file.open("rb") as handle:
            image = Image.open(handle)
            # JPEG decodes at 1/2, 1/4 or 1/8 scale for free while staying at least this large.
            image.draft("RGB", (MAX_SHORT_SIDE, MAX_SHORT_SIDE))
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        logger.warning("skipping unreadable image %s: %s", file, error)
        return None
    scale = MAX_SHORT_SIDE / min(image.size)
    if scale < 1:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BICUBIC)
    image.info["source"] = str(file)
    return image


def _random_crop(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A random-resized-crop (area share CROP_SCALE, aspect CROP_ASPECT), flipped half the time;
    left at its own size, since the adapter's preprocessing resizes for the model."""
    width, height = photo.size
    for _ in range(10):
        area = width * height * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
        crop_w, crop_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            break
    else:  # a photo too elongated for the aspect range: its centred square
        crop_w = crop_h = min(width, height)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
    crop = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        crop = ImageOps.mirror(crop)
    crop.info["source"] = photo.info["source"]
    return crop


def _is_grayscale(image: Image.Image) -> bool:
    red, green, blue = image.split()
    return not ImageChops.difference(red, green).getbbox() and not ImageChops.difference(green, blue).getbbox()


def _paragraphs(file: Traversable) -> list[str]:
    """Blank-line separated paragraphs of a text file, whitespace normalised; [] (with a
    warning) when the file is not UTF-8 text."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        logger.warning("skipping unreadable text file %s: %s", file, error)
        return []
    paragraphs = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
    return [paragraph for paragraph in paragraphs if paragraph]


def _chunks(text: str, size: int) -> list[str]:
    """Consecutive pieces of `text` of at least `size` characters, cut at whitespace; the
    shorter tail is dropped so every chunk fills the sequence."""
    chunks = []
    start = 0
    while (begin := _NON_SPACE.search(text, start)) and len(text) - begin.start() >= size:
        cut = _WORD_END.search(text, begin.start() + size)
        start = cut.start() if cut else len(text)
        chunks.append(text[begin.start() : start])
    return chunks
