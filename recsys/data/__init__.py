"""Loaders for real data sets (MovieLens, Open Bandit Dataset) as event streams, and replay."""

from recsys.data.backfill import ReplaySummary, read_topic, replay, replay_items, run_replay
from recsys.data.load_report import LoadReport, SkippedRow
from recsys.data.movielens import MovieLens, detect_layout, load_movielens
from recsys.data.obd import OBDLog, load_obd, obd_items

__all__ = [
    "LoadReport",
    "MovieLens",
    "OBDLog",
    "ReplaySummary",
    "SkippedRow",
    "detect_layout",
    "load_movielens",
    "load_obd",
    "obd_items",
    "read_topic",
    "replay",
    "replay_items",
    "run_replay",
]
