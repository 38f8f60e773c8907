"""Response time of webhook_view for signed pushes, in-process and via gunicorn.

For a typical 10 KB push and a 5 MB push, measures the median and the 99th
percentile (nearest rank) of the time from sending the request to having the
whole response, over --requests and --large-requests requests:
  in-process  Django's test client (middleware, URL routing, the view);
  gunicorn    one sync worker on 127.0.0.1, a new connection per request
              (as GitHub does), through http.client.
Baseline in the same run: the same request to a trivial view that reads the
body and returns 200, so each median comes with a ratio.

Each measured request writes the real trigger file (fsync included) in a
temporary folder on the filesystem of --tmpdir.

Output: one line per figure on stdout, tab-separated:
<area> <metric> <value> <target> <ok|MISSED>; progress on stderr.
Exit status: 0 when it ran (even if a target is missed), 1 if gunicorn would
not start, 2 on bad usage.
"""

import argparse
import http.client
import json
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import django  # noqa: E402
from django.conf import settings  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

import webhook_view  # noqa: E402

logger = logging.getLogger(__name__)

AREA = "webhook_view"
SECRET = "bench-secret"
SMALL_BYTES = 10 * 1024
LARGE_BYTES = 5 * 1024 * 1024
WARMUP_REQUESTS = 10
SERVER_START_SECONDS = 30
REQUEST_TIMEOUT_SECONDS = 60
GITHUB_TIMEOUT_MS = 10000  # GitHub gives up on a delivery after 10 s
SMALL_P99_TARGET_MS = 5  # in-process
LARGE_TARGET_MS = 200
READ_CHUNK_BYTES = 64 * 1024


class BenchError(Exception):
    """A benchmark that could not run."""


@csrf_exempt
def baseline(request):
    """A trivial view: reads and drops the body, answers 200."""
    while request.read(READ_CHUNK_BYTES):
        pass
    return HttpResponse(b"ok")


urlpatterns = [
    path("webhook/", webhook_view.github_webhook),
    path("baseline/", baseline),
]


def configure_django():
    """Settings for a plain project; the webhook's come from the environment."""
    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench-only-not-a-secret",
        ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
        ROOT_URLCONF="bench_view",
        MIDDLEWARE=[
            "django.middleware.security.SecurityMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
        ],
        USE_TZ=True,
    )
    django.setup()


def wsgi_application():
    """gunicorn's entry point: `bench_view:wsgi_application()`."""
    from django.core.wsgi import get_wsgi_application

    configure_django()
    return get_wsgi_application()


def push_body(size):
    """A push body of at least `size` bytes: push.json with more commits."""
    payload = json.loads((ROOT / "tests" / "fixtures" / "push.json").read_bytes())
    commit = payload["commits"][0]
    commits = []
    length = len(json.dumps(dict(payload, commits=[])))
    while length < size:
        commits.append(dict(commit, id="%040x" % len(commits)))
        length += len(json.dumps(commits[-1])) + 2  # ", " between commits
    payload["commits"] = commits
    return json.dumps(payload).encode("utf-8")


def headers_for(body):
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": "bench-0000",
        "X-Hub-Signature-256": webhook_view.signature(SECRET, body),
    }


def time_requests(send, count):
    """Milliseconds taken by each of `count` calls of `send`, after a warm-up."""
    for _ in range(WARMUP_REQUESTS):
        send()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        send()
        times.append((time.perf_counter() - start) * 1000)
    return times


def in_process_sender(url, body):
    from django.test import Client

    client = Client()
    headers = headers_for(body)

    def send():
        response = client.post(url, body, content_type="application/json",
                               headers=headers)
        expect_2xx(response.status_code, response.content)

    return send


def http_sender(port, url, body):
    headers = headers_for(body)

    def send():
        connection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=REQUEST_TIMEOUT_SECONDS
        )
        try:
            connection.request("POST", url, body, headers)
            response = connection.getresponse()
            expect_2xx(response.status, response.read())
        finally:
            connection.close()

    return send


def expect_2xx(status, content):
    if not 200 <= status < 300:
        raise BenchError(f"benchmark request got {status}: {content[:200]!r}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(port, log_path):
    """gunicorn serving this module on 127.0.0.1:`port`, ready for requests."""
    argv = [
        sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
        "--workers", "1", "--chdir", str(ROOT / "bench"), "--pythonpath", str(ROOT),
        "bench_view:wsgi_application()",
    ]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_START_SECONDS
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop(server)
                raise BenchError(
                    f"gunicorn did not start: {log_path.read_text()[-2000:]}"
                )
            time.sleep(0.1)


def stop(server):
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def p99(times):
    ordered = sorted(times)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def figure(metric, value, target_ms=None, unit="ms"):
    """Print one result line; `target_ms` None means no target of its own."""
    if target_ms is None:
        target, verdict = "-", "ok"
    else:
        target = f"< {target_ms:g} ms"
        verdict = "ok" if value < target_ms else "MISSED"
    text = f"{value:.1f}x" if unit == "x" else f"{value:.2f} ms"
    print(f"{AREA}\t{metric}\t{text}\t{target}\t{verdict}", flush=True)


def report(label, times, base_times, median_target, p99_target):
    median, base_median = statistics.median(times), statistics.median(base_times)
    figure(f"{label} median", median, median_target)
    figure(f"{label} p99", p99(times), p99_target)
    figure(f"{label} baseline median", base_median)
    figure(f"{label} median / baseline", median / base_median, unit="x")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000,
                        help="requests per 10 KB figure (default 1000)")
    parser.add_argument("--large-requests", type=int, default=200,
                        help="requests per 5 MB figure (default 200)")
    parser.add_argument("--tmpdir", default=None,
                        help="parent of the trigger's folder (default: system temp)")
    return parser


def check_args(parser, args):
    if args.requests < 1 or args.large_requests < 1:
        parser.error("--requests and --large-requests must be at least 1")


def targets(label, mode):
    """(median, p99) targets in ms: the issue's, else GitHub's timeout."""
    if label == "5MB":
        return LARGE_TARGET_MS, LARGE_TARGET_MS
    if mode == "in-process":
        return GITHUB_TIMEOUT_MS, SMALL_P99_TARGET_MS
    return GITHUB_TIMEOUT_MS, GITHUB_TIMEOUT_MS


def measure(mode, sender, cases):
    for label, body, count in cases:
        logger.info("%s, %s push (%d bytes) x %d", mode, label, len(body), count)
        times = time_requests(sender("/webhook/", body), count)
        base = time_requests(sender("/baseline/", body), count)
        report(f"{label} {mode}", times, base, *targets(label, mode))


def run(args):
    configure_django()
    cases = [
        ("10KB", push_body(SMALL_BYTES), args.requests),
        ("5MB", push_body(LARGE_BYTES), args.large_requests),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-view-", dir=args.tmpdir) as folder:
        os.environ["GITHUB_WEBHOOK_SECRET"] = SECRET
        os.environ["DEPLOY_TRIGGER_FILE"] = os.path.join(folder, "deploy_trigger.txt")
        for name in ("DEPLOY_BRANCH", "DEPLOY_REPOSITORY"):
            os.environ.pop(name, None)
        measure("in-process", in_process_sender, cases)
        port = free_port()
        server = start_gunicorn(port, Path(folder) / "gunicorn.log")
        try:
            measure("gunicorn", lambda url, body: http_sender(port, url, body), cases)
        finally:
            stop(server)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # The view logs every trigger at INFO; a thousand lines would drown the rest.
    logging.getLogger("webhook_view").setLevel(logging.WARNING)
    try:
        run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
