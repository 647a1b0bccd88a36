"""End to end through the CLI functions: ``userstream train`` then ``evaluate``
on a small generated data set where the next item is predictable (seconds)."""

from __future__ import annotations

import json
import random

import pytest

from model.checkpoint import latest_checkpoint
from model.recommend import NextItemModel
from userstream.cli import main

GROUPS, RING = 8, 12  # 96 items: each user walks a ring of 12 items


def write_rings(path, n_users=240, seed=0):
    rng = random.Random(seed)
    lines = []
    for u in range(1, n_users + 1):
        g, start, n = rng.randrange(GROUPS), rng.randrange(RING), rng.randint(5, 9)
        items = [1 + g * RING + (start + t) % RING for t in range(n)]
        lines.append(" ".join(map(str, [u, *items])))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def tiny_args():
    return [
        "--max-epochs", "12", "--patience", "12", "--train-batch-size", "32",
        "--learning-rate", "3e-3", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
        "--max-len", "8", "--dropout", "0.1", "--threads", "1", "--no-progress",
    ]  # fmt: skip


def test_train_then_evaluate_via_the_cli(tmp_path, tiny_args, capsys, monkeypatch):
    monkeypatch.delenv("USERSTREAM_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no userstream.toml here
    data = tmp_path / "rings.txt"
    write_rings(data)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--format", "amazon-seq", "--out", str(out), *tiny_args]) == 0  # fmt: skip
    log = json.loads((out / "train_log.json").read_text())
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "latest").is_file()
    assert log["config"]["model"]["dropout"] == 0.1 and log["data"]["users"] == 240
    assert 1 <= log["best_epoch"] <= 12 and len(log["history"]) >= log["best_epoch"]
    best = max(h["valid_NDCG@10"] for h in log["history"])
    assert log["best_valid"]["NDCG@10"] == pytest.approx(best)  # selected on validation

    report = tmp_path / "report.json"
    args = ["evaluate", "--data", str(data), "--format", "amazon-seq"]
    assert main([*args, "--checkpoint", str(out), "--report", str(report), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "NDCG@10" in printed and "test" in printed
    r = json.loads(report.read_text())
    assert set(r["test"]) == {f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)}
    assert {"HR@10", "NDCG@10"} <= set(r["valid"])
    assert r["users"] == 240 and r["items"] == GROUPS * RING
    # the checkpoint is the best one: evaluate reproduces the validation it was chosen on
    assert r["valid"]["NDCG@10"] == pytest.approx(log["best_valid"]["NDCG@10"], abs=1e-6)
    # the ring is learnable: far above chance (about 10/90 = 0.11 HR@10)
    assert r["test"]["HR@10"] > 0.6, r
    assert r["test"]["HR@5"] <= r["test"]["HR@10"] <= r["test"]["HR@20"]
    assert r["test"]["NDCG@10"] <= r["test"]["HR@10"]


def test_select_last_keeps_the_last_epoch_with_the_profile_objectives(tmp_path, tiny_args):
    """``--select last`` (fixed budget, no selection) with the bag, future and
    item-bag tasks on: the kept checkpoint is the final epoch's (with its profile
    table), and the three losses are logged and fall."""
    data = tmp_path / "rings.txt"
    write_rings(data)
    out = tmp_path / "run"
    args = [a if a != "12" else "4" for a in tiny_args]  # 4 epochs
    weights = ["--next-weight", "0", "--bag-weight", "1", "--future-weight", "1",
               "--item-bag-weight", "1"]  # fmt: skip
    with pytest.raises(SystemExit, match="--examples windows"):  # prefixes feed next-item only
        main(["train", "--data", str(data), "--format", "amazon-seq", "--out", str(out),
              "--examples", "prefixes", *weights, *args])  # fmt: skip
    assert main(["train", "--data", str(data), "--format", "amazon-seq", "--out", str(out),
                 "--select", "last", "--examples", "windows", *weights, *args]) == 0  # fmt: skip
    log = json.loads((out / "train_log.json").read_text())
    assert log["config"]["select"] == "last" and log["best_epoch"] == len(log["history"]) == 4
    first, last = log["history"][0], log["history"][-1]
    assert "next" not in last and last["bag"] < first["bag"] and last["future"] < first["future"]
    assert last["item_bag"] < first["item_bag"]
    assert "ckpt-00000004.pt" in (out / "latest").read_text()
    assert NextItemModel.load(latest_checkpoint(out)).encoder.config.profile_items


def test_evaluate_without_a_checkpoint_says_so(tmp_path):
    data = tmp_path / "rings.txt"
    write_rings(data, n_users=10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(["evaluate", "--data", str(data), "--format", "amazon-seq", "--checkpoint", str(tmp_path / "empty")])  # fmt: skip


def test_prefix_examples_train_the_next_item_task(tmp_path, tiny_args):
    """``--examples prefixes``: one example per target for the next-item task, the
    other tasks on the users' windows in the same steps; the ring is still learned."""
    data = tmp_path / "rings.txt"
    write_rings(data)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--format", "amazon-seq", "--out", str(out),
                 "--examples", "prefixes", *tiny_args]) == 0  # fmt: skip
    log = json.loads((out / "train_log.json").read_text())
    # every training step after a user's first is one example: 240 users, 5-9 steps, 2 held out
    assert log["data"]["train_examples"] == log["data"]["train_targets"] > 240
    assert log["data"]["train_windows"] == 240  # what cloze and contrastive read
    assert set(log["history"][-1]) >= {"next", "mlm", "contrastive", "loss"}  # all three tasks
    assert log["best_valid"]["HR@10"] > 0.6, log["best_valid"]


def test_the_same_command_gives_the_same_run(tmp_path, tiny_args):
    """The seed covers dropout too: two runs of one command log the same losses."""
    data = tmp_path / "rings.txt"
    write_rings(data)
    args = [a if a != "12" else "2" for a in tiny_args]
    logs = []
    for run in ("a", "b"):
        assert main(["train", "--data", str(data), "--format", "amazon-seq",
                     "--out", str(tmp_path / run), *args]) == 0  # fmt: skip
        logs.append(json.loads((tmp_path / run / "train_log.json").read_text())["history"])
    keys = ("loss", "next", "mlm", "contrastive", "valid_NDCG@10")
    assert [[h[k] for k in keys] for h in logs[0]] == [[h[k] for k in keys] for h in logs[1]]


def test_misspelt_or_mistyped_options_are_errors(tmp_path, capsys):
    data = tmp_path / "rings.txt"
    write_rings(data, n_users=10)
    base = ["train", "--data", str(data), "--format", "amazon-seq", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        main([*base, "--hiden-size", "32"])
    assert "unrecognized arguments: --hiden-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--hidden-size", "32.5"])
    assert "invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="hidden_size=30 must be divisible by num_heads=4"):
        main([*base, "--hidden-size", "30", "--num-heads", "4"])
