from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from userstream.cli import build_parser
from userstream.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_env_vars_override_defaults(monkeypatch):
    monkeypatch.setenv("SEQUENCE_LENGTH", "50")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092")
    s = Settings()
    assert s.sequence_length == 50
    assert s.effective_kafka == "k1:9092"


def test_toml_file_is_read_and_unknown_keys_raise(tmp_path, monkeypatch):
    good = tmp_path / "good.toml"
    good.write_text('sequence_length = 120\nevents_topic = "clicks"\n')
    monkeypatch.setenv("USERSTREAM_CONFIG", str(good))
    s = Settings()
    assert (s.sequence_length, s.events_topic) == (120, "clicks")
    monkeypatch.setenv("SEQUENCE_LENGTH", "77")  # env beats the file
    assert Settings().sequence_length == 77

    bad = tmp_path / "bad.toml"
    bad.write_text("sequnce_length = 120\n")  # typo must not silently pass
    monkeypatch.setenv("USERSTREAM_CONFIG", str(bad))
    with pytest.raises(ValidationError, match="sequnce_length"):
        Settings()


def test_missing_config_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("USERSTREAM_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match="USERSTREAM_CONFIG"):
        Settings()


def test_inconsistent_values_are_rejected():
    with pytest.raises(ValidationError, match="divisible"):
        Settings(hidden_size=30, num_heads=4)
    with pytest.raises(ValidationError, match="max_len"):
        Settings(max_len=300, sequence_length=200)


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, flags=re.M))
    fields = {name.upper() for name in Settings.model_fields}
    assert documented == fields


def test_readme_quick_start_has_the_two_commands_and_ci_uses_the_second():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2
    assert "userstream up" in block[0]
    assert "pytest" in block[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert block[1] in ci


def test_cli_has_every_process_command():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for cmd in ("up", "stream-worker", "train-worker", "api", "replay", "generate"):
        assert cmd in sub.choices
    args = parser.parse_args(["replay", "x.inter", "--format", "movielens", "--rate", "0"])
    assert (args.format, args.rate) == ("movielens", 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["replay", "x", "--format", "parquet"])
