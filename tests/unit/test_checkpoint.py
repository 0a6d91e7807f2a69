"""Atomic checkpoints: round trip, integrity checks, crash safety, publisher loading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recsys import checkpoint as ckpt
from recsys.errors import CheckpointError, ConfigError
from recsys.events import RewardRecord
from recsys.learner.config import LearnerConfig
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig
from recsys.serving.model import load_policy
from tests.checkpoints import edit_manifest, make_checkpoint

REPO = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(
    text_dim=8, dim=16, max_history=4, item_capacity=8, adaptor_hidden=16, dropout=0.0
)


def _records(n: int, start: int = 0) -> list[RewardRecord]:
    return [
        RewardRecord(
            f"r{k}",
            f"u{k % 7}",
            f"i{k % 11}",
            float(k % 3 != 0),
            k,
            "organic",
            propensity=0.2 if k % 2 else None,
        )
        for k in range(start, start + n)
    ]


def _trained(steps: int = 3, **kw: object) -> Learner:
    lr = Learner(MODEL, LearnerConfig(batch_size=16, device="cpu", buffer_capacity=200, **kw))  # type: ignore[arg-type]
    lr.observe(_records(60))
    for _ in range(steps):
        lr.step()
    return lr


@pytest.mark.slow
def test_round_trip_restores_everything(tmp_path: Path) -> None:
    lr = _trained(checkpoint_buffer=True)
    path = lr.save_checkpoint(
        tmp_path, {"recsys.rewards:0": 60, "recsys.rewards:1": 7}, extra={"note": "x"}
    )
    assert path.name == "v000000000003"
    files = sorted(p.name for p in path.iterdir())
    assert all(f.endswith((".safetensors", ".json")) for f in files)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 3
    assert manifest["offsets"] == {
        "recsys.rewards:0": 60,
        "recsys.rewards:1": 7,
    }
    assert manifest["config"]["model"]["dim"] == 16
    assert manifest["extra"] == {"note": "x"}
    assert manifest["created_at"] > 0
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    assert all(len(h) == 64 for h in manifest["files"].values())

    loaded = Learner.load_latest_checkpoint(tmp_path, device="cpu")
    assert loaded is not None
    lr2, offsets = loaded
    assert offsets == {"recsys.rewards:0": 60, "recsys.rewards:1": 7}
    assert lr2.step_count == 3
    assert lr2.catalog.ids == lr.catalog.ids
    assert lr2.histories.get("u1") == lr.histories.get("u1")
    assert len(lr2.buffer) == len(lr.buffer)
    torch.testing.assert_close(lr2.item_counts, lr.item_counts)
    hist = [[0, 1], [], [5]]
    torch.testing.assert_close(lr2.scores(hist), lr.scores(hist))
    with_state = 0
    for p, p2 in zip(lr.model.parameters(), lr2.model.parameters(), strict=True):
        # A parameter no loss term reached yet (a head whose weight is 0) has no AdamW state.
        s, s2 = lr.optimizer.state[p], lr2.optimizer.state[p2]
        assert s.keys() == s2.keys()
        if s:
            with_state += 1
            torch.testing.assert_close(s["exp_avg"], s2["exp_avg"])
            torch.testing.assert_close(s["exp_avg_sq"], s2["exp_avg_sq"])
            assert float(s["step"]) == float(s2["step"])
    assert with_state > 0
    assert lr2.optimizer.param_groups[0]["betas"] == lr.optimizer.param_groups[0]["betas"]
    out = lr2.step()
    assert out is not None
    assert out["skipped"] == 0.0
    assert lr2.step_count == 4


def test_load_policy_for_publishers(tmp_path: Path) -> None:
    lr = _trained()
    path = lr.save_checkpoint(tmp_path, {"t:0": 1})
    for where in (path, tmp_path):  # a checkpoint dir, or the root (newest valid)
        model, item_ids, manifest = load_policy(where)
        assert item_ids == lr.catalog.ids
        assert manifest["model_version"] == path.name
        assert not model.training
        items = torch.tensor([[-1, -1, 0, 1]])
        torch.testing.assert_close(model(items), lr.scores(items))
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_policy(tmp_path / "empty")


def test_invalid_checkpoints_are_skipped(tmp_path: Path) -> None:
    lr = _trained(steps=1, keep_checkpoints=10)
    good = lr.save_checkpoint(tmp_path, {"t:0": 10})
    lr.step()
    truncated = lr.save_checkpoint(tmp_path, {"t:0": 20})
    lr.step()
    tampered = lr.save_checkpoint(tmp_path, {"t:0": 30})
    lr.step()
    partial = lr.save_checkpoint(tmp_path, {"t:0": 40})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        partial.name,
        tampered.name,
        truncated.name,
        good.name,
    ]
    # truncated weights file
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    # tampered: a hash in the manifest no longer matches
    m = json.loads((tampered / "manifest.json").read_text())
    m["files"]["model.safetensors"] = "0" * 64
    (tampered / "manifest.json").write_text(json.dumps(m))
    # partial: a directory with files but no manifest (as if renamed too early)
    (partial / "manifest.json").unlink()
    # plus a temp dir left by a writer that died
    (tmp_path / ".tmp-v000000000099-dead").mkdir()

    for bad, msg in ((truncated, "sha256"), (tampered, "sha256"), (partial, "partial")):
        with pytest.raises(CheckpointError, match=msg):
            ckpt.read_manifest(bad)
    loaded = Learner.load_latest_checkpoint(tmp_path, device="cpu")
    assert loaded is not None
    assert loaded[1] == {"t:0": 10}
    assert loaded[0].step_count == 1
    found = ckpt.find_latest(tmp_path)
    assert found is not None
    assert found[0] == good
    # nothing valid at all
    for p in (good,):
        (p / "histories.json").write_text("{}")
    assert Learner.load_latest_checkpoint(tmp_path, device="cpu") is None


def test_corrupt_file_with_matching_hash_is_rejected_on_restore(tmp_path: Path) -> None:
    lr = _trained()
    path = lr.save_checkpoint(tmp_path, {})
    (path / "optimizer.json").write_text('{"param_groups": []}')
    m = json.loads((path / "manifest.json").read_text())
    m["files"]["optimizer.json"] = ckpt.sha256_file(path / "optimizer.json")
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="cannot restore"):
        Learner.load_checkpoint(path, device="cpu")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def boom(p: Path) -> None:
        p.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.write_checkpoint(tmp_path, 5, {"a.bin": boom}, {"offsets": {}})
    assert list(tmp_path.iterdir()) == []


def test_same_step_twice_and_pruning(tmp_path: Path) -> None:
    lr = _trained(steps=1, keep_checkpoints=2)
    a = lr.save_checkpoint(tmp_path, {"t:0": 1})
    b = lr.save_checkpoint(tmp_path, {"t:0": 2})  # no step in between: a new version anyway
    assert (a.name, b.name) == ("v000000000001", "v000000000001-1")
    found = ckpt.find_latest(tmp_path)
    assert found is not None
    assert found[1]["offsets"] == {"t:0": 2}
    lr.step()
    c = lr.save_checkpoint(tmp_path, {"t:0": 3})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [c.name, b.name]


def test_weights_are_plain_safetensors(tmp_path: Path) -> None:
    lr = _trained()
    path = lr.save_checkpoint(tmp_path, {})
    state = load_file(str(path / "model.safetensors"))
    assert "items.text_vectors" in state
    assert "encoder.begin" in state


_WRITER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from recsys.events import RewardRecord
    from recsys.learner.trainer import Learner
    from recsys.learner.config import LearnerConfig
    from recsys.model import ModelConfig
    root = sys.argv[1]
    lr = Learner(ModelConfig(text_dim=8, dim=16, max_history=4, item_capacity=8,
                             adaptor_hidden=16), LearnerConfig(batch_size=8, device="cpu"))
    offset = 0
    while True:
        recs = [RewardRecord(f"r{k}", f"u{k % 5}", f"i{k % 9}", 1.0, k, "organic")
                for k in range(offset, offset + 20)]
        lr.observe(recs)
        offset += 20
        lr.step()
        lr.save_checkpoint(root, {"t:0": offset}, extra={"seen": offset})
        print(offset, flush=True)
    """
)


