"""``userstream bench train`` on a small catalogue: the report's interface fields."""

from __future__ import annotations

import torch

from model.step_bench import BareSASRec, TrainBenchConfig, run_train_bench
from userstream.settings import Settings


def test_bench_train_reports_every_field(tmp_path):
    cfg = TrainBenchConfig(items=300, large_items=3000, users=40, steps=2, warmup=1)
    settings = Settings(data_dir=tmp_path, train_batch_size=8, max_len=12, sampled_negatives=256)
    report = run_train_bench(settings, cfg)
    for key in ("bare_s", "live_next_s", "live_default_s", "sampled_s", "large_full_s",
                "large_sampled_s"):  # fmt: skip
        assert report[key] > 0, key
    assert report["live_vs_bare_ratio"] == round(report["live_next_s"] / report["bare_s"], 3)
    assert report["step_ratio_100k_vs_10k"] > 0 and report["step_ratio_100k_vs_10k_full"] > 0
    assert (report["items"], report["large_items"]) == (300, 3000)


def test_the_bare_sasrec_learns_the_next_item():
    torch.manual_seed(0)
    model = BareSASRec(n_items=21, max_len=8, hidden=16, layers=1, heads=2, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seqs = torch.stack([(torch.arange(9) + s) % 20 + 1 for s in range(20)])  # walks 1..20
    first = None
    for _ in range(150):
        loss = model.loss(seqs[:, :-1], seqs[:, 1:])
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * first, (first, float(loss.detach()))
