"""The wheel ships every subpackage: pyproject.toml lists them by hand (the bundled data needs a
package-dir mapping), and a package missing there installs fine in editable mode but not from a
wheel."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_subpackage():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "quantsink").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
