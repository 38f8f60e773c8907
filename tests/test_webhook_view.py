"""Tests for webhook_view.py: real Django (test client, ASGI request), gunicorn.

Django is configured once, from tests/django_project, when this file's tests
start; other test files do not use Django. Each test overrides the webhook's
settings and clears the matching environment variables.
"""

import datetime
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import django
import pytest
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.test import Client, RequestFactory, override_settings

import webhook_view
from conftest import ROOT
from webhook_view import MAX_BODY_BYTES, signature

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SECRET = "test-secret-0123456789"
DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"
WEBHOOK_ENV = (
    "GITHUB_WEBHOOK_SECRET",
    "DEPLOY_TRIGGER_FILE",
    "DEPLOY_BRANCH",
    "DEPLOY_REPOSITORY",
)
TRIGGER_KEYS = [
    "ref", "after", "before", "delivery", "repository", "pusher", "received_at"
]
AFTER = "4f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"
BEFORE = "9c2a6d8e1f3b4a5c6d7e8f90a1b2c3d4e5f60718"
ZEROS = "0" * 40
PUSH_TRIGGER = {
    "ref": "refs/heads/main",
    "after": AFTER,
    "before": BEFORE,
    "delivery": DELIVERY,
    "repository": "octo-org/shop",
    "pusher": "alice",
    "received_at": "<now>",
}
TRIGGERED = {"message": "deploy triggered", "after": AFTER}
TOO_BIG = (413, {"error": "body over 26214400 bytes (GitHub's cap)"})
VECTOR_SECRET = "It's a Secret to Everybody"
VECTOR_SIGNATURE = (
    "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
)
SERVER_START_SECONDS = 30


@pytest.fixture(scope="module", autouse=True)
def django_project():
    if not settings.configured:
        with mock.patch.dict(
            os.environ, DJANGO_SETTINGS_MODULE="tests.django_project.settings"
        ):
            django.setup()


@pytest.fixture(autouse=True)
def trigger_file(tmp_path, monkeypatch):
    """The trigger path every test's view writes to, in an existing folder."""
    for name in WEBHOOK_ENV:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "shared" / "deploy_trigger.txt"
    path.parent.mkdir()
    with override_settings(
        GITHUB_WEBHOOK_SECRET=SECRET,
        DEPLOY_TRIGGER_FILE=str(path),
        DEPLOY_BRANCH=None,
        DEPLOY_REPOSITORY=None,
    ):
        yield path


def fixture(name):
    return (FIXTURES / name).read_bytes()


def fixture_json(name):
    return json.loads(fixture(name))


def encode(payload):
    return json.dumps(payload).encode("utf-8")


def push_with(**fields):
    """push.json with some top-level fields replaced (None: removed)."""
    payload = fixture_json("push.json")
    payload.update(fields)
    return encode({k: v for k, v in payload.items() if v is not None})


def github_headers(body, event="push", secret=SECRET, **changes):
    """The headers GitHub sends with `body`; a change to None drops a header."""
    headers = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": DELIVERY,
        "X-Hub-Signature-256": signature(secret, body),
    }
    headers.update(changes)
    return {k: v for k, v in headers.items() if v is not None}


def deliver(body, event="push", content_type=JSON_TYPE, client=None, headers=None,
            secret=SECRET, **extra):
    """POST `body` to /webhook/ the way GitHub does; returns the response."""
    client = client or Client(enforce_csrf_checks=True)
    all_headers = github_headers(body, event, secret, **(headers or {}))
    return client.post(
        "/webhook/", body, content_type=content_type, headers=all_headers, **extra
    )


def outcome(response):
    return response.status_code, json.loads(response.content)


def read_trigger(path):
    """The trigger's fields, after checking its format; received_at -> "<now>"."""
    text = path.read_text(encoding="utf-8")
    trigger = json.loads(text)
    assert text == json.dumps(trigger, ensure_ascii=False, separators=(",", ":")) + "\n"
    assert list(trigger) == TRIGGER_KEYS
    received = datetime.datetime.strptime(trigger["received_at"], "%Y-%m-%dT%H:%M:%SZ")
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs(now - received) < datetime.timedelta(minutes=1)
    trigger["received_at"] = "<now>"
    return trigger