@pytest.mark.slow
def test_kill_during_training_and_checkpoint_writes(tmp_path: Path) -> None:
    """SIGKILL a learner process at arbitrary moments; a valid checkpoint always survives."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for delay in (1.5, 2.0, 2.7):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one checkpoint done
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        loaded = Learner.load_latest_checkpoint(tmp_path, device="cpu")
        assert loaded is not None
        lr, offsets = loaded
        manifest = ckpt.find_latest(tmp_path)
        assert manifest is not None
        assert offsets["t:0"] == manifest[1]["extra"]["seen"] == lr.step_count * 20
        assert torch.isfinite(lr.scores([[0, 1]])).all()


def test_pruning_keeps_valid_versions_and_sets_invalid_ones_aside(tmp_path: Path) -> None:
    lr = _trained(steps=1, keep_checkpoints=2)
    good = [lr.save_checkpoint(tmp_path, {"t:0": n}) for n in range(2)]
    # A tampered checkpoint with a "future" step: newest by name, fails verification.
    future = tmp_path / "v000000000099"
    future.mkdir()
    for f in good[-1].iterdir():
        (future / f.name).write_bytes(f.read_bytes())
    (future / "model.safetensors").write_bytes(b"tampered")
    lr.step()
    newest = lr.save_checkpoint(tmp_path, {"t:0": 2})
    # Both kept versions verify; the tampered one is out of the way but not destroyed.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [newest.name, good[-1].name]
    (aside,) = (tmp_path / ckpt.INVALID_DIR).iterdir()
    assert aside.name.startswith("v000000000099-")
    assert (aside / "model.safetensors").read_bytes() == b"tampered"
    found = ckpt.find_latest(tmp_path)
    assert found is not None
    assert found[0] == newest


# --- tampering: the manifest must describe the directory exactly, and nothing is a symlink ------

ITEMS = ["a", "b", "c"]


@pytest.fixture
def two_versions(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``root`` with good versions v1 and v2 (the one each tamper test attacks)."""
    root = tmp_path / "ckpts"
    v1 = make_checkpoint(root, 1, ITEMS)
    v2 = make_checkpoint(root, 2, ITEMS)
    return root, v1, v2


