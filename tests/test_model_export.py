"""``userstream export``: a checkpoint as a Hugging Face folder that
``transformers.AutoModel`` loads (after ``import model``) with the same user
embeddings as the checkpoint itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import latest_checkpoint
from model.trainer import Trainer
from tests.helpers import tiny_settings
from tests.test_model import planted
from userstream.cli import main


@pytest.fixture
def checkpoint(tmp_path):
    s = tiny_settings(tmp_path, max_len=12, sequence_length=24, item_bag_weight=1.0)
    trainer = Trainer(s)
    seqs, _ = planted(n_users=40, length=16)
    trainer.learn_many(seqs, steps=4)
    trainer.save(s.checkpoint_dir)
    return s, trainer, seqs


def test_export_round_trip_gives_the_checkpoints_embeddings(tmp_path, checkpoint):
    s, trainer, seqs = checkpoint
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(s.checkpoint_dir), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "vocab.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "userstream" and config["encoder"]["hidden"] == 32

    from transformers import AutoConfig, AutoModel

    import model  # noqa: F401  (registers the Auto classes)

    hf = AutoModel.from_pretrained(out)
    assert (
        type(hf).__name__ == "UserstreamModel" and AutoConfig.from_pretrained(out).hidden_size == 32
    )
    np.testing.assert_allclose(hf.embed_many(seqs), trainer.embed_many(seqs), atol=1e-6)
    # the forward pass gives the same tensors as the encoder itself
    from model.batching import make_batch

    c = trainer.config
    b = make_batch(seqs[:4], trainer.items, trainer.behaviors, c.max_len, c.n_gap_buckets)
    with torch.inference_mode():
        got = hf(b.items, b.behaviors, b.gaps)
        trainer.encoder.eval()
        want = trainer.encoder.user_embedding(b.items, b.behaviors, b.gaps)
    assert got.last_hidden_state.shape == (4, c.max_len, c.hidden)
    torch.testing.assert_close(got.user_embedding, want)


def test_a_fresh_process_loads_it_after_import_model(tmp_path, checkpoint):
    s, trainer, seqs = checkpoint
    out = tmp_path / "hf"
    main(["export", "--checkpoint", str(latest_checkpoint(s.checkpoint_dir)), "--out", str(out)])
    np.save(tmp_path / "want.npy", trainer.embed_many(seqs[:3]))
    code = f"""
import numpy as np, model
from transformers import AutoModel
from model.batching import make_batch
from tests.test_model import planted
hf = AutoModel.from_pretrained({str(out)!r})
seqs, _ = planted(n_users=40, length=16)
np.testing.assert_allclose(hf.embed_many(seqs[:3]), np.load({str(tmp_path / "want.npy")!r}), atol=1e-6)
"""
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1]
    )


def test_export_without_a_checkpoint_or_vocabulary_says_what_to_do(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(["export", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    s, _, _ = checkpoint
    out = tmp_path / "hf"
    main(["export", "--checkpoint", str(s.checkpoint_dir), "--out", str(out)])
    (out / "vocab.json").unlink()
    from transformers import AutoModel

    with pytest.raises(FileNotFoundError, match="userstream export"):
        AutoModel.from_pretrained(out)
