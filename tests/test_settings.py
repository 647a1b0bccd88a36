from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from userstream.cli import build_parser
from userstream.settings import (
    RANKING_MODEL,
    FinetuneConfig,
    ModelSettings,
    OfflineConfig,
    Settings,
)

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
    for cmd in ("up", "stream-worker", "train-worker", "api", "replay", "generate", "train",
                "evaluate", "finetune", "export", "bench", "settings"):  # fmt: skip
        assert cmd in sub.choices
    args = parser.parse_args(["replay", "x.inter", "--format", "movielens", "--rate", "0"])
    assert (args.format, args.rate) == ("movielens", 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["replay", "x", "--format", "parquet"])


def test_one_learner_configuration_live_and_offline():
    """The live worker's settings ARE a ModelSettings; offline training holds one."""
    live = Settings(hidden_size=32)
    assert isinstance(live, ModelSettings)
    assert live.model_settings() == ModelSettings(hidden_size=32)
    assert isinstance(OfflineConfig().model, ModelSettings)
    assert OfflineConfig().model == RANKING_MODEL
    # the preset differs from the live defaults only where chosen on Beauty validation
    changed = {k for k in ModelSettings.model_fields if getattr(RANKING_MODEL, k) != getattr(live.model_settings(), k)} - {"hidden_size"}  # fmt: skip
    assert changed == {"mlm_weight", "contrastive_weight", "weight_decay"}
    # no defaults of their own for task weights anywhere else
    from model.tasks import LossWeights

    assert LossWeights.of(live).contrastive == live.contrastive_weight == 1.0


def test_every_configuration_rejects_typos_and_wrong_types():
    for bad in ({"hiden_size": 32}, {"hidden_size": 64.5}, {"positions": "sideways"}):
        with pytest.raises(ValidationError):
            ModelSettings(**bad)
        with pytest.raises(ValidationError):
            Settings().replace(**bad)
        with pytest.raises(ValidationError):
            OfflineConfig().with_model(**bad)
    with pytest.raises(ValidationError):
        OfflineConfig(max_epoch=3)
    with pytest.raises(ValidationError, match="--examples windows"):
        OfflineConfig(examples="prefixes").with_model(next_weight=0.0)
    with pytest.raises(ValidationError):
        FinetuneConfig(epochs="many")
    # a derivable field set by hand is no longer derived
    c = OfflineConfig().with_model(dropout=0.3)
    assert c.model.dropout == 0.3 and "dropout" not in c.derive and "train_batch_size" in c.derive


def test_building_the_command_line_imports_no_torch():
    """Every `userstream ...` command builds the whole parser first; a stream
    worker restarted by the supervisor must not pay for importing torch."""
    import subprocess
    import sys

    code = ("import sys; from userstream.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_as_env_reveals_secrets_for_child_processes(monkeypatch):
    from userstream.settings import Settings

    monkeypatch.setenv("PSEUDONYM_KEY", "s3cret")
    env = Settings().as_env()
    assert env["PSEUDONYM_KEY"] == "s3cret" and "**" not in env["PSEUDONYM_KEY"]
    monkeypatch.delenv("PSEUDONYM_KEY")
    assert "PSEUDONYM_KEY" not in Settings().as_env()