def view_records(caplog):
    """The log records of webhook_view (Django logs each 4xx/5xx as well)."""
    return [r for r in caplog.records if r.name == "webhook_view"]


def padded_push(size):
    """A push.json exactly `size` bytes long, padded with an extra field."""
    payload = fixture_json("push.json")
    payload["padding"] = ""
    payload["padding"] = "x" * (size - len(encode(payload)))
    body = encode(payload)
    assert len(body) == size
    return body


# Signature


def test_signature_matches_githubs_documented_vector():
    assert signature(VECTOR_SECRET, b"Hello, World!") == VECTOR_SIGNATURE


def test_documented_vector_passes_verification():
    webhook_view.verify_signature(VECTOR_SECRET, b"Hello, World!", VECTOR_SIGNATURE)


def test_signed_push_triggers_deploy(trigger_file):
    assert outcome(deliver(fixture("push.json"))) == (202, TRIGGERED)
    assert read_trigger(trigger_file) == PUSH_TRIGGER


def test_missing_signature_is_refused(trigger_file):
    response = deliver(fixture("push.json"), headers={"X-Hub-Signature-256": None})
    assert outcome(response) == (403, {"error": "missing X-Hub-Signature-256 header"})
    assert not trigger_file.exists()


def test_sha1_signature_alone_is_refused(trigger_file):
    body = fixture("push.json")
    headers = {"X-Hub-Signature-256": None, "X-Hub-Signature": "sha1=" + "a" * 40}
    response = deliver(body, headers=headers)
    assert outcome(response) == (403, {"error": "missing X-Hub-Signature-256 header"})
    assert not trigger_file.exists()


@pytest.mark.parametrize(
    "header",
    [
        "sha1=" + "a" * 40,
        "SHA256=" + "a" * 64,
        "sha256:" + "a" * 64,
        "a" * 64,
        "sha256=",
        "sha256=" + "a" * 63,
        "sha256=" + "a" * 65,
        "sha256=" + "g" * 64,
        "sha256= " + "a" * 63,
        "sha256=" + "\u00e9" * 64,
        "sha256=" + "a" * 62 + "\u00ff\u00fe",
    ],
    ids=[
        "sha1-prefix", "uppercase-prefix", "colon", "no-prefix", "empty-hex",
        "63-hex", "65-hex", "not-hex", "space", "non-ascii", "latin-1-bytes",
    ],
)
def test_malformed_signature_is_refused(trigger_file, header):
    response = deliver(fixture("push.json"), headers={"X-Hub-Signature-256": header})
    assert outcome(response) == (403, {"error": "malformed X-Hub-Signature-256 header"})
    assert not trigger_file.exists()


def test_signature_with_another_secret_is_refused(trigger_file):
    response = deliver(fixture("push.json"), secret="not-the-secret")
    assert outcome(response) == (
        403, {"error": "X-Hub-Signature-256 does not match the body"}
    )
    assert not trigger_file.exists()


def test_signature_of_another_body_is_refused(trigger_file):
    header = signature(SECRET, fixture("push.tag.json"))
    response = deliver(fixture("push.json"), headers={"X-Hub-Signature-256": header})
    assert outcome(response) == (
        403, {"error": "X-Hub-Signature-256 does not match the body"}
    )
    assert not trigger_file.exists()


def test_signature_is_checked_before_the_body_is_parsed(trigger_file):
    response = deliver(b"not json", secret="not-the-secret")
    assert outcome(response) == (
        403, {"error": "X-Hub-Signature-256 does not match the body"}
    )
    assert not trigger_file.exists()


def test_uppercase_hex_signature_is_accepted(trigger_file):
    body = fixture("push.json")
    header = "sha256=" + signature(SECRET, body)[len("sha256="):].upper()
    assert outcome(deliver(body, headers={"X-Hub-Signature-256": header})) == (
        202, TRIGGERED
    )
    assert read_trigger(trigger_file) == PUSH_TRIGGER


