"""Real sample files that installed packages ship (installed --no-deps as data only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PHOTOS = {
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def package_file(package: str, relative: str) -> Path:
    # find_spec on the top-level package only reads its location; nothing of it is imported.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed (scripts/demo-data-requirements.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def photo(name: str) -> Path:
    return package_file(*PHOTOS[name])
