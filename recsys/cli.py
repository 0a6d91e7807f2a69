"""The `recsys` command. Flags override RECSYS_* environment variables, which override defaults.

Each sub-command lives in a small ``_add_<name>`` function that registers its parser and
points ``func`` at a handler; handlers import heavy modules lazily so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recsys import datasets
from recsys.config import Settings, load_settings
from recsys.errors import RecsysError
from recsys.logsafe import install_secret_filter

log = logging.getLogger("recsys")

WORKERS = ("reward", "learner", "publisher", "encoder")


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from flags that were given (others come from the environment or defaults)."""
    overrides: dict[str, Any] = {}
    if getattr(args, "bootstrap", None):
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap}
    if getattr(args, "store_url", None):
        overrides["store"] = {"url": args.store_url}
    if not overrides:
        return load_settings()
    # Merge flags over the environment section by section.
    base = load_settings()
    merged = {
        section: {**getattr(base, section).model_dump(), **values}
        for section, values in overrides.items()
    }
    return load_settings(**merged)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (RECSYS_KAFKA__BOOTSTRAP_SERVERS)")
    p.add_argument("--store-url", help="SQLAlchemy store URL (RECSYS_STORE__URL)")


# --- broker / topics --------------------------------------------------------------------------
def _add_broker(sub: Any) -> None:
    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker")
    p.add_argument("--port", type=int, default=9092, help="port to listen on (default 9092)")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    p.add_argument("--storage", default="memory://tansu/", help="Tansu storage engine URL")
    p.add_argument("--create-topics", action="store_true", help="create the recsys topics too")
    p.set_defaults(func=_cmd_broker)


def _cmd_broker(args: argparse.Namespace) -> int:
    from recsys.broker import EmbeddedBroker
    from recsys.kafka import create_topics

    broker = EmbeddedBroker(port=args.port, host=args.host, storage=args.storage).start()
    print(f"broker ready on {broker.bootstrap} (storage {args.storage}); Ctrl-C stops it")
    try:
        if args.create_topics:
            s = load_settings(kafka={"bootstrap_servers": broker.bootstrap})
            create_topics(s.kafka, s.topics.all(), s.topics.partitions)
        return broker.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()


def _add_topics(sub: Any) -> None:
    p = sub.add_parser("topics", help="manage the recsys topics")
    tsub = p.add_subparsers(dest="topics_cmd", required=True)
    c = tsub.add_parser("create", help="create the topics with their partition counts")
    _add_common(c)
    c.add_argument("--partitions", type=int, help="override RECSYS_TOPICS__PARTITIONS")
    c.set_defaults(func=_cmd_topics_create)


def _cmd_topics_create(args: argparse.Namespace) -> int:
    from recsys.kafka import create_topics
    from recsys.rewards.state import ensure_state_topic

    s = _settings(args)
    partitions = args.partitions or s.topics.partitions
    created = create_topics(s.kafka, s.topics.all(), partitions, s.topics.replication_factor)
    # The reward join's changelog: compacted, one partition per events partition.
    if ensure_state_topic(s.kafka, s.topics.reward_state, partitions, s.topics.replication_factor):
        created.append(s.topics.reward_state)
    for name in [*s.topics.all(), s.topics.reward_state]:
        print(f"{name:32s} {'created' if name in created else 'already exists'}")
    return 0


# --- config -----------------------------------------------------------------------------------
def _add_config(sub: Any) -> None:
    p = sub.add_parser("config", help="show the effective settings (secrets hidden)")
    p.add_argument("--markdown", action="store_true", help="print the settings reference table")
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    from recsys.config import settings_markdown

    if args.markdown:
        print(settings_markdown())
        return 0
    # SecretStr renders as '**********', so the JSON never carries a password.
    print(load_settings().model_dump_json(indent=2))
    return 0


# --- workers ----------------------------------------------------------------------------------
def _add_worker(sub: Any) -> None:
    p = sub.add_parser("worker", help="run one worker, as Kubernetes runs it")
    p.add_argument("name", choices=WORKERS)
    _add_common(p)
    p.set_defaults(func=_cmd_worker)


def _cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    module = importlib.import_module(f"workers.{args.name}")
    result = module.run(settings)
    return int(result or 0)


# --- replay -----------------------------------------------------------------------------------
def _add_replay(sub: Any) -> None:
    p = sub.add_parser("replay", help="replay a real data set to the events and items topics")
    p.add_argument("dataset", choices=("movielens", "obd"))
    p.add_argument(
        "--path",
        type=existing_path,
        default=None,
        help="data set folder (default: the packaged ml-latest-small or OBD sample)",
    )
    p.add_argument("--max-rate", type=float, help="events per second at most (default: no cap)")
    p.add_argument("--limit", type=int, help="stop after this many events")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args: argparse.Namespace) -> int:
    from recsys.data.backfill import run_replay

    # The default depends on the data set, so it is resolved here, not in the flag.
    path = args.path or datasets.path("ml-latest-small" if args.dataset == "movielens" else "obd")
    summary = run_replay(
        args.dataset,
        path,
        _settings(args),
        max_rate=args.max_rate,
        limit=args.limit,
        progress=not args.no_progress,
    )
    print(summary.render())
    return 0


