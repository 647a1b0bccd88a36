"""LOG_FORMAT=json gives one parseable object per line in every process (here:
the CLI's setup and the stream worker's Faust logging config), and the sampled access
log names route templates, never the user id in the path."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.access_log import AccessLogMiddleware
from userstream.logs import dict_config


def test_the_cli_logs_json_lines_when_asked(monkeypatch, capsys):
    from userstream.cli import _setup_logging

    monkeypatch.setenv("LOG_FORMAT", "json")
    _setup_logging(verbose=False)
    try:
        logging.getLogger("userstream.test").warning("lag %d events", 7)
        logging.getLogger("kafka.conn").info("a kafka-python connection line")  # kept out
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1
        rec = json.loads(lines[0])
        assert (rec["level"], rec["logger"], rec["message"]) == ("WARNING", "userstream.test",
                                                                 "lag 7 events")  # fmt: skip
    finally:
        monkeypatch.setenv("LOG_FORMAT", "text")
        _setup_logging(verbose=False)


def test_the_faust_logging_config_uses_the_same_formatter():
    import logging.config

    cfg = dict_config("json", "info")
    logging.config.dictConfig(cfg)
    handler = logging.getLogger().handlers[0]
    assert type(handler.formatter).__name__ == "JsonFormatter"
    logging.config.dictConfig(dict_config("text", "info"))


def test_the_access_log_samples_and_logs_route_templates(caplog):
    app = FastAPI()

    @app.get("/users/{user_id}/similar")
    def similar(user_id: str) -> dict:
        return {"user": user_id}

    app.add_middleware(AccessLogMiddleware, sample=1.0)
    with caplog.at_level(logging.INFO, logger="userstream.access"):
        client = TestClient(app)
        assert client.get("/users/alice-secret/similar").status_code == 200
        assert client.get("/nowhere").status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "userstream.access"]
    assert lines[0].startswith("GET /users/{user_id}/similar 200 ")
    assert lines[1].startswith("GET (no route) 404 ")
    assert not any("alice-secret" in line for line in lines)
