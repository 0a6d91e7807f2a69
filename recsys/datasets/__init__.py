"""Data sets shipped inside the package, so the demo, evaluations and tests run from a wheel.

- ``ml-latest-small``: MovieLens latest-small as released by GroupLens (ratings.csv, movies.csv,
  tags.csv and its README.txt with the terms: redistribution allowed under the same terms).
- ``obd``: a 10,000-row sample of the Open Bandit Dataset, campaign "all", uniform-random logging
  policy (all.csv, item_context.csv; CC BY 4.0, see obd/README.md).

The folders keep the layout of the upstream downloads (``ml-latest-small/``, ``obd/random/all/``),
so ``path(name)`` is exactly the folder that ``recsys.data.load_movielens`` / ``load_obd`` take.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from recsys.errors import DataError

# name -> folder relative to this package; the folder the loaders take.
_FOLDERS: dict[str, tuple[str, ...]] = {
    "ml-latest-small": ("ml-latest-small",),
    "obd": ("obd", "random", "all"),
}

NAMES: tuple[str, ...] = tuple(_FOLDERS)


def path(name: str) -> Path:
    """The folder of the packaged data set ``name`` (one of ``NAMES``).

    Raises DataError for an unknown name (listing the known ones) or when the data files are
    missing from the installation.
    """
    parts = _FOLDERS.get(name)
    if parts is None:
        raise DataError(f"no packaged data set {name!r}; known: {', '.join(NAMES)}")
    folder = resources.files(__name__).joinpath(*parts)
    # Wheels and editable installs put package data on the file system, where files() is a
    # Path. A zipped import would give another Traversable, which the loaders cannot open.
    if not isinstance(folder, Path):
        raise DataError(
            f"packaged data set {name!r} is not on the file system ({folder}); "
            "install recsys unzipped or pass the data folder explicitly"
        )
    if not folder.is_dir():
        raise DataError(f"packaged data set {name!r} missing at {folder}: reinstall recsys")
    return folder
