"""Shared bits of the benchmark scripts: machine/version info, JSON output, paths."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "out"

if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def data_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"{path} is absent: the shared public data sets are not beside this clone")
    return path


def machine() -> dict[str, Any]:
    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "versions": {p: v(p) for p in ("userstream", "torch", "numpy", "scikit-learn")},
        "load_avg_1m": os.getloadavg()[0],
    }


def write_json(name: str, payload: dict[str, Any], out_dir: Path = OUT) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{name}-{stamp}.json"
    payload = {"benchmark": name, "written_at": stamp, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def threads(n: int) -> None:
    """Pin torch threads (2 shared cores here: 1 by default)."""
    import torch

    torch.set_num_threads(max(1, n))
