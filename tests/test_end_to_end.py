"""A signed push, through every real component, to the new version served.

The tests share one chain (see e2e_chain.py) and run in file order: each
starts from the state the one before it left, as a real host would.
"""

import pytest

from conftest import docker_engine_available, require
from e2e_chain import (
    BROKEN_DOCKERFILE,
    BUSYBOX,
    COMPOSE_FILE,
    DOCKERFILE,
    EXIT_AT_START,
    HTTPD,
    Chain,
    Poller,
)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    require(docker_engine_available(), "needs a Docker engine with Compose v2")
    require(BUSYBOX.exists(), "needs a static busybox at /bin/busybox (busybox-static)")
    chain = Chain(tmp_path_factory.mktemp("e2e"))
    try:
        chain.start()
        yield chain
    finally:
        chain.stop()
        print(chain.log_text())


def test_first_push_builds_and_serves_the_app(chain):
    before, after = chain.pushed[-1]
    status, body = chain.deliver(before, after)

    assert status in (200, 202), body
    chain.wait_served("code-1")
    assert chain.served("image.txt") == "image-1"
    chain.wait_deploys_finished(1)
    assert (chain.app / ".env").read_text() == "SECRET_ON_THE_HOST=1\n"


def test_code_push_is_served_without_a_rebuild(chain):
    finished = chain.deploys_finished()
    image = chain.image_id()

    after = chain.push_and_deliver("code 2", {"www/index.html": "code-2\n"})

    chain.wait_served("code-2")
    chain.wait_deploys_finished(finished + 1)
    assert chain.app_head() == after
    assert chain.image_id() == image


def test_rebuild_push_is_served_with_a_short_failed_request_window(chain):
    finished = chain.deploys_finished()
    image = chain.image_id()
    foreign = chain.dangling_foreign_image()

    with Poller(chain.url("code/index.html")) as poller:
        chain.push_and_deliver("image 2", {"Dockerfile": DOCKERFILE.format(image="image-2")})
        chain.wait_served("image-2", page="image.txt")
        chain.wait_deploys_finished(finished + 1)

    print(f"failed-request window during a rebuild deploy: {poller.window:.3f}s")
    # The site was never down for the build: only the recreate may fail
    # requests, so the window is far shorter than a stop-build-start order.
    assert poller.window < 5.0
    assert chain.served() == "code-2"
    assert chain.image_id() != image
    # The prune after the deploy kept to this app's images.
    assert chain.image_exists(foreign)


def test_broken_dockerfile_keeps_the_old_version_serving(chain):
    finished = chain.deploys_finished()
    container = chain.container_id()
    good = chain.app_head()

    broken = chain.push_and_deliver("broken build", {"Dockerfile": BROKEN_DOCKERFILE.format(image="image-3")})
    chain.wait_deploys_finished(finished + 1)

    assert chain.served("image.txt") == "image-2"
    assert chain.container_id() == container
    assert chain.app_head() == good
    assert "exit status 1" in chain.log_text()
    assert broken[:12] in chain.status()
    assert "fail" in chain.status().lower()


def test_container_exiting_at_start_is_rolled_back(chain):
    finished = chain.deploys_finished()

    chain.push_and_deliver(
        "exits at start",
        {
            "Dockerfile": DOCKERFILE.format(image="image-4"),
            "compose.yaml": COMPOSE_FILE.format(port=chain.app_port, command=EXIT_AT_START),
        },
    )
    chain.wait_deploys_finished(finished + 1)

    chain.wait_served("image-2", page="image.txt", timeout=60)
    assert chain.served() == "code-2"
    assert "roll" in chain.log_text().lower()


def test_fixed_push_after_failures_deploys(chain):
    finished = chain.deploys_finished()

    after = chain.push_and_deliver(
        "fixed",
        {
            "Dockerfile": DOCKERFILE.format(image="image-5"),
            "compose.yaml": COMPOSE_FILE.format(port=chain.app_port, command=HTTPD),
            "www/index.html": "code-5\n",
        },
    )

    chain.wait_served("image-5", page="image.txt")
    chain.wait_deploys_finished(finished + 1)
    assert chain.served() == "code-5"
    assert chain.app_head() == after


def test_redelivered_old_delivery_recreates_nothing(chain):
    finished = chain.deploys_finished()
    container = chain.container_id()
    before, after = chain.pushed[1]

    status, _ = chain.deliver(before, after, delivery="redelivered-0001")

    assert status in (200, 202)
    chain.wait_deploys_finished(finished + 1)
    assert chain.container_id() == container
    assert "up to date" in chain.log_text().lower()
    assert chain.served() == "code-5"


def test_five_quick_pushes_serve_the_last_after_at_most_two_deploys(chain):
    started = chain.deploys_started()

    for number in range(6, 11):
        chain.push_and_deliver(f"quick {number}", {"www/index.html": f"code-{number}\n"})

    chain.wait_served("code-10")
    chain.wait_deploys_finished(chain.deploys_finished())
    assert chain.deploys_started() - started <= 2
    assert chain.app_head() == chain.pushed[-1][1]