def test_non_ascii_secret_is_used_as_utf8(trigger_file):
    secret = "cl\u00e9 secr\u00e8te \U0001f511"
    with override_settings(GITHUB_WEBHOOK_SECRET=secret):
        response = deliver(fixture("push.json"), secret=secret)
    assert outcome(response) == (202, TRIGGERED)
    assert read_trigger(trigger_file) == PUSH_TRIGGER


def test_bad_signature_is_logged_with_address_and_delivery_only(caplog):
    body = fixture("push.json")
    forged = signature("not-the-secret", body)
    with caplog.at_level("INFO", logger="webhook_view"):
        deliver(body, headers={"X-Hub-Signature-256": forged})
    [record] = view_records(caplog)
    assert record.levelname == "WARNING"
    message = record.getMessage()
    assert message == (
        f"refused delivery {DELIVERY} from 127.0.0.1: "
        "403 X-Hub-Signature-256 does not match the body"
    )
    for secretive in (SECRET, forged[len("sha256="):], signature(SECRET, body)[7:]):
        assert secretive not in caplog.text


# Secret configuration


def test_unset_secret_refuses_every_delivery(trigger_file, caplog):
    # The procedure's view fell back to a built-in "defaultsecret".
    with override_settings(GITHUB_WEBHOOK_SECRET=None):
        response = deliver(fixture("push.json"), secret="defaultsecret")
    assert outcome(response) == (
        500, {"error": "GITHUB_WEBHOOK_SECRET is not set on the server"}
    )
    assert not trigger_file.exists()
    assert [r.levelname for r in view_records(caplog)] == ["ERROR"]


def test_empty_secret_refuses_every_delivery(trigger_file):
    with override_settings(GITHUB_WEBHOOK_SECRET=""):
        response = deliver(fixture("push.json"), secret="")
    assert outcome(response) == (
        500, {"error": "GITHUB_WEBHOOK_SECRET is not set on the server"}
    )
    assert not trigger_file.exists()


def test_empty_secret_in_environment_refuses_every_delivery(trigger_file, monkeypatch):
    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", "")
    with override_settings(GITHUB_WEBHOOK_SECRET=None):
        response = deliver(fixture("push.json"), secret="")
    assert response.status_code == 500
    assert not trigger_file.exists()


def test_settings_fall_back_to_environment(tmp_path, monkeypatch):
    path = tmp_path / "from-env.txt"
    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", "env-secret")
    monkeypatch.setenv("DEPLOY_TRIGGER_FILE", str(path))
    monkeypatch.setenv("DEPLOY_BRANCH", "production")
    with override_settings(GITHUB_WEBHOOK_SECRET=None, DEPLOY_TRIGGER_FILE=None):
        body = push_with(ref="refs/heads/production")
        response = deliver(body, secret="env-secret")
    assert outcome(response) == (202, TRIGGERED)
    assert read_trigger(path) == dict(PUSH_TRIGGER, ref="refs/heads/production")


def test_settings_win_over_environment(trigger_file, monkeypatch):
    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", "env-secret")
    response = deliver(fixture("push.json"), secret="env-secret")
    assert outcome(response) == (
        403, {"error": "X-Hub-Signature-256 does not match the body"}
    )
    assert not trigger_file.exists()


# Method and CSRF


def test_get_is_not_allowed(trigger_file):
    response = Client().get("/webhook/")
    assert outcome(response) == (
        405, {"error": "only POST is allowed: this URL receives GitHub's webhook"}
    )
    assert response["Allow"] == "POST"
    assert not trigger_file.exists()


def test_view_is_exempt_from_csrf_checks(trigger_file):
    # deliver() posts with enforce_csrf_checks=True and no CSRF token.
    assert deliver(fixture("push.json")).status_code == 202
    assert trigger_file.exists()


# Body size and reading


