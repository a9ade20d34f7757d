"""The error tree: codes are unique, the SDK maps them back, foreign errors map totally."""

from __future__ import annotations

import inspect
import subprocess
import sys

import sqlalchemy.exc

from broker import db, errors
from broker.client import _error_from


def test_codes_are_unique_and_statuses_are_http_errors() -> None:
    classes = errors.all_error_classes()
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    assert all(400 <= c.status < 600 for c in classes)


def test_every_code_maps_back_to_its_class() -> None:
    import httpx

    for cls in errors.all_error_classes():
        exc = cls("m", call_id="call_1")
        response = httpx.Response(exc.status, json=exc.to_dict())
        back = _error_from(response)
        assert type(back) is cls and back.message == "m" and back.call_id == "call_1"


def test_envelope_shape() -> None:
    body = errors.PolicyDenied("no", call_id="c", details={"rule": None}).to_dict()
    assert body == {
        "error": {"code": "policy_denied", "message": "no", "call_id": "c", "rule": None}
    }


def test_every_sqlalchemy_error_translates() -> None:
    for _name, cls in inspect.getmembers(sqlalchemy.exc, inspect.isclass):
        if not issubclass(cls, sqlalchemy.exc.SQLAlchemyError):
            continue
        exc = cls.__new__(cls)  # constructors differ; translation must not depend on them
        Exception.__init__(exc, "driver detail")
        out = db.translate(exc)
        assert isinstance(out, errors.StorageUnavailable)
        assert isinstance(db.translate(exc, errors.AuditUnavailable), errors.AuditUnavailable)
        assert "driver" not in out.message


def test_importing_the_sdk_pulls_in_no_server_dependency() -> None:
    code = (
        "import sys, broker; broker.BrokerClient; "
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'hvac', 'casbin', 'aiohttp', 'uvicorn') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
