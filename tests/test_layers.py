"""The import direction of docs/architecture.md, checked by walking every import.

Layers, lowest first: the foundation (``userstream.settings``, ``.types``,
``.stores``, ``.embedded``) <- ``stream`` <- ``model`` <- ``serving`` <- the
command line (``userstream.cli``, ``userstream.stack``). A module may import
its own layer and the ones below it, never one above; imports made only for
type checking count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("userstream", "stream", "model", "serving")
LAYERS = (  # (name, module prefixes), lowest first
    ("foundation", ("userstream.settings", "userstream.types", "userstream.stores",
                    "userstream.embedded", "userstream")),
    ("stream", ("stream",)),
    ("model", ("model",)),
    ("serving", ("serving",)),
    ("cli", ("userstream.cli", "userstream.stack", "userstream.supervisor", "userstream.soak",
             "userstream.soak_load", "userstream.freshness", "userstream.query_bench",
             "userstream.bench_env", "userstream.scale", "userstream.ingest_bench",
             "userstream.__main__")),
)  # fmt: skip


def layer_of(module: str) -> int | None:
    """The layer of a project module (the longest matching prefix wins)."""
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every project import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # submodules
    return [(line, m) for line, m in out if m.split(".")[0] in PACKAGES]


def project_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_has_a_layer():
    assert project_modules(), "no project modules found"
    for path in project_modules():
        assert layer_of(module_name(path)) is not None, path


def test_imports_flow_one_way():
    wrong = []
    for path in project_modules():
        me = layer_of(module_name(path))
        for line, target in imports(path):
            theirs = layer_of(target)
            if theirs is not None and theirs > me:
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line} ({LAYERS[me][0]}) imports {target} "
                    f"({LAYERS[theirs][0]})"
                )
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    "source, allowed",
    [("serving", "model"), ("model", "stream"), ("stream", "userstream.stores")],
)
def test_the_checker_sees_real_imports(source, allowed):
    """Guards the test itself: each stage does import the one below it, so a
    checker that found nothing would fail here."""
    found = {t for p in (ROOT / source).rglob("*.py") for _, t in imports(p)}
    assert any(t == allowed or t.startswith(allowed + ".") for t in found)
    fake = ROOT / source / "__init__.py"
    assert layer_of(module_name(fake)) > layer_of(allowed)


def test_a_violation_is_reported(tmp_path, monkeypatch):
    """A stream module importing serving is caught (the check can fail)."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "stream" / "probe.py").write_text("import os\nfrom serving.api import create_app\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"stream/probe.py:2 \(stream\) imports serving"):
        test_imports_flow_one_way()
