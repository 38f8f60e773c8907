"""Django view that turns a signed GitHub push into a deploy trigger file.

Drop this file into your Django project (next to urls.py, or in any app) and
route one URL to it:

    path("webhook/", webhook_view.github_webhook),

Inputs, read on every request from Django settings, else the environment:
  GITHUB_WEBHOOK_SECRET  required; the webhook's secret on GitHub. Unset or
                         empty: every delivery gets a 500 and an error is
                         logged. There is no default secret.
  DEPLOY_TRIGGER_FILE    default /shared/deploy_trigger.txt (its folder is the
                         folder shared with the host watcher).
  DEPLOY_BRANCH          default main; only pushes to refs/heads/<branch>.
  DEPLOY_REPOSITORY      optional owner/name (any case); pushes from another
                         repository are ignored.

Requests: POST only, with X-Hub-Signature-256 (HMAC-SHA256 of the raw body),
X-GitHub-Event and X-GitHub-Delivery; the body is application/json or
application/x-www-form-urlencoded (the JSON in the `payload` field), up to
GitHub's 25 MB cap whatever DATA_UPLOAD_MAX_MEMORY_SIZE says.

Output: a JSON response ({"message": ...} on 2xx, {"error": ...} otherwise).
202 means a deploy was triggered; other 2xx mean the delivery was understood
and deliberately ignored (the message says why).

Side effect: for a push to the branch, the trigger file is replaced
atomically by one line of compact JSON (ref, after, before, delivery,
repository, pusher, received_at), always under 4096 bytes. No deploy work is
done here: the watcher on the host does it.
"""

import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import tempfile
import urllib.parse

from django.conf import settings
from django.core.handlers.wsgi import WSGIRequest
from django.http import JsonResponse, RawPostDataException, UnreadablePostError
from django.views.decorators.csrf import csrf_exempt

