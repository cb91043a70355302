"""What every saved inspection must hold, whatever the model: each figure a PNG of its declared
size that is not blank, shown by inspect.md and embedded in inspect.html, and a
recommended.yaml that validates as it is."""
import base64
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from quantsink.inspection.figures import pixel_size
from quantsink.recipe import Recipe

MIN_PIXEL_VARIANCE = 100.0  # a blank or single-colour figure has ~0; a drawn one thousands


def check_figure(path: Path) -> None:
    image = Image.open(path)
    assert image.format == "PNG"
    assert image.size == pixel_size(path.stem), (path.name, image.size)
    assert np.asarray(image.convert("L"), dtype=float).var() > MIN_PIXEL_VARIANCE, f"{path.name} is blank"


def check_saved(folder: Path, expected_figures: set[str]) -> dict:
    data = json.loads((folder / "inspect.json").read_text())
    files = {entry["file"] for entry in data["figures"]}
    assert files == expected_figures
    markdown = (folder / "inspect.md").read_text()
    page = (folder / "inspect.html").read_text()
    embedded = dict(re.findall(r'data-file="([^"]+)" src="data:image/png;base64,([^"]+)"', page))
    for file in files:
        check_figure(folder / file)
        assert f"]({file})" in markdown
        assert base64.b64decode(embedded[file]) == (folder / file).read_bytes()
    assert "src=\"http" not in page and "src=\"" + next(iter(files)) not in page  # self-contained
    recipe = Recipe.from_yaml(folder / "recommended.yaml")
    assert recipe.to_dict() == Recipe.from_dict(data["recommended"]["recipe"]).to_dict()
    commented = (folder / "recommended.yaml").read_text()
    for entry in data["recommended"]["reasons"]:
        assert f"# - {entry['choice']}" in commented
    return data