def _rejected(root: Path, bad: Path, match: str, previous: Path) -> None:
    """``bad`` fails verification with ``match``, and readers fall back to ``previous``."""
    with pytest.raises(CheckpointError, match=match):
        ckpt.read_manifest(bad)
    found = ckpt.find_latest(root)
    assert found is not None
    assert found[0] == previous
    loaded = Learner.load_latest_checkpoint(root, device="cpu")
    assert loaded is not None
    assert loaded[0].step_count == int(previous.name[1:13])


def test_empty_file_list_does_not_hide_tampered_weights(
    two_versions: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, v1, v2 = two_versions
    other = make_checkpoint(tmp_path / "other", 2, ITEMS, seed=7)  # real, different weights
    (v2 / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    edit_manifest(v2, lambda m: m.update(files={}))
    _rejected(root, v2, "not listed", v1)


def test_extra_unlisted_file_is_rejected(two_versions: tuple[Path, Path, Path]) -> None:
    root, v1, v2 = two_versions
    (v2 / "replay.safetensors").write_bytes((v2 / "learner.safetensors").read_bytes())
    _rejected(root, v2, r"not listed.*replay\.safetensors", v1)


def test_missing_listed_file_is_rejected(two_versions: tuple[Path, Path, Path]) -> None:
    root, v1, v2 = two_versions
    (v2 / "catalog.json").unlink()
    _rejected(root, v2, "missing file catalog.json", v1)


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_names_outside_the_directory_are_rejected(
    two_versions: tuple[Path, Path, Path], tmp_path: Path, where: str
) -> None:
    root, v1, v2 = two_versions
    # A real file outside, with its true hash in the manifest: only its name is wrong.
    outside = tmp_path / "ckpts" / "outside.json"
    outside.write_text('{"ids": ["a"]}')
    name = "../outside.json" if where == "dotdot" else str(outside)
    edit_manifest(v2, lambda m: m["files"].update({name: ckpt.sha256_file(outside)}))
    _rejected(root, v2, "bad file name", v1)


def test_symlinked_checkpoint_directory_is_rejected(
    two_versions: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, _v1, v2 = two_versions
    # A perfectly valid checkpoint elsewhere, linked in as the newest version.
    elsewhere = make_checkpoint(tmp_path / "elsewhere", 9, ITEMS, seed=3)
    link = root / "v000000000009"
    link.symlink_to(elsewhere, target_is_directory=True)
    assert link not in ckpt.list_checkpoints(root)
    _rejected(root, link, "checkpoint directory is a symbolic link", v2)


def test_symlinked_file_is_rejected(two_versions: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, v1, v2 = two_versions
    # Same bytes, so the hash matches: only the link itself gives it away.
    copy = tmp_path / "model-copy.safetensors"
    copy.write_bytes((v2 / "model.safetensors").read_bytes())
    (v2 / "model.safetensors").unlink()
    (v2 / "model.safetensors").symlink_to(copy)
    _rejected(root, v2, "model.safetensors is a symbolic link", v1)


def test_directory_among_the_files_is_rejected(two_versions: tuple[Path, Path, Path]) -> None:
    root, v1, v2 = two_versions
    (v2 / "catalog.json").unlink()
    (v2 / "catalog.json").mkdir()
    _rejected(root, v2, "catalog.json is not a plain file", v1)


def test_prune_ignores_a_symlinked_newest(
    two_versions: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, v1, v2 = two_versions
    elsewhere = make_checkpoint(tmp_path / "elsewhere", 9, ITEMS, seed=3)
    link = root / "v000000000009"
    link.symlink_to(elsewhere, target_is_directory=True)
    removed = ckpt.prune(root, keep=1)
    # The link neither counted as the one kept nor was followed: v2 (the newest real) stays.
    assert removed == [v1]
    assert ckpt.list_checkpoints(root) == [v2]
    ckpt.read_manifest(v2)
    assert link.is_symlink()
    ckpt.read_manifest(elsewhere)  # its target untouched
    found = ckpt.find_latest(root)
    assert found is not None
    assert found[0] == v2


def test_prune_keeps_the_newest_valid_and_the_one_just_written(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    old = [make_checkpoint(root, step, ITEMS) for step in (10, 11)]
    # A restarted writer whose step count begins below the versions already on disk.
    fresh = make_checkpoint(root, 1, ITEMS)
    assert ckpt.prune(root, keep=2) == []  # by default the most recently written is spared
    assert ckpt.list_checkpoints(root) == [*reversed(old), fresh]
    # Spared explicitly too; and the newest valid (v11) is kept whatever ``keep`` is.
    assert ckpt.prune(root, keep=1, protect=fresh) == [old[0]]
    assert ckpt.list_checkpoints(root) == [old[1], fresh]
    # A tampered newest is set aside, never counted: the newest valid one survives pruning.
    (old[1] / "catalog.json").write_text('{"ids": []}')
    removed = ckpt.prune(root, keep=1, protect=old[1])
    assert removed == [old[1]]
    assert ckpt.list_checkpoints(root) == [fresh]
    ckpt.read_manifest(fresh)


def test_crafted_huge_item_capacity_is_rejected_before_allocating(
    two_versions: tuple[Path, Path, Path],
) -> None:
    root, v1, v2 = two_versions
    # The manifest carries no hash of itself: a crafted config passes verification, so the
    # model's own bounds must stop it before 2^40 rows are allocated.
    edit_manifest(v2, lambda m: m["config"]["model"].update(item_capacity=1 << 40))
    with pytest.raises(CheckpointError, match=r"ModelConfig\.item_capacity must be an int in"):
        load_policy(v2)
    with pytest.raises(CheckpointError, match=r"ModelConfig\.item_capacity"):
        Learner.load_checkpoint(v2, device="cpu")
    loaded = Learner.load_latest_checkpoint(root, device="cpu")
    assert loaded is not None
    assert loaded[0].step_count == 1  # the previous good version
    assert load_policy(v1)[2]["model_version"] == v1.name


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"item_capacity": (1 << 24) + 1}, "item_capacity"),
        ({"text_dim": 100_000}, "text_dim"),
        ({"dim": 1 << 20, "num_heads": 1}, "dim"),
        ({"max_history": 1 << 20}, "max_history"),
        ({"num_layers": 10_000}, "num_layers"),
        ({"adaptor_hidden": 1 << 30}, "adaptor_hidden"),
        ({"ffn_mult": 1000}, "ffn_mult"),
        ({"num_heads": 512, "dim": 1024}, "num_heads"),
        ({"item_capacity": 1 << 24, "text_dim": 4096}, "item_capacity"),  # each in bounds
        ({"num_layers": 64, "dim": 4096, "ffn_mult": 16}, "num_layers"),
        ({"num_layers": True}, "num_layers"),
        ({"dropout": "0.1"}, "dropout"),
    ],
)
def test_model_config_sizes_are_bounded(fields: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{named}"):
        ModelConfig(**fields)  # type: ignore[arg-type]


def test_model_config_bounds_allow_real_sizes() -> None:
    # A 16.7M-item catalogue at the default widths, and a large MiniLM/BERT-sized model.
    ModelConfig(item_capacity=1 << 24)
    ModelConfig(text_dim=4096, dim=1024, num_layers=24, num_heads=16, ffn_mult=4)


def test_loaders_get_files_only_through_a_verified_manifest(
    two_versions: tuple[Path, Path, Path],
) -> None:
    _root, v1, v2 = two_versions
    manifest = ckpt.read_manifest(v2)
    assert ckpt.checkpoint_file(v2, manifest, "model.safetensors") == v2 / "model.safetensors"
    with pytest.raises(CheckpointError, match="not listed"):
        ckpt.checkpoint_file(v2, manifest, "replay.safetensors")
    with pytest.raises(CheckpointError, match="not listed"):
        ckpt.checkpoint_file(v2, manifest, "../v000000000001/model.safetensors")
    with pytest.raises(CheckpointError, match="not verified"):  # hashes never checked
        ckpt.checkpoint_file(v2, ckpt.read_manifest(v2, verify=False), "model.safetensors")
    with pytest.raises(CheckpointError, match="not verified"):  # verified for another dir
        ckpt.checkpoint_file(v1, manifest, "model.safetensors")
    with pytest.raises(CheckpointError, match="not verified"):  # a plain dict
        ckpt.checkpoint_file(v2, dict(manifest), "model.safetensors")
    # Swapped for a link after verification: still refused when the loader asks for it.
    (v2 / "catalog.json").rename(v2 / "catalog.bak")
    (v2 / "catalog.json").symlink_to(v2 / "catalog.bak")
    with pytest.raises(CheckpointError, match="symbolic link"):
        ckpt.checkpoint_file(v2, manifest, "catalog.json")


@pytest.mark.parametrize("name", ["../x.bin", "/tmp/x.bin", "a/b.bin", ".hidden", "manifest.json"])
def test_writer_refuses_names_readers_would_refuse(tmp_path: Path, name: str) -> None:
    def write(p: Path) -> None:
        p.write_bytes(b"x")

    with pytest.raises(ValueError, match="bad checkpoint file name"):
        ckpt.write_checkpoint(tmp_path, 1, {name: write}, {})
    assert [p.name for p in tmp_path.iterdir()] == []