# --- recommend --------------------------------------------------------------------------------
def _add_recommend(sub: Any) -> None:
    p = sub.add_parser("recommend", help="print what the store holds for a user")
    p.add_argument("user_id", help="the user's id, exactly as the app sends it")
    p.add_argument("--json", action="store_true", help="print the slate as JSON")
    _add_common(p)
    p.set_defaults(func=_cmd_recommend)


def _cmd_recommend(args: argparse.Namespace) -> int:
    import json

    from recsys.store import Store

    with Store(_settings(args).store.url) as store:
        found = store.get_recommendation(args.user_id)
        source = "user"
        if found is None:
            found = store.get_cold_start()
            source = "cold_start (user not seen yet)"
    if found is None:
        print(f"no recommendations stored for {args.user_id!r} and no cold-start slate yet")
        return 1
    slate = found.slate
    if args.json:
        out = slate.to_dict()
        out.update(user_id=args.user_id, policy=found.policy, source=source)
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return 0
    print(f"user          {args.user_id}")
    print(f"source        {source}; policy {found.policy}")
    print(f"model_version {slate.model_version}")
    print(f"request_id    {slate.request_id}")
    print(f"updated_at    {found.updated_at}")
    print(f"{'pos':>3}  {'score':>9}  {'propensity':>10}  item_id")
    for item in slate.items:
        print(f"{item.position:>3}  {item.score:>9.4f}  {item.propensity:>10.4g}  {item.item_id}")
    return 0


# --- eval -------------------------------------------------------------------------------------
EVALUATIONS = {
    "offline": ("recsys.eval.offline", "leave-one-out, full ranking, against baselines"),
    "prequential": ("recsys.eval.prequential", "test-then-learn on the time-ordered stream"),
    "ope": ("recsys.eval.ope", "IPS / SNIPS / DM / DR on logged bandit data"),
    "sim": ("recsys.eval.sim", "closed loop in one process: recsys, its peers and ablations"),
}


def _add_eval(sub: Any) -> None:
    lines = "\n".join(f"  {name:12s} {text}" for name, (_, text) in EVALUATIONS.items())
    p = sub.add_parser(
        "eval",
        help="offline, prequential and off-policy evaluation",
        description=f"evaluations:\n{lines}\n\n`recsys eval NAME --help` shows a NAME's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("evaluation", choices=sorted(EVALUATIONS))
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    # The evaluation's module (torch and all) is imported only when it runs, and declares its
    # own flags, so `recsys --help` and the workers start fast.
    module_name, text = EVALUATIONS[args.evaluation]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"recsys eval {args.evaluation}", description=text)
    module.add_arguments(parser)
    return int(module.run_from_args(parser.parse_args(args.args)) or 0)


# --- demo -------------------------------------------------------------------------------------
def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="everything in a closed loop on embedded defaults, then a report"
    )
    p.add_argument("--minutes", type=float, default=4.0, help="length of the live phase")
    p.add_argument("--out", type=Path, default=Path("demo-report"), help="report folder")
    p.add_argument(
        "--data",
        type=Path,
        # The packaged copy; DemoConfig accepts the dataset folder itself or its parent.
        default=datasets.path("ml-latest-small"),
        help="MovieLens folder (or its parent) for the simulated users "
        "(default: the packaged ml-latest-small)",
    )
    p.add_argument("--visits-per-s", type=float, default=15.0, help="simulated visits per second")
    p.add_argument(
        "--shift-at",
        type=float,
        default=None,
        help="fraction of the live phase after which preferences shift (drift)",
    )
    p.add_argument(
        "--no-warm-start",
        action="store_true",
        help="skip the backfill of the catalogue's MovieLens ratings",
    )
    p.add_argument(
        "--peers-live",
        action="store_true",
        help="play the peer arms during the live phase, in the app's spare time (shown in the "
        "progress line; on a small machine they take CPU from the workers under test)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from recsys.demo.run import DemoConfig, run_demo

    cfg = DemoConfig(
        minutes=args.minutes,
        out=args.out,
        data=args.data,
        visits_per_s=args.visits_per_s,
        shift_at=args.shift_at,
        warm_start=not args.no_warm_start,
        peers_live=args.peers_live,
        seed=args.seed,
    )
    # The workers log to their own files; the console is for the progress line.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # The OPE target follows the checkpoints through a ModelWatcher, which logs every swap.
    logging.getLogger("recsys.serving.watcher").setLevel(logging.WARNING)
    run_demo(cfg)
    return 0


REGISTRY: list[Callable[[Any], None]] = [
    _add_broker,
    _add_topics,
    _add_config,
    _add_worker,
    _add_replay,
    _add_recommend,
    _add_eval,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys", description="Streaming online-learning recommender."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in REGISTRY:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_secret_filter()  # patterns only here; workers add the settings' secret values
    try:
        return int(args.func(args) or 0)
    except RecsysError as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 2


def existing_path(value: str) -> Path:
    """argparse type for a --path that must exist."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