def test_25_mb_push_is_accepted_despite_django_upload_limit(trigger_file):
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE == 2621440
    assert outcome(deliver(padded_push(MAX_BODY_BYTES))) == (202, TRIGGERED)
    assert read_trigger(trigger_file) == PUSH_TRIGGER


def test_push_over_25_mb_is_refused(trigger_file):
    response = deliver(padded_push(MAX_BODY_BYTES + 1))
    assert outcome(response) == TOO_BIG
    assert not trigger_file.exists()


def test_content_length_over_cap_is_refused_without_reading(trigger_file):
    # The test client's stream raises if read past its 2 bytes.
    response = deliver(b"{}", CONTENT_LENGTH=str(MAX_BODY_BYTES + 1))
    assert outcome(response) == TOO_BIG
    assert not trigger_file.exists()


class EndlessBody(io.RawIOBase):
    """A request body that never ends; counts the bytes handed out."""

    def __init__(self):
        super().__init__()
        self.served = 0

    def read(self, size=-1):
        assert size > 0, "an endless body must be read in bounded pieces"
        self.served += size
        return b"x" * size


def asgi_request(body_file, headers):
    """A real Django ASGIRequest with no Content-Length (a chunked upload)."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/webhook/",
        "query_string": b"",
        "client": ("127.0.0.1", 40000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return ASGIRequest(scope, body_file)


def test_endless_body_without_content_length_is_refused_after_cap(trigger_file):
    body = EndlessBody()
    headers = dict(github_headers(b""), **{"Content-Type": JSON_TYPE})
    request = asgi_request(body, headers)
    response = webhook_view.github_webhook(request)
    assert outcome(response) == TOO_BIG
    assert body.served == MAX_BODY_BYTES + 1
    assert not trigger_file.exists()


def test_push_without_content_length_is_read_under_asgi(trigger_file):
    body = fixture("push.json")
    headers = dict(github_headers(body), **{"Content-Type": JSON_TYPE})
    response = webhook_view.github_webhook(asgi_request(io.BytesIO(body), headers))
    assert outcome(response) == (202, TRIGGERED)
    assert read_trigger(trigger_file) == PUSH_TRIGGER


def test_push_without_content_length_under_wsgi_is_refused(trigger_file):
    response = deliver(fixture("push.json"), CONTENT_LENGTH="")
    assert outcome(response) == (411, {"error": "Content-Length header required"})
    assert not trigger_file.exists()


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "\u0661\u0662"])
def test_invalid_content_length_is_refused(trigger_file, length):
    response = deliver(fixture("push.json"), CONTENT_LENGTH=length)
    assert outcome(response) == (400, {"error": "invalid Content-Length header"})
    assert not trigger_file.exists()


def factory_request(body):
    return RequestFactory().post(
        "/webhook/", body, content_type=JSON_TYPE, headers=github_headers(body)
    )


def test_body_already_read_by_middleware_is_used(trigger_file):
    request = factory_request(fixture("push.json"))
    request.body  # what a body-reading middleware does
    assert outcome(webhook_view.github_webhook(request)) == (202, TRIGGERED)
    assert read_trigger(trigger_file) == PUSH_TRIGGER


def test_body_consumed_by_middleware_stream_read_is_an_error(trigger_file):
    request = factory_request(fixture("push.json"))
    request.read(10)
    assert outcome(webhook_view.github_webhook(request)) == (
        500, {"error": "request body consumed before the webhook view"}
    )
    assert not trigger_file.exists()


class BrokenStream(io.RawIOBase):
    def read(self, size=-1):
        raise OSError("connection reset by peer")


def test_client_disconnect_mid_body_is_refused(trigger_file):
    body = fixture("push.json")
    request = RequestFactory().post(
        "/webhook/", body, content_type=JSON_TYPE, headers=github_headers(body),
        **{"wsgi.input": BrokenStream()},
    )
    assert outcome(webhook_view.github_webhook(request)) == (
        400, {"error": "request body could not be read"}
    )
    assert not trigger_file.exists()


# Content types


def test_form_encoded_push_triggers_deploy(trigger_file):
    response = deliver(fixture("push.form-urlencoded.txt"), content_type=FORM_TYPE)
    assert outcome(response) == (202, TRIGGERED)
    assert read_trigger(trigger_file) == PUSH_TRIGGER


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("application/json; charset=utf-8", "push.json"),
        ("Application/JSON", "push.json"),
        (FORM_TYPE + "; charset=UTF-8", "push.form-urlencoded.txt"),
    ],
)
def test_content_type_parameters_and_case_are_accepted(
    trigger_file, content_type, body
):
    response = deliver(fixture(body), content_type=content_type)
    assert outcome(response) == (202, TRIGGERED)
    assert read_trigger(trigger_file) == PUSH_TRIGGER


@pytest.mark.parametrize(
    "content_type", ["text/plain", "multipart/form-data; boundary=x", ""]
)
def test_other_content_type_is_refused(trigger_file, content_type):
    response = deliver(fixture("push.json"), content_type=content_type)
    assert outcome(response) == (415, {
        "error": "unsupported Content-Type (use application/json or "
        "application/x-www-form-urlencoded)"
    })
    assert not trigger_file.exists()


# Bad input after a good signature


@pytest.mark.parametrize(
    "body, error",
    [
        (b"not json", "payload is not valid JSON"),
        (b"[1,2]", "payload is not a JSON object"),
        (b"null", "payload is not a JSON object"),
        (b'"refs/heads/main"', "payload is not a JSON object"),
        (b"[" * 100000, "payload is not valid JSON"),
        (b'{"ref":"refs/heads/main\xff"}', "body is not UTF-8"),
        (push_with(ref=None), "ref is missing"),
        (push_with(ref=["refs/heads/main"]), "ref must be a string"),
        (push_with(after=None), "after is missing"),
        (push_with(after=123), "after must be a string"),
        (push_with(after="main"), "after is not a commit id"),
        (push_with(after=AFTER.upper()), "after is not a commit id"),
        (push_with(before=None), "before is missing"),
        (push_with(before=AFTER[:39]), "before is not a commit id"),
        (push_with(deleted="false"), "deleted must be true or false"),
        (push_with(repository=None), "repository is missing"),
        (push_with(repository="octo-org/shop"), "repository must be an object"),
        (push_with(repository={"full_name": 7}),
         "repository.full_name must be a string"),
        (push_with(repository={"name": "shop", "owner": "octo-org"}),
         "repository.owner must be an object"),
        (push_with(pusher="alice"), "pusher must be an object"),
        (push_with(pusher={"name": 1}), "pusher.name must be a string"),
    ],
    ids=[
        "not-json", "list", "null", "string", "deep-nesting", "invalid-utf8",
        "ref-missing", "ref-list", "after-missing", "after-number", "after-word",
        "after-uppercase", "before-missing", "before-short", "deleted-string",
        "repository-missing", "repository-string", "full-name-number",
        "owner-string", "pusher-string", "pusher-name-number",
    ],
)
def test_bad_json_payload_is_refused(trigger_file, body, error):
    assert outcome(deliver(body)) == (400, {"error": error})
    assert not trigger_file.exists()


def test_empty_body_is_refused(trigger_file):
    response = deliver(b"", CONTENT_TYPE=JSON_TYPE, CONTENT_LENGTH="0")
    assert outcome(response) == (400, {"error": "empty body"})
    assert not trigger_file.exists()


@pytest.mark.parametrize(
    "body, error",
    [
        (b"zen=hello", "form body needs exactly one payload field"),
        (b"payload=%7B%7D&payload=%7B%7D", "form body needs exactly one payload field"),
        (b"payload=%7B%22ref%22%3A%22%FF%22%7D", "invalid form body"),
        (b"&".join([b"a=1"] * 11), "invalid form body"),
        (b"payload=not+json", "payload is not valid JSON"),
        (b"payload=%5B1%2C2%5D", "payload is not a JSON object"),
    ],
    ids=["no-payload", "two-payloads", "invalid-utf8-escape", "too-many-fields",
         "not-json", "list"],
)
def test_bad_form_payload_is_refused(trigger_file, body, error):
    response = deliver(body, content_type=FORM_TYPE)
    assert outcome(response) == (400, {"error": error})
    assert not trigger_file.exists()


# Events


def test_ping_gets_pong(trigger_file):
    response = deliver(fixture("ping.json"), event="ping")
    assert outcome(response) == (200, {"message": "pong"})
    assert not trigger_file.exists()


def test_ping_warns_when_the_trigger_folder_is_missing(trigger_file, tmp_path):
    missing = tmp_path / "not-mounted"
    with override_settings(DEPLOY_TRIGGER_FILE=str(missing / "deploy_trigger.txt")):
        response = deliver(fixture("ping.json"), event="ping")
    assert outcome(response) == (200, {
        "message": "pong",
        "warning": f"the trigger folder {missing} does not exist (is the shared folder mounted?)",
    })


def test_relative_trigger_file_is_refused(trigger_file):
    with override_settings(DEPLOY_TRIGGER_FILE="shared/deploy_trigger.txt"):
        response = deliver(fixture("push.json"))
    assert outcome(response) == (500, {
        "error": "DEPLOY_TRIGGER_FILE must be an absolute path, not 'shared/deploy_trigger.txt'"
    })


def test_other_event_is_ignored(trigger_file):
    response = deliver(fixture("pull_request.json"), event="pull_request")
    assert outcome(response) == (200, {"message": "ignored: pull_request event"})
    assert not trigger_file.exists()


def test_missing_event_header_is_refused(trigger_file):
    response = deliver(fixture("push.json"), headers={"X-GitHub-Event": None})
    assert outcome(response) == (400, {"error": "missing X-GitHub-Event header"})
    assert not trigger_file.exists()


# Pushes


def test_push_creating_the_branch_triggers_deploy(trigger_file):
    after = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d"
    response = deliver(fixture("push.create-branch.json"))
    assert outcome(response) == (202, {"message": "deploy triggered", "after": after})
    assert read_trigger(trigger_file) == dict(PUSH_TRIGGER, after=after, before=ZEROS)


def test_push_to_other_branch_is_ignored(trigger_file):
    response = deliver(push_with(ref="refs/heads/feature/login"))
    assert outcome(response) == (200, {
        "message": "ignored: refs/heads/feature/login is another branch; "
        "only refs/heads/main deploys"
    })
    assert not trigger_file.exists()


def test_tag_push_is_ignored(trigger_file):
    response = deliver(fixture("push.tag.json"))
    assert outcome(response) == (200, {
        "message": "ignored: refs/tags/v1.4.0 is a tag; only refs/heads/main deploys"
    })
    assert not trigger_file.exists()


def test_tag_deletion_is_ignored(trigger_file):
    response = deliver(fixture("push.delete-tag.json"))
    assert outcome(response) == (200, {
        "message": "ignored: refs/tags/v1.3.9 is a tag; only refs/heads/main deploys"
    })
    assert not trigger_file.exists()


def test_push_to_other_ref_is_ignored(trigger_file):
    response = deliver(push_with(ref="refs/notes/commits"))
    assert outcome(response) == (200, {
        "message": "ignored: refs/notes/commits is not a branch; "
        "only refs/heads/main deploys"
    })
    assert not trigger_file.exists()


def test_branch_deletion_is_ignored(trigger_file):
    response = deliver(fixture("push.delete-branch.json"))
    assert outcome(response) == (200, {
        "message": "ignored: refs/heads/main was deleted; nothing to deploy"
    })
    assert not trigger_file.exists()


def test_all_zero_after_counts_as_deletion(trigger_file):
    response = deliver(push_with(after=ZEROS, deleted=None))
    assert outcome(response) == (200, {
        "message": "ignored: refs/heads/main was deleted; nothing to deploy"
    })
    assert not trigger_file.exists()


def test_push_to_configured_branch_triggers_deploy(trigger_file):
    with override_settings(DEPLOY_BRANCH="production"):
        response = deliver(push_with(ref="refs/heads/production"))
    assert outcome(response) == (202, TRIGGERED)
    assert read_trigger(trigger_file) == dict(PUSH_TRIGGER, ref="refs/heads/production")


def test_push_to_main_is_ignored_when_another_branch_is_configured(trigger_file):
    with override_settings(DEPLOY_BRANCH="production"):
        response = deliver(fixture("push.json"))
    assert outcome(response) == (200, {
        "message": "ignored: refs/heads/main is another branch; "
        "only refs/heads/production deploys"
    })
    assert not trigger_file.exists()


def test_push_from_configured_repository_matches_any_case(trigger_file):
    with override_settings(DEPLOY_REPOSITORY="Octo-Org/Shop"):
        response = deliver(fixture("push.json"))
    assert outcome(response) == (202, TRIGGERED)
    assert read_trigger(trigger_file) == PUSH_TRIGGER


def test_push_from_other_repository_is_ignored(trigger_file):
    with override_settings(DEPLOY_REPOSITORY="octo-org/blog"):
        response = deliver(fixture("push.json"))
    assert outcome(response) == (200, {
        "message": "ignored: push to octo-org/shop; only octo-org/blog deploys"
    })
    assert not trigger_file.exists()


def test_legacy_push_without_full_name_names_the_repository(trigger_file):
    assert outcome(deliver(fixture("push.legacy.json"))) == (202, TRIGGERED)
    assert read_trigger(trigger_file) == dict(PUSH_TRIGGER, pusher="none")


def test_legacy_push_matches_configured_repository(trigger_file):
    with override_settings(DEPLOY_REPOSITORY="octo-org/shop"):
        response = deliver(fixture("push.legacy.json"))
    assert outcome(response) == (202, TRIGGERED)
    assert trigger_file.exists()


def test_push_from_unnamed_repository_is_ignored_when_one_is_configured(trigger_file):
    with override_settings(DEPLOY_REPOSITORY="octo-org/shop"):
        response = deliver(push_with(repository={"id": 1}))
    assert outcome(response) == (200, {
        "message": "ignored: push to a repository with no name; "
        "only octo-org/shop deploys"
    })
    assert not trigger_file.exists()


# The trigger file


def test_trigger_stays_small_with_huge_or_unprintable_values(trigger_file):
    pusher = "\U0001f680" * 5000 + "\n"
    delivery = "d\x00" + "\u00e9" * 5000
    body = push_with(pusher={"name": "\ud800ab\x1b" + pusher}, repository={
        "full_name": "\u202e" * 3000,
    })
    response = deliver(body, headers={"X-GitHub-Delivery": delivery})
    assert outcome(response) == (202, TRIGGERED)
    assert trigger_file.stat().st_size < 4096
    assert read_trigger(trigger_file) == dict(
        PUSH_TRIGGER,
        delivery="d?" + "\u00e9" * 198,
        repository="?" * 200,
        pusher="?ab?" + "\U0001f680" * 196,
    )


def test_trigger_replaces_old_content_atomically(trigger_file):
    trigger_file.write_text("deploy")
    old_inode = trigger_file.stat().st_ino
    assert deliver(fixture("push.json")).status_code == 202
    assert read_trigger(trigger_file) == PUSH_TRIGGER
    assert trigger_file.stat().st_ino != old_inode
    assert trigger_file.stat().st_mode & 0o777 == 0o644
    assert os.listdir(trigger_file.parent) == [trigger_file.name]


def test_missing_trigger_folder_is_a_server_error(tmp_path, caplog):
    path = tmp_path / "not-mounted" / "deploy_trigger.txt"
    with override_settings(DEPLOY_TRIGGER_FILE=str(path)):
        response = deliver(fixture("push.json"))
    assert outcome(response) == (500, {
        "error": f"cannot write deploy trigger {path}: No such file or directory"
    })
    assert not path.parent.exists()
    [record] = view_records(caplog)
    assert record.levelname == "ERROR"
    assert str(path) in record.getMessage()


def test_trigger_folder_that_is_a_file_is_a_server_error(tmp_path):
    (tmp_path / "shared-file").write_text("")
    path = tmp_path / "shared-file" / "deploy_trigger.txt"
    with override_settings(DEPLOY_TRIGGER_FILE=str(path)):
        response = deliver(fixture("push.json"))
    assert outcome(response) == (500, {
        "error": f"cannot write deploy trigger {path}: Not a directory"
    })


def test_failed_replace_leaves_no_temp_file(trigger_file):
    trigger_file.mkdir()
    response = deliver(fixture("push.json"))
    assert outcome(response) == (500, {
        "error": f"cannot write deploy trigger {trigger_file}: Is a directory"
    })
    assert os.listdir(trigger_file.parent) == [trigger_file.name]


def test_concurrent_deliveries_never_expose_a_partial_trigger(trigger_file):
    writers, per_writer = 6, 30
    assert deliver(fixture("push.json")).status_code == 202
    sent = {AFTER}
    statuses, reads, broken = [], [], []
    done = threading.Event()

    def write(n):
        client = Client()
        for i in range(per_writer):
            after = "%02x%038x" % (n + 1, i)
            sent.add(after)
            statuses.append(deliver(push_with(after=after), client=client).status_code)

    def read():
        while not done.is_set():
            data = trigger_file.read_bytes()
            try:
                reads.append(json.loads(data)["after"])
            except ValueError:
                broken.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    done.set()
    reader.join(timeout=60)
    assert statuses == [202] * (writers * per_writer)
    assert broken == []
    assert len(reads) > 0 and set(reads) <= sent
    assert read_trigger(trigger_file)["after"] in sent
    assert os.listdir(trigger_file.parent) == [trigger_file.name]


# A real WSGI server


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory):
    """gunicorn serving tests/django_project, configured by environment only."""
    folder = tmp_path_factory.mktemp("gunicorn")
    trigger = folder / "deploy_trigger.txt"
    log_path = folder / "gunicorn.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in WEBHOOK_ENV}
    env.update(GITHUB_WEBHOOK_SECRET=SECRET, DEPLOY_TRIGGER_FILE=str(trigger))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    argv = [
        sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
        "--workers", "1", "--chdir", str(ROOT), "tests.django_project.wsgi:application",
    ]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("gunicorn did not start:\n" + log_path.read_text())
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/webhook/", trigger, log_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def post_over_http(url, body, headers):
    """POST with urllib; returns (status, parsed JSON body)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_gunicorn_push_writes_trigger(gunicorn):
    url, trigger, _ = gunicorn
    body = fixture("push.json")
    headers = dict(github_headers(body), **{"Content-Type": JSON_TYPE})
    assert post_over_http(url, body, headers) == (202, TRIGGERED)
    assert read_trigger(trigger) == PUSH_TRIGGER


def test_gunicorn_accepts_push_over_django_upload_limit(gunicorn):
    url, trigger, _ = gunicorn
    body = padded_push(3 * 1024 * 1024)
    headers = dict(github_headers(body), **{"Content-Type": JSON_TYPE})
    assert post_over_http(url, body, headers) == (202, TRIGGERED)
    assert read_trigger(trigger) == PUSH_TRIGGER


def test_gunicorn_refuses_forged_push_and_logs_it(gunicorn):
    url, trigger, log_path = gunicorn
    old_trigger = trigger.read_bytes() if trigger.exists() else None
    body = fixture("push.json")
    forged = signature("not-the-secret", body)
    headers = dict(github_headers(body, **{"X-Hub-Signature-256": forged}),
                   **{"Content-Type": JSON_TYPE})
    assert post_over_http(url, body, headers) == (
        403, {"error": "X-Hub-Signature-256 does not match the body"}
    )
    assert (trigger.read_bytes() if trigger.exists() else None) == old_trigger
    log = log_path.read_text()
    assert f"refused delivery {DELIVERY} from 127.0.0.1: 403" in log
    assert SECRET not in log and forged[7:] not in log
