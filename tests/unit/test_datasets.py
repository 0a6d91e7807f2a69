"""The packaged data sets: the resolver, the files it points at, and the wheel's package data."""

from __future__ import annotations

import argparse
import fnmatch
import tomllib
from pathlib import Path

import pytest

from recsys import datasets
from recsys.cli import build_parser
from recsys.data.movielens import load_movielens
from recsys.data.obd import load_obd
from recsys.errors import DataError, RecsysError
from recsys.eval import offline, ope, prequential

REPO = Path(__file__).resolve().parents[2]


def test_names_resolve_to_the_folders_the_loaders_take() -> None:
    assert datasets.NAMES == ("ml-latest-small", "obd")
    ml = datasets.path("ml-latest-small")
    obd = datasets.path("obd")
    assert {p.name for p in ml.iterdir()} >= {"ratings.csv", "movies.csv", "tags.csv", "README.txt"}
    assert {p.name for p in obd.iterdir()} == {"all.csv", "item_context.csv"}
    # Both live under one root in the upstream layout, which tests' data_dir fixture relies on.
    assert obd == ml.parent / "obd" / "random" / "all"
    assert (ml.parent / "obd" / "README.md").read_text().count("CC BY 4.0") == 1


def test_unknown_name_is_a_data_error_listing_the_names() -> None:
    with pytest.raises(DataError, match=r"'ml-100k'.*known: ml-latest-small, obd") as info:
        datasets.path("ml-100k")
    assert isinstance(info.value, RecsysError)


def test_movielens_copy_loads_in_full() -> None:
    ml = load_movielens(datasets.path("ml-latest-small"))
    assert ml.layout == "ml-latest"
    assert len(ml) == 100_836
    assert len(ml.movies) == 9_742
    assert len(set(ml.user.tolist())) == 610
    assert ml.report.skipped == []


def test_obd_sample_loads_in_full() -> None:
    log = load_obd(datasets.path("obd"))
    assert log.n_rounds == 10_000
    assert log.n_actions == 80
    assert int(log.reward.sum()) == 38
    assert log.report.skipped == []


def test_every_packaged_file_is_package_data_in_pyproject() -> None:
    """A data file that no package-data pattern names would be left out of the wheel."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["recsys.datasets"]
    root = datasets.path("ml-latest-small").parent
    files = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"
    ]
    assert len(files) == 7
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert missing == []


def test_commands_default_to_the_packaged_copies() -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).data == datasets.path("ml-latest-small")
    # replay's default depends on the data set, so the flag stays None and the handler resolves.
    assert parser.parse_args(["replay", "obd"]).path is None
    assert parser.parse_args(["replay", "obd", "--path", str(REPO)]).path == REPO
    evaluations = {offline: "ml-latest-small", prequential: "ml-latest-small", ope: "obd"}
    for module, name in evaluations.items():
        p = argparse.ArgumentParser()
        module.add_arguments(p)
        assert p.parse_args([]).path == datasets.path(name), module.__name__
