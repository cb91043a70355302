"""Regenerate the bundled calibration data in this folder.

    python calibration/make_bundled.py

images/: the real photographs shipped inside scikit-image and scikit-learn, shorter side
downscaled to 256 px, JPEG quality 90. text.txt: prose paragraphs of the docstrings of Python's
standard library, in module order (so that a split by position keeps whole modules apart).
README.md records where each file comes from and its licence. The output depends on the
installed scikit-image / scikit-learn / Python versions, which is why the files are committed
rather than built at install time.
"""
from __future__ import annotations

import importlib
import inspect
import re
import textwrap
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SHORT_SIDE = 256
JPEG_QUALITY = 90

# (file stem, loader) for every real photograph that ships with the packages (no download).
# Synthetic images (checkerboard, phantom, colour wheel, logo, blobs) are left out, and so is
# motorcycle_right: it is the other half of a stereo pair and would leak a calibration photo
# into the holdout. Grayscale photographs are kept so there are enough photos to hold some out.
def _photographs() -> list[tuple[str, np.ndarray]]:
    import skimage.data as sk
    from sklearn.datasets import load_sample_image

    return [
        ("astronaut", sk.astronaut()),
        ("chelsea", sk.chelsea()),
        ("coffee", sk.coffee()),
        ("rocket", sk.rocket()),
        ("hubble_deep_field", sk.hubble_deep_field()),
        ("immunohistochemistry", sk.immunohistochemistry()),
        ("retina", sk.retina()),
        ("motorcycle_left", sk.stereo_motorcycle()[0]),
        ("china", load_sample_image("china.jpg")),
        ("flower", load_sample_image("flower.jpg")),
        ("camera", sk.camera()),
        ("coins", sk.coins()),
        ("clock", sk.clock()),
        ("grass", sk.grass()),
        ("gravel", sk.gravel()),
        ("brick", sk.brick()),
    ]


def write_images(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.jpg"):
        old.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about optional fetchers it does not use here
        photos = _photographs()
    for stem, pixels in photos:
        image = Image.fromarray(pixels)
        scale = SHORT_SIDE / min(image.size)
        if scale < 1:
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.Resampling.LANCZOS)
        image.save(folder / f"{stem}.jpg", quality=JPEG_QUALITY, optimize=True)


# Ordered so that neighbouring modules cover related topics; the tail (held out by a positional
# split) is then a different set of modules from the head.
MODULES = [
    "collections", "functools", "itertools", "operator", "copy", "heapq", "bisect", "enum",
    "dataclasses", "abc", "typing", "types", "inspect", "ast", "tokenize", "string", "textwrap",
    "re", "difflib", "pprint", "json", "pickle", "csv", "configparser", "os", "pathlib",
    "shutil", "tempfile", "glob", "fnmatch", "zipfile", "tarfile", "io", "codecs", "argparse",
    "logging", "warnings", "traceback", "contextlib", "subprocess", "threading", "queue",
    "asyncio", "selectors", "socket", "http.client", "http.server", "urllib.parse",
    "urllib.request", "email", "email.message", "email.utils", "mailbox", "smtplib", "ftplib",
    "datetime", "calendar", "decimal", "fractions", "random", "statistics", "hashlib", "hmac",
    "secrets", "uuid", "base64", "sqlite3", "unittest", "unittest.mock", "doctest", "pdb",
    "weakref", "gettext", "locale", "sched", "optparse", "cmd", "shlex", "zoneinfo",
]

_MIN_WORDS = 12


def _docstrings(module_name: str):
    """The module docstring, then those of its public classes, their methods and functions."""
    module = importlib.import_module(module_name)
    yield inspect.getdoc(module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield inspect.getdoc(obj)
            for attr_name, attr in sorted(vars(obj).items()):
                if not attr_name.startswith("_") and callable(attr):
                    yield inspect.getdoc(attr)
        elif inspect.isfunction(obj):
            yield inspect.getdoc(obj)


def _is_prose(block: str) -> bool:
    """A paragraph of sentences, not code, a doctest, a table or an argument list."""
    lines = block.splitlines()
    if any(line.startswith((" ", "\t", ">>>", "...", "$ ", "-", "*", "+", "|", "=")) for line in lines):
        return False
    if any(re.match(r"^\s*\w+\s*(\(.*\))?\s*:\s*$|^\w[\w ]{0,20} -- ", line) for line in lines):
        return False  # section headings ("Args:") and definition lists ("x -- the thing")
    text = " ".join(lines)
    words = text.split()
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return len(words) >= _MIN_WORDS and letters / len(text) > 0.85 and text.rstrip().endswith((".", ":"))


def write_text(path: Path) -> None:
    seen: set[str] = set()
    paragraphs: list[str] = []
    for module_name in MODULES:
        for doc in _docstrings(module_name):
            for block in re.split(r"\n\s*\n", doc or ""):
                block = block.strip("\n")
                text = " ".join(block.split())
                if text in seen or not _is_prose(block):
                    continue
                seen.add(text)
                paragraphs.append(textwrap.fill(text, width=100))
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_images(HERE / "images")
    write_text(HERE / "text.txt")
