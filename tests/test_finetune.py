"""``userstream finetune``: a head on the pre-trained encoder for a labelled user
attribute, from a labels file, on a planted stream whose groups are the labels."""

from __future__ import annotations

import csv
import json

import pytest

from model.finetune import read_labels
from model.trainer import Trainer
from tests.helpers import tiny_settings
from tests.test_model import planted
from userstream.cli import main


def write_events(path, seqs) -> list[str]:
    users = [f"user{u}" for u in range(len(seqs))]
    with path.open("w") as fh:
        for user, seq in zip(users, seqs, strict=True):
            for b in seq:
                row = {"user_id": user, "item_id": b.item_id, "behavior": b.behavior, "ts": b.ts}
                fh.write(json.dumps(row) + "\n")
    return users


def test_finetune_learns_the_planted_groups_and_predicts_every_user(tmp_path):
    seqs, groups = planted(n_users=120, groups=4, length=16)
    users = write_events(tmp_path / "events.jsonl", seqs)
    s = tiny_settings(tmp_path, max_len=12, sequence_length=24)
    trainer = Trainer(s)
    trainer.learn_many(seqs, steps=20)
    trainer.save(s.checkpoint_dir)
    labelled = users[:100]  # the last 20 users have no label: predicted, not trained on
    with (tmp_path / "labels.tsv").open("w") as fh:  # RecBole-style header, tab separated
        fh.write("user_id:token\tgroup:token\n")
        for u in labelled:
            fh.write(f"{u}\tg{groups[users.index(u)]}\n")
        fh.write("ghost\tg0\n")  # a labelled user without behaviors: reported, left out
    out = tmp_path / "ft"
    args = ["finetune", "--checkpoint", str(s.checkpoint_dir), "--data", str(tmp_path / "events.jsonl"),
            "--format", "jsonl", "--labels", str(tmp_path / "labels.tsv"), "--label-column", "group",
            "--out", str(out), "--epochs", "25", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == 4 and report["unmatched_users"] == 1
    assert (
        report["train_users"] + report["held_out_users"] == 100 and report["held_out_users"] >= 16
    )
    held = report["held_out"]
    assert held["majority_accuracy"] <= 0.35  # four balanced groups
    assert held["accuracy"] >= 0.8 and held["macro_f1"] >= 0.75, held
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["user_id"] for r in rows] == users  # every user with behaviors
    right = sum(r["group"] == f"g{groups[users.index(r['user_id'])]}" for r in rows[100:])
    assert right >= 16, rows[100:]  # unlabelled users are predicted too
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)
    assert (out / "classifier.pt").stat().st_size > 0


def test_labels_files_are_read_strictly(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("user_id,label,x\nu1,a,1\nu2,b,2\n")
    assert read_labels(p, "user_id", "label") == {"u1": "a", "u2": "b"}
    with pytest.raises(ValueError, match="no column 'gender'"):
        read_labels(p, "user_id", "gender")
    p.write_text("user_id,label\nu1,a\nu1,b\n")
    with pytest.raises(ValueError, match=r"l.csv:3: user 'u1' has two labels"):
        read_labels(p, "user_id", "label")
    p.write_text("user_id,label\nu1,\n")
    with pytest.raises(ValueError, match="empty user id or label"):
        read_labels(p, "user_id", "label")


def test_one_class_is_a_clear_error(tmp_path):
    seqs, _ = planted(n_users=8, groups=2, length=6)
    users = write_events(tmp_path / "e.jsonl", seqs)
    s = tiny_settings(tmp_path, max_len=6, sequence_length=12)
    Trainer(s).save(s.checkpoint_dir)
    (tmp_path / "l.csv").write_text("user_id,label\n" + "".join(f"{u},same\n" for u in users))
    with pytest.raises(SystemExit, match="at least two"):
        main(["finetune", "--checkpoint", str(s.checkpoint_dir), "--data", str(tmp_path / "e.jsonl"),
              "--format", "jsonl", "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "o")])  # fmt: skip