__all__ = ["github_webhook", "signature"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 25 * 1024 * 1024  # GitHub never delivers more (26214400)
READ_CHUNK_BYTES = 64 * 1024
MAX_TEXT_CHARS = 200  # per trigger value: 4 values * 200 chars * 4 bytes < 4096
MAX_FORM_FIELDS = 10
DEFAULT_TRIGGER_FILE = "/shared/deploy_trigger.txt"
DEFAULT_BRANCH = "main"
TRIGGER_MODE = 0o644  # the host watcher may run as another user
SIGNATURE_PREFIX = "sha256="
SIGNATURE_HEX = re.compile(r"[0-9a-fA-F]{64}")
COMMIT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256 repos
JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"
KIND_NAMES = {str: "a string", bool: "true or false", dict: "an object"}


class WebhookError(Exception):
    """A delivery refused with an HTTP status and a short reason."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def setting(name, default=None):
    """Django setting `name`, else the environment variable, else `default`."""
    value = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(name)
    return value or default


def clean(text):
    """`text` cut to MAX_TEXT_CHARS, unprintable characters replaced by '?'.

    Lone surrogates (valid in JSON, not in UTF-8) and control characters
    count as unprintable, so the result always encodes to at most 4 bytes a
    character and needs no JSON escapes but for quote and backslash.
    """
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_TEXT_CHARS])


def signature(secret, body):
    """The X-Hub-Signature-256 value GitHub sends for `body` under `secret`."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def verify_signature(secret, body, header):
    """Raise WebhookError(403) unless `header` signs `body` with `secret`."""
    if not header:
        raise WebhookError(403, "missing X-Hub-Signature-256 header")
    hex_part = header[len(SIGNATURE_PREFIX):]
    # Checked before comparing: compare_digest raises on non-ASCII text, and
    # WSGI hands over headers as latin-1 text.
    if not header.startswith(SIGNATURE_PREFIX) or not SIGNATURE_HEX.fullmatch(hex_part):
        raise WebhookError(403, "malformed X-Hub-Signature-256 header")
    expected = signature(secret, body).encode("ascii")
    given = (SIGNATURE_PREFIX + hex_part.lower()).encode("ascii")
    if not hmac.compare_digest(expected, given):
        raise WebhookError(403, "X-Hub-Signature-256 does not match the body")


def read_body(request):
    """The raw body, up to MAX_BODY_BYTES, bypassing DATA_UPLOAD_MAX_MEMORY_SIZE.

    request.body would enforce Django's in-memory limit (2.5 MB by default),
    so the stream is read here, never past MAX_BODY_BYTES + 1.
    """
    too_big = WebhookError(413, f"body over {MAX_BODY_BYTES} bytes (GitHub's cap)")
    length = request.META.get("CONTENT_LENGTH") or ""
    if length:
        if not (length.isascii() and length.isdigit()):
            raise WebhookError(400, "invalid Content-Length header")
        if int(length) > MAX_BODY_BYTES:
            raise too_big
    elif isinstance(request, WSGIRequest):
        # Django's WSGI request reads nothing without a length: a chunked
        # body would arrive empty and fail the signature for the wrong reason.
        raise WebhookError(411, "Content-Length header required")
    if request._read_started:
        # Some middleware read the body first; Django kept a copy.
        try:
            body = request.body
        except RawPostDataException:
            raise WebhookError(500, "request body consumed before the webhook view")
    else:
        chunks = []
        size = 0
        try:
            while size <= MAX_BODY_BYTES:
                chunk = request.read(min(READ_CHUNK_BYTES, MAX_BODY_BYTES + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except UnreadablePostError:
            raise WebhookError(400, "request body could not be read")
        body = b"".join(chunks)
    if len(body) > MAX_BODY_BYTES:
        raise too_big
    return body


def parse_payload(content_type, body):
    """The delivery's JSON object, from either of GitHub's content types."""
    if content_type not in (JSON_TYPE, FORM_TYPE):
        raise WebhookError(
            415, f"unsupported Content-Type (use {JSON_TYPE} or {FORM_TYPE})"
        )
    if not body:
        raise WebhookError(400, "empty body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookError(400, "body is not UTF-8")
    if content_type == FORM_TYPE:
        try:
            fields = urllib.parse.parse_qs(
                text,
                keep_blank_values=True,
                errors="strict",
                max_num_fields=MAX_FORM_FIELDS,
            )
        except ValueError:  # too many fields, or %-escapes that are not UTF-8
            raise WebhookError(400, "invalid form body")
        payloads = fields.get("payload", [])
        if len(payloads) != 1:
            raise WebhookError(400, "form body needs exactly one payload field")
        text = payloads[0]
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        raise WebhookError(400, "payload is not valid JSON")
    if not isinstance(payload, dict):
        raise WebhookError(400, "payload is not a JSON object")
    return payload


def member(obj, key, kind, where="", required=False):
    """obj[key] if it is a `kind`; None if absent or null and not required."""
    value = obj.get(key)
    if value is None and not required:
        return None
    if key not in obj:
        raise WebhookError(400, f"{where}{key} is missing")
    if not isinstance(value, kind):
        raise WebhookError(400, f"{where}{key} must be {KIND_NAMES[kind]}")
    return value


def repository_name(payload):
    """owner/name of the pushed repository, or "" when the payload has none."""
    repo = member(payload, "repository", dict, required=True)
    full_name = member(repo, "full_name", str, "repository.")
    if full_name is not None:
        return full_name
    # Legacy payloads have no full_name, only name and owner.name.
    owner = member(repo, "owner", dict, "repository.") or {}
    owner_name = member(owner, "name", str, "repository.owner.") or member(
        owner, "login", str, "repository.owner."
    )
    name = member(repo, "name", str, "repository.")
    return f"{owner_name}/{name}" if owner_name and name else ""


def commit_id(payload, key):
    """payload[key], checked to be a full lowercase commit id."""
    value = member(payload, key, str, required=True)
    if not COMMIT_ID.fullmatch(value):
        raise WebhookError(400, f"{key} is not a commit id")
    return value


def write_trigger(path, trigger):
    """Replace `path` atomically with `trigger` as one line of compact JSON."""
    data = json.dumps(trigger, ensure_ascii=False, separators=(",", ":")) + "\n"
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(
        dir=folder or ".", prefix="." + name + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, TRIGGER_MODE)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    # The rename itself must reach the disk, or a power cut could lose the push.
    folder_fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def trigger_path():
    """DEPLOY_TRIGGER_FILE, which must be absolute: a relative one would land
    wherever the web server happens to run."""
    path = setting("DEPLOY_TRIGGER_FILE", DEFAULT_TRIGGER_FILE)
    if not os.path.isabs(path):
        raise WebhookError(500, f"DEPLOY_TRIGGER_FILE must be an absolute path, not {path!r}")
    return path


def trigger_folder_problem(path):
    """Why the trigger could not be written into its folder, or None."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        return f"the trigger folder {folder} does not exist (is the shared folder mounted?)"
    if not os.access(folder, os.W_OK):
        return f"the trigger folder {folder} is not writable by this process"
    return None


def handle_push(payload, delivery):
    """Write the trigger for a push to the deploy branch; else say why not."""
    ref = member(payload, "ref", str, required=True)
    after = commit_id(payload, "after")
    before = commit_id(payload, "before")
    deleted = member(payload, "deleted", bool)
    repository = repository_name(payload)
    pusher = member(payload, "pusher", dict) or {}
    pusher_name = member(pusher, "name", str, "pusher.") or ""

    wanted_repository = setting("DEPLOY_REPOSITORY")
    if wanted_repository and repository.lower() != wanted_repository.lower():
        source = clean(repository) or "a repository with no name"
        return ignored(f"push to {source}; only {wanted_repository} deploys")
    wanted_ref = "refs/heads/" + setting("DEPLOY_BRANCH", DEFAULT_BRANCH)
    if ref != wanted_ref:
        if ref.startswith("refs/tags/"):
            kind = "a tag"
        elif ref.startswith("refs/heads/"):
            kind = "another branch"
        else:
            kind = "not a branch"
        return ignored(f"{clean(ref)} is {kind}; only {wanted_ref} deploys")
    if deleted or not after.strip("0"):
        return ignored(f"{wanted_ref} was deleted; nothing to deploy")

    path = trigger_path()
    now = datetime.datetime.now(datetime.timezone.utc)
    trigger = {
        "ref": clean(ref),
        "after": after,
        "before": before,
        "delivery": delivery,
        "repository": clean(repository),
        "pusher": clean(pusher_name),
        "received_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        write_trigger(path, trigger)
    except OSError as exc:
        reason = exc.strerror or exc
        raise WebhookError(500, f"cannot write deploy trigger {path}: {reason}")
    logger.info(
        "deploy triggered: %s at %s by %s (delivery %s)",
        trigger["ref"], after, trigger["pusher"], delivery or "-",
    )
    # 202: accepted; the deploy itself runs later on the host.
    return JsonResponse({"message": "deploy triggered", "after": after}, status=202)


def ignored(message):
    """A 200 for a delivery understood and deliberately not deployed."""
    logger.info("ignored: %s", message)
    return JsonResponse({"message": "ignored: " + message})


def handle(request, delivery):
    """The response to one POSTed delivery; WebhookError for refusals."""
    secret = setting("GITHUB_WEBHOOK_SECRET")
    if not secret:
        raise WebhookError(500, "GITHUB_WEBHOOK_SECRET is not set on the server")
    body = read_body(request)
    verify_signature(secret, body, request.META.get("HTTP_X_HUB_SIGNATURE_256"))
    event = request.META.get("HTTP_X_GITHUB_EVENT")
    if not event:
        raise WebhookError(400, "missing X-GitHub-Event header")
    payload = parse_payload(request.content_type, body)
    if event == "ping":
        # GitHub pings when the webhook is made: the moment to say what a
        # push would run into.
        problem = trigger_folder_problem(trigger_path())
        if problem:
            logger.warning("ping received (delivery %s), but %s", delivery or "-", problem)
            return JsonResponse({"message": "pong", "warning": problem})
        logger.info("ping received (delivery %s)", delivery or "-")
        return JsonResponse({"message": "pong"})
    if event != "push":
        return ignored(f"{clean(event)} event")
    return handle_push(payload, delivery)


@csrf_exempt
def github_webhook(request):
    """Verify a GitHub delivery and, for a push to the branch, trigger a deploy."""
    delivery = clean(request.META.get("HTTP_X_GITHUB_DELIVERY", ""))
    try:
        if request.method != "POST":
            raise WebhookError(405, "only POST is allowed: this URL receives GitHub's webhook")
        return handle(request, delivery)
    except WebhookError as exc:
        # GitHub shows any non-2xx as a failed delivery that can be redelivered.
        log = logger.error if exc.status >= 500 else logger.warning
        log(
            "refused delivery %s from %s: %s %s",
            delivery or "-", request.META.get("REMOTE_ADDR", "?"),
            exc.status, exc.message,
        )
        response = JsonResponse({"error": exc.message}, status=exc.status)
        if exc.status == 405:
            response["Allow"] = "POST"
        return response
