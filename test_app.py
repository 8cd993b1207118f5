"""What app.py promises, layer by layer, and the README's chapters, applied as written.

1. In-process: the protocol through Django's async test client, with no real waiting.
2. A real `daphne app:application` on a free port, read with httpx-sse and raw sockets:
   resume, restarts, overload, failures, a reconnect storm, hostile requests.
3. A real browser: Chromium driven by Playwright, against that Daphne, over HTTP/2 and
   behind the README's nginx configuration too.
4. Your own project: `django-admin startproject`, the README's files added as they are.
5. Your own events: the next chapter's files added to that project, on a PostgreSQL
   started here, with two Daphne processes: every event to every stream it is for, the
   edges of a real deployment, and events for whom they are meant.
6. Keep gunicorn: that project's pages under gunicorn beside a Daphne for its streams,
   behind the README's nginx block, and the project on gunicorn's uvicorn workers.

Run: pytest    one layer: pytest -m in_process|real_server|browser|own_project|events|gunicorn
Measure: python test_app.py bench [STREAMS] [--server daphne|uvicorn|hypercorn|granian]
         python test_app.py storm [CLIENTS]
         python test_app.py bench-events [STREAMS]
         python test_app.py bench-deploy [STREAMS]
         python test_app.py bench-replies [ANSWERS]
"""

import asyncio
import contextlib
import datetime
import functools
import gc
import importlib.metadata
import importlib.util
import ipaddress
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import count, cycle, islice, pairwise
from pathlib import Path
from types import SimpleNamespace

import django
import httpx
import pytest
from asgiref.testing import ApplicationCommunicator
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, reset_queries
from django.test import AsyncClient, override_settings
from django.test.utils import setup_test_environment, teardown_test_environment
from django.utils.decorators import async_only_middleware
from httpx_sse import aconnect_sse, connect_sse
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

import app

HERE = Path(__file__).resolve().parent
CI = os.environ.get("CI") == "true"
EVENT = re.compile(rb"id: (\d+)\ndata: (\S+) (\d+)\n\n")


# Short groups share a worker with longer ones: five groups, one for each of .pytest.ini's
# five workers, each about as long, so that none is left to run a group alone at the end.
SHARES_A_WORKER_WITH = {
    "in_process": "events: edges",
    "own_project": "events",
    "gunicorn": "browser",
    "chat: elsewhere": "real_server",
}


def layer(*names, group=None):
    """Marks a test with its layers, so that `pytest -m NAME` runs one alone, and with the
    group that pytest-xdist runs on one worker, where its servers and database start once:
    its first layer's, unless `group` names another, or the group it shares a worker with."""
    group = group or names[0]
    marks = [
        *(getattr(pytest.mark, name) for name in names),
        pytest.mark.xdist_group(SHARES_A_WORKER_WITH.get(group, group)),
    ]
    return lambda test: functools.reduce(lambda marked, mark: mark(marked), marks, test)


# 1. In-process ----------------------------------------------------------------


@pytest.fixture
def fast(monkeypatch):
    """Ticks every 10 ms."""
    monkeypatch.setattr(app, "SSE_INTERVAL", 0.01)


@pytest.fixture(scope="module", autouse=True)
def test_environment():
    """As Django's test runner does: among others, allows the client's Host."""
    setup_test_environment()
    yield
    teardown_test_environment()


def client():
    return AsyncClient()


@pytest.fixture
def app_log(caplog):
    """What app.py and Django log, from INFO up."""
    caplog.set_level(logging.INFO)
    return caplog


async def first_chunks(response, count):
    """The first `count` chunks of a streaming response; then hang up."""
    chunks = []
    async for chunk in response.streaming_content:
        chunks.append(chunk)
        if len(chunks) == count:
            break
    await response.streaming_content.aclose()
    return chunks


def cap_streams_at(monkeypatch, count):
    monkeypatch.setattr(app, "SSE_MAX_STREAMS", count)
    monkeypatch.setattr(app, "places", threading.BoundedSemaphore(count))


def taken_places():
    """How many of app.py's SSE_MAX_STREAMS places are taken, read by taking the rest."""
    free = 0
    while app.places.acquire(blocking=False):
        free += 1
    for _ in range(free):
        app.places.release()
    return app.SSE_MAX_STREAMS - free


async def first_ids(count=1, **headers):
    # Header values travel as bytes; Django reads them as latin-1, as ASGI says.
    headers = {name: value.encode().decode("latin-1") for name, value in headers.items()}
    response = await client().get("/stream/", headers=headers)
    chunks = await first_chunks(response, count + 1)
    return [int(EVENT.fullmatch(chunk)[1]) for chunk in chunks[1:]]


@layer("in_process")
@pytest.mark.anyio
async def test_stream_is_an_uncached_unbuffered_event_stream(fast):
    response = await client().get("/stream/", headers={"accept-encoding": "gzip, br"})
    await first_chunks(response, 1)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-cache"
    assert response["X-Accel-Buffering"] == "no"
    assert not response.has_header("Connection")  # hop-by-hop: the server's business
    assert not response.has_header("Content-Encoding")


@layer("in_process")
@pytest.mark.anyio
async def test_stream_sends_retry_once_then_numbered_events(fast):
    response = await client().get("/stream/")
    retry, *events = await first_chunks(response, 6)
    assert re.fullmatch(rb"retry: \d+\n\n", retry)
    assert 1000 <= int(retry.split()[1]) <= 3000
    parsed = [EVENT.fullmatch(event) for event in events]
    assert all(parsed), events
    assert [int(m[1]) for m in parsed] == [0, 1, 2, 3, 4]
    assert [int(m[3]) for m in parsed] == [0, 1, 2, 3, 4]  # data carries the id too
    assert {m[2].decode() for m in parsed} <= set("🚀🐎🌅🦾🍇")


@layer("in_process")
@pytest.mark.anyio
async def test_retry_is_random_so_a_crowd_does_not_come_back_at_once(fast):
    retries = set()
    for _ in range(20):
        response = await client().get("/stream/")
        retries.add((await first_chunks(response, 1))[0])
    assert len(retries) >= 5, retries


@layer("in_process")
@pytest.mark.anyio
async def test_first_event_goes_out_at_once(monkeypatch):
    monkeypatch.setattr(app, "SSE_INTERVAL", 60)
    with pytest.raises(TimeoutError):  # the second event waits for the clock...
        async with asyncio.timeout(0.5):
            await first_ids(2)
    async with asyncio.timeout(0.5):  # ...the first does not.
        assert await first_ids(1) == [0]


def is_connected(signal, receiver):
    """Whether `receiver` is connected to `signal`: Django says so by disconnecting it."""
    connected = signal.disconnect(receiver)
    if connected:
        signal.connect(receiver)
    return connected


@layer("in_process")
def test_django_keeps_its_request_receivers():
    """Closing stale database connections and resetting the query log run as shipped."""
    assert is_connected(request_started, reset_queries)
    assert is_connected(request_started, close_old_connections)
    assert is_connected(request_finished, close_old_connections)


@layer("in_process")
def test_one_clock_serves_several_event_loops_at_once(fast):
    """As under WSGI, where each request runs an event loop of its own."""

    async def two_ticks():
        await app.next_tick()
        await app.next_tick()

    with ThreadPoolExecutor(2) as threads:
        for loop_run in [threads.submit(asyncio.run, two_ticks()) for _ in range(2)]:
            loop_run.result(timeout=5)


@layer("in_process")
@pytest.mark.anyio
async def test_the_clock_wakes_streams_a_turn_of_the_loop_at_a_time(fast):
    """Between two turns, the event loop serves all else: 10,000 at once took 0.5 s."""
    woken, seen_meanwhile = [], []

    async def stream():
        await app.next_tick()
        if not woken:  # the first one woken asks the loop for something else
            asyncio.get_running_loop().call_soon(lambda: seen_meanwhile.append(len(woken)))
        woken.append(1)

    async with asyncio.timeout(5):
        await asyncio.gather(*(stream() for _ in range(3 * app.AT_A_TIME)))
    assert seen_meanwhile == [app.AT_A_TIME]


GOOD_LAST_EVENT_IDS = {"0": 1, "41": 42, "007": 8, "9" * 18: 10**18}
BAD_LAST_EVENT_IDS = [
    "",
    "-1",
    "+1",
    "4 1",
    "1.5",
    "1e3",
    "0x10",
    "41\n",
    "٤٢",  # Arabic-Indic digits: digits to Python, not to the rule
    "１２",  # fullwidth digits
    "9" * 19,
    "null",
    "<script>",
]


@layer("in_process")
@pytest.mark.anyio
@pytest.mark.parametrize("value, next_id", GOOD_LAST_EVENT_IDS.items())
async def test_last_event_id_of_ascii_digits_resumes_after_it(fast, value, next_id):
    assert await first_ids(2, last_event_id=value) == [next_id, next_id + 1]


@layer("in_process")
@pytest.mark.anyio
@pytest.mark.parametrize("value", BAD_LAST_EVENT_IDS)
async def test_any_other_last_event_id_starts_fresh(fast, value):
    assert await first_ids(1, last_event_id=value) == [0]


async def first_ids_from_query(value):
    """As the page asks after Stop: the last id in the query string, any text at all."""
    response = await client().get("/stream/", {"lastEventId": value})
    return [int(EVENT.fullmatch(chunk)[1]) for chunk in (await first_chunks(response, 2))[1:]]


@layer("in_process")
@pytest.mark.anyio
@pytest.mark.parametrize("value", BAD_LAST_EVENT_IDS)
async def test_any_other_last_event_id_in_the_query_starts_fresh(fast, value):
    assert await first_ids_from_query(value) == [0]


@layer("in_process")
@pytest.mark.anyio
async def test_query_string_resumes_a_new_eventsource_but_the_header_wins(fast):
    response = await client().get("/stream/", {"lastEventId": "41"})
    assert EVENT.fullmatch((await first_chunks(response, 2))[1])[1] == b"42"
    response = await client().get(
        "/stream/", {"lastEventId": "41"}, headers={"last-event-id": "7"}
    )
    assert EVENT.fullmatch((await first_chunks(response, 2))[1])[1] == b"8"


@layer("in_process")
@pytest.mark.anyio
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete", "head"])
async def test_stream_answers_other_methods_with_405(method):
    response = await getattr(client(), method)("/stream/")
    assert response.status_code == 405
    assert response["Allow"] == "GET"


def asgi_get(path, host=b"localhost"):
    """A connection to the ASGI application as Daphne would make it."""
    scope = {"type": "http", "method": "GET", "path": path, "query_string": b""}
    scope["headers"] = [(b"host", host)]
    return ApplicationCommunicator(app.application, scope)


@layer("in_process")
@pytest.mark.anyio
@pytest.mark.skipif(
    django.VERSION >= (6, 1),
    reason="Django 6.1 runs a stream in a TaskGroup, whose exceptions keep cycles",
)
async def test_a_stream_whose_client_left_leaves_no_cycle_for_the_collector(fast, monkeypatch):
    """Else only a full collection frees it, walking every open stream as it does."""
    monkeypatch.setattr(app, "FREEZE_EVERY", 10**9)  # nothing frozen while the test looks
    monkeypatch.setattr(app, "closed_streams_leave_cycles", False)
    gc.unfreeze()
    gc.collect()
    for _ in range(3):
        stream = asgi_get("/stream/")
        await stream.send_input({"type": "http.request"})
        assert (await stream.receive_output(5))["status"] == 200
        await stream.receive_output(5)  # streaming
        await stream.send_input({"type": "http.disconnect"})
        await stream.wait(5)
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        left = [each for each in gc.garbage if isinstance(each, app.StreamingHttpResponse)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == [], "the stream's response, in a cycle"


@layer("in_process")
@pytest.mark.anyio
async def test_while_closed_streams_leave_cycles_few_open_streams_cost_few_full_collections(
    monkeypatch,
):
    """A full collection walks the whole process: at each turnover of the open streams, but
    with none open that would be every other request."""
    monkeypatch.setattr(app, "closed_streams_leave_cycles", True)  # as on Python 3.13.0
    full = []

    def count_full(phase, info):
        if phase == "start" and info["generation"] == 2:
            full.append(info)

    gc.callbacks.append(count_full)
    try:
        for _ in range(50):
            assert (await client().get("/nope/")).status_code == 404
    finally:
        gc.callbacks.remove(count_full)
    assert len(full) <= 1, "at most one each FREEZE_EVERY requests"


@layer("in_process")
@pytest.mark.anyio
async def test_unknown_path_is_404():
    assert (await client().get("/nope/")).status_code == 404


@layer("in_process")
@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/", "/stream/"])
async def test_host_outside_allowed_hosts_is_400(path):
    connection = asgi_get(path, host=b"evil.example")
    await connection.send_input({"type": "http.request"})
    assert (await connection.receive_output(1))["status"] == 400


@layer("in_process")
@pytest.mark.anyio
async def test_page_runs_only_its_own_script_and_refuses_framing():
    first, second = await client().get("/"), await client().get("/")
    assert first.status_code == 200
    csp = first["Content-Security-Policy"]
    script_src = re.search(r"script-src ([^;]*)", csp)[1]
    assert "unsafe-inline" not in script_src
    nonce = re.fullmatch(r"'nonce-([\w-]{16,})'", script_src)[1]
    assert f'<script nonce="{nonce}">' in first.text
    assert nonce not in second["Content-Security-Policy"]  # new each request
    assert "frame-ancestors 'none'" in csp
    assert first["X-Frame-Options"] == "DENY"
    assert first["X-Content-Type-Options"] == "nosniff"
    assert first["Referrer-Policy"] == "same-origin"


@layer("in_process")
@pytest.mark.anyio
async def test_page_names_its_own_icon_so_browsers_ask_for_no_favicon():
    page = await client().get("/")
    assert '<link rel="icon" href="data:,">' in page.text  # no /favicon.ico, no 404 logged
    assert "img-src data:" in page["Content-Security-Policy"]


@layer("in_process")
@pytest.mark.anyio
async def test_client_going_away_cancels_the_stream_and_is_logged(fast, app_log):
    connection = asgi_get("/stream/")
    await connection.send_input({"type": "http.request"})
    assert (await connection.receive_output(1))["status"] == 200
    await connection.receive_output(1)  # retry:
    await connection.receive_output(1)  # id: 0
    assert taken_places() == 1
    await connection.send_input({"type": "http.disconnect"})
    await connection.wait(1)  # the application returns: nothing left running
    gc.collect()
    assert taken_places() == 0  # freed once, by the stream's end, not again when collected
    assert re.search(r"client went away before id \d+", app_log.text)


@layer("in_process")
@pytest.mark.anyio
async def test_stream_ends_cleanly_after_max_age(fast, monkeypatch, app_log):
    monkeypatch.setattr(app, "SSE_MAX_AGE", 0.2)  # ten to twenty ticks of 10 ms
    response = await client().get("/stream/")
    async with asyncio.timeout(5):
        chunks = [chunk async for chunk in response.streaming_content]
    ids = [int(EVENT.fullmatch(chunk)[1]) for chunk in chunks[1:]]
    assert 3 <= len(ids) <= 25 and ids == list(range(len(ids)))
    assert f"stream reached SSE_MAX_AGE before id {len(ids)}" in app_log.text
    assert taken_places() == 0


@layer("in_process")
@pytest.mark.anyio
async def test_streams_that_began_together_end_apart(fast, monkeypatch):
    """Else a crowd that came back together would end, and come back, together forever."""
    # Lives of 1 to 2 s, in ticks of 10 ms: longer than a busy machine's stall of the loop
    # (half a second has been seen, the streams started), which ends at once all those
    # whose time came during it.
    monkeypatch.setattr(app, "SSE_MAX_AGE", 2.0)

    async def length():
        response = await client().get("/stream/")
        return len([chunk async for chunk in response.streaming_content])

    async with asyncio.timeout(5):
        lengths = await asyncio.gather(*(length() for _ in range(20)))
    assert len(set(lengths)) >= 4, lengths


@async_only_middleware
def await_after_the_view(get_response):
    """A middleware that awaits between the view and the response, as many do."""

    async def middleware(request):
        response = await get_response(request)
        await asyncio.sleep(0.05)
        return response

    return middleware


@pytest.fixture
def middleware_that_awaits(monkeypatch):
    with override_settings(MIDDLEWARE=["test_app.await_after_the_view"]):
        monkeypatch.setattr(app, "django_application", ASGIHandler())


async def disconnect(*connections):
    for connection in connections:
        await connection.send_input({"type": "http.disconnect"})
    for connection in connections:
        await connection.wait(1)


@layer("in_process")
@pytest.mark.anyio
async def test_cap_holds_for_requests_that_arrive_together(
    fast, monkeypatch, middleware_that_awaits
):
    cap_streams_at(monkeypatch, 5)
    connections = [asgi_get("/stream/") for _ in range(60)]
    for connection in connections:  # all sixty are in the view before any is answered
        await connection.send_input({"type": "http.request"})
    starts = [await connection.receive_output(2) for connection in connections]
    statuses = [start["status"] for start in starts]
    assert statuses.count(200) == 5 and statuses.count(503) == 55, statuses
    refused = starts[statuses.index(503)]
    assert int(dict(refused["headers"])[b"Retry-After"]) > 0
    assert taken_places() == 5
    admitted = [c for c, status in zip(connections, statuses) if status == 200]
    await disconnect(admitted[0])
    again = asgi_get("/stream/")  # a closed stream frees its place
    await again.send_input({"type": "http.request"})
    assert (await again.receive_output(2))["status"] == 200
    await disconnect(*admitted[1:], again)
    gc.collect()
    assert taken_places() == 0  # each place freed, and only once


@layer("in_process")
@pytest.mark.anyio
async def test_a_refused_stream_is_not_logged_as_an_error_but_a_failure_is(monkeypatch, app_log):
    cap_streams_at(monkeypatch, 0)
    assert (await client().get("/stream/")).status_code == 503
    assert not [record for record in app_log.records if record.levelno >= logging.ERROR]

    def failing_template(*args, **kwargs):
        raise RuntimeError("a template that fails")

    monkeypatch.setattr(app, "render_to_string", failing_template)
    assert (await AsyncClient(raise_request_exception=False).get("/")).status_code == 500
    errors = [record for record in app_log.records if record.levelno == logging.ERROR]
    assert [record.name for record in errors] == ["django.request"]


@layer("in_process")
def test_places_freed_in_any_thread_leave_the_cap_exact():
    """A place is freed by whichever thread collects it: the count is a semaphore."""

    def churn():
        for _ in range(20_000):
            if app.places.acquire(blocking=False):
                app.Place()  # dropped at once

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert taken_places() == 0


@layer("in_process")
@pytest.mark.anyio
async def test_a_stream_that_never_began_frees_its_place(fast, middleware_that_awaits):
    connection = asgi_get("/stream/")
    await connection.send_input({"type": "http.request"})
    async with asyncio.timeout(2):
        while taken_places() == 0:  # the view has taken a place; the middleware awaits
            await asyncio.sleep(0.001)
    await disconnect(connection)  # before the response, so the stream never begins
    gc.collect()
    assert taken_places() == 0


ANY_LAST_EVENT_ID = (
    st.text()
    | st.from_regex(r"[0-9]{1,20}", fullmatch=True)
    | st.from_regex(r"\d{1,4}", fullmatch=True)  # digits of every script, not only ASCII
)


@layer("in_process")
@pytest.mark.anyio
@settings(max_examples=200, deadline=None)
@given(value=ANY_LAST_EVENT_ID)
async def test_last_event_id_rule_holds_for_any_value(value):
    resumes = value.isascii() and value.isdigit() and len(value) <= 18
    assert await first_ids(1, last_event_id=value) == [int(value) + 1 if resumes else 0]


@layer("in_process")
@pytest.mark.anyio
@settings(max_examples=200, deadline=None)
@given(value=ANY_LAST_EVENT_ID.filter(lambda value: "\x00" not in value))
async def test_last_event_id_rule_holds_for_any_value_in_the_query(value):
    resumes = value.isascii() and value.isdigit() and len(value) <= 18
    assert await first_ids_from_query(value) == [int(value) + 1 if resumes else 0]


# 2. A real Daphne over a real socket -------------------------------------------


def beside_python(program):
    """A program installed with this Python (the venv's), else the one on PATH."""
    return shutil.which(program, path=Path(sys.executable).parent) or program


DAPHNE = beside_python("daphne")


# Ports for the servers the tests start: below the kernel's range for outgoing connections
# (32768 and up), where thousands of client sockets could take one first, and a block for
# each pytest-xdist worker, so that no two workers pick the same.
ports = count(20_000 + 1_500 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]))


def free_port():
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def wait_until_listening(port, process, timeout=20, log=None):
    """Until 127.0.0.1:port accepts a connection; fails if `process` exits first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    output = log.read_text(errors="replace") if log and log.exists() else ""
    raise AssertionError(f"nothing on port {port} (exit code {process.poll()}):\n{output}")


# How each ASGI server runs app:application here: on 127.0.0.1, with a backlog for a crowd,
# and a bound on its wait for open streams when stopped. Daphne does not wait.
OTHER_SERVERS = {
    "uvicorn": "--host 127.0.0.1 --port {port} --backlog 8192 --timeout-graceful-shutdown 3",
    "hypercorn": "--bind 127.0.0.1:{port} --backlog 8192 --graceful-timeout 3",
    "granian": "--interface asgi --host 127.0.0.1 --port {port} --backlog 8192"
    " --workers-kill-timeout 3",
}
SERVERS = ["daphne", *OTHER_SERVERS]


class Server:
    """An ASGI server (Daphne unless told) serving app.py in a subprocess, its output
    in a file."""

    def __init__(
        self,
        log_dir,
        kind="daphne",
        endpoint="tcp:port={port}:interface=127.0.0.1",
        application="app:application",
        cwd=HERE,
        options=(),
        command=None,
        port=None,
        **env,
    ):
        self.kind, self.application, self.cwd = kind, application, cwd
        self.options = list(options)
        self.given_command = command  # a command of its own, on `port`
        self.port = port or free_port()
        self.endpoint = endpoint.format(port=self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.log_dir = log_dir
        self.process = None
        self.starts = 0
        self.served = ""

    def command(self):
        if self.given_command:
            return [beside_python(self.given_command[0]), *self.given_command[1:]]
        if self.kind == "daphne":
            return [DAPHNE, *self.options, "-e", self.endpoint, self.application]
        options = OTHER_SERVERS[self.kind].format(port=self.port).split()
        return [beside_python(self.kind), *options, *self.options, self.application]

    def start(self, timeout=20):
        self.starts += 1
        self.log_path = self.log_dir / f"{self.kind}-{self.port}-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers, if any, go with it
            )
        try:
            wait_until_listening(self.port, self.process, timeout, log=self.log_path)
        except BaseException:
            self.stop()  # by its pid, whatever went wrong: nothing left running
            raise
        return self

    def stop(self, timeout=10):
        """SIGTERM, as a process manager sends it; the exit code.

        What was logged while serving is kept for the check that no traceback was.
        On Django 5.2 the shutdown itself may log one (see the README's pitfalls).
        """
        self.served += self.log
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def restart(self):
        self.stop()
        return self.start()

    def until_answering(self, timeout=60):
        """Until a page is answered: gunicorn listens before its workers have imported
        Django, and on a busy machine the first page waits seconds for them."""
        httpx.get(self.url + "/", timeout=timeout)
        return self

    @property
    def log(self):
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern, count=1, timeout=10):
        wait_for_lines_in(self.log_path, pattern, count, timeout)


def wait_for_lines_in(log_path, pattern, count=1, timeout=10):
    """Until `pattern` occurs `count` times in the file."""
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, log := log_path.read_text(errors="replace"))) < count:
        assert time.monotonic() < deadline, f"no {pattern!r} in:\n{log}"
        time.sleep(0.05)


@pytest.fixture
def daphne(tmp_path):
    """Starts Daphne processes for one test, and stops each by its pid."""
    servers = []

    def start(**options):
        servers.append(Server(tmp_path, **options))
        return servers[-1].start()

    yield start
    for server in servers:
        server.stop()
    for server in servers:
        assert "Traceback" not in server.served, server.served


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One Daphne shared by the tests that do not stop it."""
    shared = Server(tmp_path_factory.mktemp("daphne"), SSE_INTERVAL="0.1")
    yield shared.start()
    shared.stop()
    assert "Traceback" not in shared.served, shared.served


def read_events(url, count, last_event_id=None):
    """The first `count` events (not the retry-only one) from a real SSE client."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with (
        httpx.Client(timeout=5) as http,
        connect_sse(http, "GET", url + "/stream/", headers=headers) as source,
    ):
        source.response.raise_for_status()
        events = (event for event in source.iter_sse() if event.data)
        return list(islice(events, count))


def proc_status(pid, field):
    """A number from /proc/PID/status: VmRSS (kB) or Threads."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Listener(asyncio.Protocol):
    """A cheap load client for one stream: the status and when each event arrives."""

    def __init__(self, request):
        self.request = request
        self.head = b""
        self.status = None
        self.arrivals = []
        self.ended = False
        self.tail = b""

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        if self.status is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, data = self.head.split(b"\r\n\r\n", 1)
            self.status = int(head.split()[1])
        # Every event (and the retry block) ends with one blank line.
        self.arrivals += [time.monotonic()] * data.count(b"\n\n")
        # The response's last chunk: the stream ended, though the connection is kept alive.
        self.tail = (self.tail + data[-7:])[-7:]
        self.ended = self.ended or self.tail == b"\r\n0\r\n\r\n"

    def connection_lost(self, exc):
        self.ended = True


async def open_streams(port, count, ramp=0.0, headers=""):
    """`count` streams to 127.0.0.1:port, opened evenly over `ramp` seconds."""
    loop = asyncio.get_running_loop()
    request = f"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode()
    listeners, started = [], time.monotonic()
    for index in range(count):
        _, listener = await loop.create_connection(lambda: Listener(request), "127.0.0.1", port)
        listeners.append(listener)
        await asyncio.sleep(max(0, started + ramp * (index + 1) / count - time.monotonic()))
    return listeners


def run(coroutine):
    """asyncio.run in a thread of its own: Playwright's sync API owns this one's loop."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


async def until(condition, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(step)


def statuses_of_requests_sent_together(port, count, headers=""):
    """Opens `count` connections, then sends a stream request down each at once; the
    statuses, read while every connection is still open, then all hung up."""
    request = f"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode()
    connections = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    try:
        for connection in connections:
            connection.sendall(request)
        return [int(connection.recv(64).split()[1]) for connection in connections]
    finally:
        for connection in connections:
            connection.close()
        time.sleep(0.5)  # for the server to see them go


@pytest.fixture(scope="module", params=SERVERS)
def any_server(request, tmp_path_factory):
    """Each ASGI server in turn, serving app.py as it is; shared by the tests that do not
    stop it."""
    log_dir = tmp_path_factory.mktemp(request.param)
    shared = Server(log_dir, kind=request.param, SSE_INTERVAL="0.1")
    yield shared.start()
    shared.stop()
    assert "Traceback" not in shared.served, shared.served


@layer("real_server")
def test_any_server_serves_the_page_and_an_uncached_unbuffered_stream(any_server):
    page = httpx.get(any_server.url + "/", timeout=5)
    assert page.status_code == 200 and 'id="sse-data"' in page.text
    with (
        httpx.Client(timeout=5) as http,
        connect_sse(http, "GET", any_server.url + "/stream/") as source,
    ):
        assert source.response.status_code == 200
        headers = source.response.headers
        assert headers["Content-Type"] == "text/event-stream"
        assert headers["Cache-Control"] == "no-cache" and headers["X-Accel-Buffering"] == "no"
        first, *events = islice(source.iter_sse(), 4)
    assert 1000 <= first.retry <= 3000 and not first.data
    assert [(event.id, event.data.split()[1]) for event in events] == [
        ("0", "0"),
        ("1", "1"),
        ("2", "2"),
    ]


@layer("real_server")
def test_any_server_sends_events_one_by_one_not_in_a_batch(any_server):
    arrivals = []
    with (
        httpx.Client(timeout=5) as http,
        connect_sse(http, "GET", any_server.url + "/stream/") as source,
    ):
        for _ in islice(source.iter_sse(), 9):  # retry, then ids 0-7
            arrivals.append(time.monotonic())
    gaps = sorted(later - earlier for earlier, later in pairwise(arrivals[2:]))
    # SSE_INTERVAL is 0.1 s; a buffer sends them together. A loaded client may read two at
    # once now and then: the median tells the two apart.
    assert gaps[len(gaps) // 2] > 0.05, gaps


@layer("real_server")
def test_any_server_resumes_after_last_event_id(any_server):
    events = read_events(any_server.url, 2, last_event_id="41")
    assert [event.id for event in events] == ["42", "43"]


@layer("real_server")
def test_any_server_ends_the_stream_when_the_client_goes_with_one_log_line(any_server):
    read_events(any_server.url, 2, last_event_id="900000")  # ids no other test sees
    any_server.wait_for_log("client went away before id 9000", timeout=5)
    time.sleep(0.2)
    assert any_server.log.count("client went away before id 9000") == 1  # once, not twice


@layer("real_server")
@pytest.mark.parametrize("kind", SERVERS)
def test_any_server_refuses_past_the_cap_and_stops_with_streams_open(tmp_path, kind):
    # Hypercorn on Python 3.12+ waits for every open connection, whatever its
    # --graceful-timeout (hypercorn#308): there the streams' own end bounds the stop. They
    # end between half their age and all of it: half is time enough for the checks first.
    waits_for_streams = kind == "hypercorn" and sys.version_info >= (3, 12)
    max_age = 14 if waits_for_streams else 300
    bound = max_age + 3 if waits_for_streams else 6  # seconds: the streams' end or 3 s, and more
    server = Server(
        tmp_path,
        kind=kind,
        SSE_INTERVAL="0.1",
        SSE_MAX_STREAMS="20",
        SSE_MAX_AGE=str(max_age),
    ).start()

    async def overload():
        held = await open_streams(server.port, 20)
        opened = time.monotonic()
        await until(lambda: all(len(each.arrivals) >= 2 for each in held), 10)
        refused = await asyncio.to_thread(statuses_of_requests_sent_together, server.port, 100)
        assert refused == [503] * 100
        marks = [len(each.arrivals) for each in held]
        # Each held stream goes on, ten ticks more: refusing the rest took nothing from them.
        await until(lambda: all(len(e.arrivals) - m >= 10 for e, m in zip(held, marks)), 10)
        assert not any(each.ended for each in held)
        response = await asyncio.to_thread(httpx.get, server.url + "/stream/", timeout=5)
        assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
        assert "ERROR" not in server.log  # expected under load: nobody is paged for it
        started = time.monotonic()
        await asyncio.to_thread(server.stop, bound + 2)  # SIGTERM with twenty streams open
        return time.monotonic() - (opened if waits_for_streams else started)

    try:
        assert run(overload()) < bound
    finally:
        server.stop()
    assert server.process.returncode is not None


@layer("real_server")
def test_resume_across_a_server_restart(daphne):
    server = daphne(SSE_INTERVAL="0.1")
    last_id = read_events(server.url, 3)[-1].id
    server.restart()
    assert [event.id for event in read_events(server.url, 2, last_event_id=last_id)] == [
        str(int(last_id) + 1),
        str(int(last_id) + 2),
    ]


@layer("real_server")
def test_python_app_py_runserver_serves_through_daphne(tmp_path):
    port = free_port()
    with open(tmp_path / "runserver.log", "wb") as log:
        runserver = subprocess.Popen(
            [sys.executable, "app.py", "runserver", f"127.0.0.1:{port}"],
            cwd=HERE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the autoreloader's child shares the group
        )
    try:
        wait_until_listening(port, runserver, log=tmp_path / "runserver.log")
        events = read_events(f"http://127.0.0.1:{port}", 2)
        assert [event.id for event in events] == ["0", "1"]
        assert "Starting ASGI/Daphne" in (tmp_path / "runserver.log").read_text()
        # Where the module is __main__, and nothing configures the root logger:
        wait_for_lines_in(tmp_path / "runserver.log", "client went away before id 2")
    finally:
        os.killpg(runserver.pid, signal.SIGTERM)
        runserver.wait(10)


@layer("real_server")
def test_open_streams_hold_no_thread_and_leave_nothing_behind(daphne):
    """Three rounds of 500 streams, each dropped at once: no thread opens, holds or
    closes a stream, every stream ends on the server, the count of open streams returns
    to 0 (with SSE_MAX_STREAMS at 500, a leaked stream would turn the next round to
    503), and memory does not climb round after round (500 leaked streams: +12 MB)."""
    server = daphne(SSE_INTERVAL="0.2", SSE_MAX_STREAMS="500")
    pid = server.process.pid
    read_events(server.url, 1)  # Django is warm: its threads for a request are made
    baseline = proc_status(pid, "Threads")

    async def rounds():
        memory, peak = [], baseline
        for round_number in range(1, 4):
            listeners = await open_streams(server.port, 500)
            await until(lambda got=listeners: all(len(s.arrivals) >= 3 for s in got), 30)
            assert {each.status for each in listeners} == {200}
            peak = max(peak, proc_status(pid, "Threads"))
            for listener in listeners:
                listener.transport.close()
            deadline = time.monotonic() + 15
            while len(re.findall("client went away", server.log)) < 500 * round_number:
                assert time.monotonic() < deadline, "not every stream ended"
                peak = max(peak, proc_status(pid, "Threads"))  # no thread to close one
                await asyncio.sleep(0.05)
            memory.append(proc_status(pid, "VmRSS"))
        assert peak <= baseline, (baseline, peak)
        assert memory[2] - memory[0] < 6 * 1024, memory  # kB

    run(rounds())


@layer("real_server")
def test_max_age_ends_the_stream_and_last_event_id_goes_on(daphne):
    server = daphne(SSE_INTERVAL="0.05", SSE_MAX_AGE="0.3")
    with httpx.Client(timeout=5) as http:
        with connect_sse(http, "GET", server.url + "/stream/") as source:
            first = [event.id for event in source.iter_sse() if event.data]  # to its end
        headers = {"Last-Event-ID": first[-1]}
        with connect_sse(http, "GET", server.url + "/stream/", headers=headers) as source:
            second = [event.id for event in source.iter_sse() if event.data]
    ids = [int(event_id) for event_id in first + second]
    assert len(first) >= 3 and ids == list(range(len(ids)))
    server.wait_for_log("stream reached SSE_MAX_AGE", count=2)


FAILING_APP = """
import app

class FailingOnEveryThirdEvent(list):
    # Stands for the reader's own code in the stream: a query, a call, that fails.
    served = 0

    def __getitem__(self, index):
        FailingOnEveryThirdEvent.served += 1
        if self.served % 3 == 0:
            raise RuntimeError("the reader's code failed")
        return super().__getitem__(index)

def failing_template(*args, **kwargs):
    raise RuntimeError("the page failed")

app.EMOJIS = FailingOnEveryThirdEvent(app.EMOJIS)
app.render_to_string = failing_template
application = app.application
"""


@layer("real_server")
def test_failures_are_logged_and_a_stream_that_fails_ends_cleanly(tmp_path):
    (tmp_path / "failing_app.py").write_text(FAILING_APP)
    server = Server(
        tmp_path, application="failing_app:application", cwd=tmp_path, PYTHONPATH=str(HERE)
    ).start()
    try:
        for failures in 1, 2:
            with (
                httpx.Client(timeout=3) as http,
                connect_sse(http, "GET", server.url + "/stream/") as source,
            ):
                ids = [event.id for event in source.iter_sse() if event.data]  # to its end
            assert ids == ["0", "1"]
            server.wait_for_log("stream failed before id 2", count=failures, timeout=5)
        assert httpx.get(server.url + "/", timeout=5).status_code == 500
        server.wait_for_log("ERROR django.request Internal Server Error: /", timeout=5)
    finally:
        server.stop()
    assert server.served.count("RuntimeError: the reader's code failed") == 2


class Reconnecting:
    """A client that reconnects as EventSource does: after the server's `retry:`
    delay, sending Last-Event-ID. Records every id, and how long each outage lasted."""

    def __init__(self, port):
        self.port = port
        self.ids = []
        self.retry = 3.0  # the browser's default until the server says otherwise
        self.outages = []
        self.down_since = None
        self.back_at = None
        self.writer = None
        self.connections = 0
        self.gaps = []  # between events of one connection

    def hang_up(self):
        """Drop the connection at once, as a restarting proxy does; then reconnect."""
        if self.writer:
            self.writer.transport.abort()

    async def run(self, stop_at):
        while time.monotonic() < stop_at:
            writer = None
            try:
                connect = asyncio.open_connection("127.0.0.1", self.port)
                reader, writer = await asyncio.wait_for(connect, 5)
                self.writer = writer
                resume = f"Last-Event-ID: {self.ids[-1]}\r\n" if self.ids else ""
                writer.write(f"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\n{resume}\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                if head.split()[1] != b"200":
                    raise ConnectionError(head.split(b"\r\n")[0])
                self.connections += 1
                last_event_at = None
                while time.monotonic() < stop_at:  # one chunk, one event
                    size = int(await asyncio.wait_for(reader.readline(), 5), 16)
                    if size == 0:
                        break
                    block = (await reader.readexactly(size + 2)).decode()
                    if match := re.search(r"^retry: (\d+)$", block, re.MULTILINE):
                        self.retry = int(match[1]) / 1000
                    if match := re.search(r"^id: (\d+)$", block, re.MULTILINE):
                        self.ids.append(int(match[1]))
                        if last_event_at is not None:
                            self.gaps.append(time.monotonic() - last_event_at)
                        last_event_at = time.monotonic()
                        if self.down_since is not None:
                            self.outages.append(time.monotonic() - self.down_since)
                            self.down_since = None
                            self.back_at = time.monotonic()
            except (TimeoutError, OSError, EOFError, ValueError):
                pass
            finally:
                if writer:
                    writer.close()
            if time.monotonic() >= stop_at:
                break
            if self.down_since is None:
                self.down_since = time.monotonic()
            await asyncio.sleep(self.retry)


def storm(server, clients, seconds, until_all_back=False):
    """`clients` reconnecting clients; the server restarts once they all stream. They
    stream for `seconds`, or, `until_all_back`, until each has had an event since."""

    async def main():
        stop_at = time.monotonic() + seconds
        crowd = [Reconnecting(server.port) for _ in range(clients)]
        tasks = [asyncio.create_task(each.run(stop_at)) for each in crowd]
        await until(lambda: all(len(each.ids) >= 2 for each in crowd), 30)
        restarted = time.monotonic()
        await asyncio.to_thread(server.restart)
        if until_all_back:
            await until(lambda: all(e.outages and e.down_since is None for e in crowd), seconds)
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=until_all_back)
        return crowd, restarted

    return run(main())


@layer("real_server")
def test_reconnect_storm_loses_nothing(daphne):
    server = daphne(
        endpoint="tcp:port={port}:interface=127.0.0.1:backlog=4096", SSE_INTERVAL="0.5"
    )
    crowd, _ = storm(server, clients=300, seconds=20, until_all_back=True)
    for each in crowd:
        assert each.ids == list(range(len(each.ids)))  # no gap, no duplicate
        assert each.outages, "every client saw the restart"
        assert each.down_since is None, "and came back"


HOSTILE_REQUESTS = [
    (b"GET", b"/stream/", b"Last-Event-ID: " + b"9" * 4000),
    (b"GET", b"/stream/", "Last-Event-ID: \u00e9\u00e8".encode("latin-1")),
    (b"GET", b"/stream/", "Last-Event-ID: \U0001f680 \u0664\u0662".encode()),
    (b"GET", b"/stream/", b"Last-Event-ID: \x00\x7f\xff"),
    (b"GET", b"/stream/", b"Last-Event-ID: 1\r\nLast-Event-ID: 2"),
    (b"GET", b"/stream/?lastEventId=%ff%fe&lastEventId=1", b""),
    (b"GET", b"/stream/?" + b"a=1&" * 2000, b""),
    (b"GET", b"/stream/?lastEventId=" + b"9" * 5000, b""),
    (b"GET", b"/%ff/../stream/", b""),
    (b"GET", b"/stream/", b"Accept: text/html\r\nAccept-Encoding: gzip"),
    (b"POST", b"/stream/", b"Content-Type: application/json\r\nContent-Length: 2"),
    (b"PUT", b"/", b"Content-Length: 0"),
    (b"DELETE", b"/stream/", b""),
    (b"OPTIONS", b"*", b""),
    (b"TRACE", b"/", b""),
    (b"BREW", b"/stream/", b""),
]


def answer_status(port, request):
    """The status Daphne answers a raw request with; None if it only hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(request)
        head = b""
        try:
            while b"\r\n" not in head and (data := raw.recv(4096)):
                head += data
        except ConnectionError:
            pass
    return int(head.split()[1]) if head else None


def hostile_request(method, target, headers):
    request = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n\r\n{}" % (method, target, headers)
    return request.replace(b"\r\n\r\n\r\n", b"\r\n\r\n")


@layer("real_server")
@pytest.mark.parametrize("method, target, headers", HOSTILE_REQUESTS)
def test_hostile_requests_get_an_answer_below_500(server, method, target, headers):
    assert answer_status(server.port, hostile_request(method, target, headers)) < 500


@layer("real_server")
@pytest.mark.parametrize("host", [b"evil.example", b"127.0.0.1:1@evil.example", b""])
def test_unknown_host_gets_400_from_a_real_server(server, host):
    request = b"GET /stream/ HTTP/1.1\r\nHost: %s\r\n\r\n" % host
    assert answer_status(server.port, request) == 400


@layer("real_server")
def test_server_is_unharmed_by_hostile_requests(daphne):
    server = daphne(SSE_INTERVAL="0.1")
    for method, target, headers in HOSTILE_REQUESTS:
        answer_status(server.port, hostile_request(method, target, headers))
    assert [event.id for event in read_events(server.url, 2)] == ["0", "1"]
    assert "Traceback" not in server.log


def raw_answer(port, request):
    """All a server answers to a raw request before it hangs up (b"" for nothing)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            raw.sendall(request)
            while data := raw.recv(65536):
                answer += data
        except ConnectionError:
            pass
    return answer


@layer("real_server")
def test_one_header_line_over_16_kb_gets_a_hang_up_without_an_answer(server):
    big = b"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: %b\r\n\r\n" % (b"a" * 17_000)
    assert raw_answer(server.port, big) == b""
    assert [event.id for event in read_events(server.url, 2)] == ["0", "1"]


@layer("real_server")
def test_header_lines_over_16_kb_in_all_get_400(server):
    lines = b"".join(b"X-Line-%d: %b\r\n" % (n, b"a" * 1000) for n in range(20))
    answer = raw_answer(server.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n%b\r\n" % lines)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert [event.id for event in read_events(server.url, 2)] == ["0", "1"]


# 3. A real browser ------------------------------------------------------------

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Playwright's own Chromium if installed, else the system's."""
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(args=CHROMIUM_ARGS)
        except PlaywrightError:
            names = ["chromium", "chromium-browser", "google-chrome"]
            found = next(filter(None, map(shutil.which, names)), None)
            if not found:
                why = "no Chromium: `playwright install chromium` or `apt-get install chromium`"
                pytest.fail(why) if CI else pytest.skip(why)
            chromium = playwright.chromium.launch(executable_path=found, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page; fails the test on a script error or a blocked resource."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda message: "Content Security Policy" in message.text and errors.append(message.text),
    )
    yield page
    context.close()
    assert not errors


def shown_ids(page):
    return [int(line.split()[-1]) for line in page.locator("#sse-data li").all_text_contents()]


def wait_for_lines(page, count):
    page.wait_for_function("n => document.querySelectorAll('#sse-data li').length >= n", arg=count)


def wait_for_id(page, event_id):
    page.wait_for_function(
        "id => [...document.querySelectorAll('#sse-data li')]"
        ".some(line => line.textContent.endsWith(' ' + id))",
        arg=event_id,
    )


@layer("browser")
def test_browser_start_shows_events_live(server, page):
    page.goto(server.url)
    assert page.locator("#state").text_content() == "stopped"
    assert page.locator("#stop").is_disabled()
    page.click("#start")
    wait_for_lines(page, 3)
    assert page.locator("#state").text_content() == "live"
    assert page.locator("#start").is_disabled()
    assert shown_ids(page)[:3] == [0, 1, 2]
    assert re.fullmatch(r"\S+ 0", page.locator("#sse-data li").first.text_content())
    # A screen reader hears the state change, not a new line every second.
    assert page.locator("#state").get_attribute("role") == "status"
    assert page.locator("[aria-live]").count() == 0


@layer("browser")
def test_browser_stop_closes_the_stream(server, page):
    page.goto(server.url)
    page.click("#start")
    wait_for_lines(page, 2)
    before = len(re.findall("client went away", server.log))
    page.click("#stop")
    server.wait_for_log("client went away", count=before + 1, timeout=5)
    assert page.locator("#state").text_content() == "stopped"
    assert page.locator("#start").is_enabled() and page.locator("#stop").is_disabled()
    shown = shown_ids(page)
    time.sleep(0.5)  # five intervals: any event still coming would be here
    assert shown_ids(page) == shown
    page.click("#start")  # a new EventSource, and the count goes on
    wait_for_id(page, shown[-1] + 2)
    assert shown_ids(page) == list(range(shown[-1] + 3))


@layer("browser")
def test_browser_resumes_across_a_server_restart_with_no_gap(daphne, page):
    server = daphne(SSE_INTERVAL="0.2")
    page.goto(server.url)
    page.click("#start")
    wait_for_lines(page, 3)
    server.stop()
    expect(page.locator("#state")).to_have_text("reconnecting")
    server.start()
    last = shown_ids(page)[-1]
    wait_for_id(page, last + 3)
    ids = shown_ids(page)
    assert ids == list(range(ids[0], ids[0] + len(ids))), ids  # no gap, no duplicate
    assert page.locator("#state").text_content() == "live"


@layer("browser")
def test_browser_goes_on_across_max_age_with_no_gap(daphne, page):
    server = daphne(SSE_INTERVAL="0.1", SSE_MAX_AGE="1")
    page.goto(server.url)
    page.click("#start")
    server.wait_for_log("stream reached SSE_MAX_AGE", count=2, timeout=20)
    ids = shown_ids(page)
    assert len(ids) >= 10 and ids == list(range(len(ids))), ids  # each stream: 5-10 ids


@layer("browser")
def test_browser_says_busy_and_tries_again_by_itself(daphne, page):
    server = daphne(SSE_INTERVAL="0.1", SSE_MAX_STREAMS="1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as other:
        other.sendall(b"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert other.recv(1024).startswith(b"HTTP/1.1 200")  # the only place is taken
        page.goto(server.url)
        page.click("#start")
        expect(page.locator("#state")).to_contain_text("server busy")
    expect(page.locator("#state")).to_have_text("live", timeout=15_000)
    wait_for_lines(page, 2)


def answer_every_stream_with(page, status, headers=None):
    """Routes /stream/ to one answer; the times at which an EventSource asked for it."""
    asked = []

    def answer(route):
        if route.request.resource_type == "eventsource":
            asked.append(time.monotonic())
        route.fulfill(status=status, headers=headers or {}, body="")

    page.route(re.compile(r"/stream/"), answer)
    return asked


def wait_for_asks(page, asked, count, timeout=10):
    """Playwright answers routes only while it is called: wait inside it."""
    deadline = time.monotonic() + timeout
    while len(asked) < count:
        assert time.monotonic() < deadline, f"asked {len(asked)} times, not {count}"
        page.wait_for_timeout(50)


@layer("browser")
def test_browser_waits_as_long_as_retry_after_says_then_longer(server, page):
    asked = answer_every_stream_with(page, 503, {"Retry-After": "1"})
    page.goto(server.url)
    page.click("#start")
    expect(page.locator("#state")).to_have_text("server busy, trying again in 1 s")
    wait_for_asks(page, asked, 3)
    first, second = [later - earlier for earlier, later in pairwise(asked)]
    # At least what Retry-After says, then twice that, each with up to half more for jitter;
    # a loaded machine may fire a timer a little late, never early.
    assert 0.95 < first < 2 and 1.95 < second < 3.6, (first, second)


@layer("browser")
def test_browser_waits_a_minute_at_most(server, page):
    answer_every_stream_with(page, 503, {"Retry-After": "3600"})
    page.goto(server.url)
    page.click("#start")
    expect(page.locator("#state")).to_have_text("server busy, trying again in 60 s")


@layer("browser")
def test_browser_stop_cancels_the_next_try_and_forgets_the_back_off(server, page):
    asked = answer_every_stream_with(page, 503, {"Retry-After": "1"})
    page.goto(server.url)
    page.click("#start")
    wait_for_asks(page, asked, 2)
    expect(page.locator("#state")).to_have_text(re.compile(r"trying again in [23] s"))
    page.click("#stop")
    expect(page.locator("#state")).to_have_text("stopped")
    page.wait_for_timeout(3500)  # longer than the try that was due
    assert len(asked) == 2
    page.click("#start")
    expect(page.locator("#state")).to_have_text("server busy, trying again in 1 s")


@layer("browser")
@pytest.mark.parametrize(
    "status, shown, tries_again",
    [
        (204, "ended by the server", False),  # SSE's "stop for good"
        (404, "failed: HTTP 404", False),
        (502, re.compile(r"no stream \(HTTP 502\), trying again in [23] s"), True),
        # A login page after a redirect, a captive portal: not a stream either.
        (200, re.compile(r"no stream \(HTTP 200\), trying again in [23] s"), True),
    ],
)
def test_browser_tells_other_answers_from_a_busy_server(server, page, status, shown, tries_again):
    asked = answer_every_stream_with(page, status, {"Content-Type": "text/html"})
    page.goto(server.url)
    page.click("#start")
    expect(page.locator("#state")).to_have_text(shown)
    assert page.locator("#start").is_enabled() != tries_again
    page.wait_for_timeout(3200)  # longer than the first try of a back-off
    assert len(asked) == (2 if tries_again else 1)


@layer("browser")
def test_browser_shows_event_data_as_text_never_html(server, page):
    markup = "<img src=x id=injected> 7"
    page.route(
        re.compile(r"/stream/"),
        lambda route: route.fulfill(
            headers={"Content-Type": "text/event-stream"},
            body=f"id: 7\ndata: {markup}\n\n",
        ),
    )
    page.goto(server.url)
    page.click("#start")
    wait_for_lines(page, 1)
    assert page.locator("#sse-data li").first.text_content() == markup
    assert page.locator("#injected").count() == 0


@layer("browser")
def test_browser_keeps_only_the_latest_100_lines(daphne, page):
    server = daphne(SSE_INTERVAL="0.01")
    page.goto(server.url)
    page.click("#start")
    wait_for_id(page, 150)
    ids = shown_ids(page)
    assert len(ids) == 100 and ids == list(range(ids[0], ids[0] + 100)), ids


def make_certificate(directory):
    """A self-signed certificate for localhost and 127.0.0.1, made for this run."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return directory / "key.pem", directory / "cert.pem"


EIGHT_STREAMS = """() => {
    window.received = Array(8).fill(0);
    window.sources = [];
    for (let i = 0; i < 8; i++) {
        window.sources.push(new EventSource("/stream/"));
        window.sources[i].onmessage = () => window.received[i]++;
    }
}"""


def live_streams_of_eight(page, url):
    """Open 8 EventSources on one page; how many of them receive events."""
    page.goto(url)
    page.evaluate(EIGHT_STREAMS)
    page.wait_for_function("() => window.received.filter(n => n >= 3).length >= 6")
    page.wait_for_timeout(2000)  # ten intervals: time for a 7th and 8th to start
    return sum(count >= 3 for count in page.evaluate("window.received"))


@layer("browser")
def test_browser_holds_at_most_six_streams_over_http_1_1(server, page):
    assert live_streams_of_eight(page, server.url) == 6
    assert page.evaluate("performance.getEntries()[0].nextHopProtocol") == "http/1.1"


@layer("browser")
def test_browser_holds_eight_streams_over_http2(daphne, browser, tmp_path):
    if not all(map(importlib.util.find_spec, ["h2", "OpenSSL", "cryptography"])):
        why = 'no HTTP/2 in Twisted: pip install "twisted[tls,http2]"'
        pytest.fail(why) if CI else pytest.skip(why)
    key, certificate = make_certificate(tmp_path)
    endpoint = f"ssl:port={{port}}:interface=127.0.0.1:privateKey={key}:certKey={certificate}"
    server = daphne(endpoint=endpoint, SSE_INTERVAL="0.2")
    context = browser.new_context(ignore_https_errors=True)  # our certificate is our own
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        assert live_streams_of_eight(page, f"https://localhost:{server.port}/") == 8
        assert page.evaluate("performance.getEntries()[0].nextHopProtocol") == "h2"
        # One connection carries all eight: closing one stream ends that one alone.
        page.evaluate("window.sources[0].close()")
        server.wait_for_log("client went away", count=1, timeout=5)
        before = page.evaluate("window.received")
        page.wait_for_timeout(1000)  # five intervals
        after = page.evaluate("window.received")
        assert after[0] == before[0] and all(a - b >= 3 for a, b in zip(after[1:], before[1:]))
        assert len(re.findall("client went away", server.log)) == 1
    finally:
        context.close()


def readme_commands(section, program):
    """The command lines of a README section that start with `program`, as written."""
    readme = (HERE / "README.md").read_text()
    text = readme.split(f"\n## {section}\n")[1].split("\n## ")[0]
    return [shlex.split(line) for line in re.findall(rf"^    ({program} .*)$", text, re.MULTILINE)]


def readme_nginx_config(ports, section="Several processes behind nginx"):
    """The nginx configuration in a README section, with only its three ports changed."""
    readme = (HERE / "README.md").read_text()
    text = readme.split(f"\n## {section}\n")[1].split("\n## ")[0]
    config = re.search(r"```nginx\n(.*?)```", text, re.DOTALL)[1]
    for readme_port, port in zip(["8000", "8001", "8002"], ports, strict=True):
        assert f"127.0.0.1:{readme_port};" in config
        config = config.replace(f"127.0.0.1:{readme_port};", f"127.0.0.1:{port};")
    return config


def start_nginx(directory, config):
    """nginx in the foreground, with its own prefix, pid file and temporary paths."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if not nginx:
        why = "no nginx: apt-get install nginx"
        pytest.fail(why) if CI else pytest.skip(why)
    temporary = " ".join(
        f"{kind}_temp_path {directory / kind};"
        for kind in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
    )
    (directory / "nginx.conf").write_text(
        f"daemon off; master_process off; pid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'};\n"
        f"worker_rlimit_nofile 20000; events {{ worker_connections 10000; }}\n"
        f"http {{ access_log off; {temporary}\n{config}}}\n"
    )
    command = [nginx, "-p", str(directory), "-e", str(directory / "error.log")]
    return subprocess.Popen([*command, "-c", str(directory / "nginx.conf")])


def open_sockets(process):
    fds = Path(f"/proc/{process.pid}/fd")
    return sum(os.readlink(fd).startswith("socket:") for fd in fds.iterdir())


def readme_daphne_behind_nginx():
    """The options and endpoint of the README's Daphne processes behind nginx."""
    commands = readme_commands("Several processes behind nginx", "daphne")
    assert len(commands) == 2, commands
    *options, dash_e, endpoint = commands[0][1:-1]
    assert dash_e == "-e"
    return options, re.sub(r"port=800\d", "port={port}", endpoint)


@layer("browser")
def test_nginx_passes_events_at_once_and_fails_over_without_loss(daphne, page, tmp_path):
    options, endpoint = readme_daphne_behind_nginx()
    backends = [daphne(options=options, endpoint=endpoint, SSE_INTERVAL="0.2") for _ in "12"]
    port = free_port()
    config = readme_nginx_config([port, *(backend.port for backend in backends)])
    nginx = start_nginx(tmp_path, config)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_listening(port, nginx, timeout=10, log=tmp_path / "error.log")
        arrivals = []
        with (
            httpx.Client(timeout=5) as http,
            connect_sse(http, "GET", url + "/stream/") as source,
        ):
            for event in islice((e for e in source.iter_sse() if e.data), 7):
                arrivals.append(time.monotonic())
        gaps = sorted(later - earlier for earlier, later in pairwise(arrivals[1:]))
        # One by one, not batched; a loaded client may read two at once now and then.
        assert 0.1 < gaps[len(gaps) // 2] < 0.35, gaps
        # Daphne logs the first address of X-Forwarded-For: the client cannot choose it.
        httpx.get(url + "/", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=5)
        logs = "".join(backend.log for backend in backends)
        assert '"GET /" 200' in logs and "203.0.113.9" not in logs

        page.goto(url)
        page.click("#start")
        wait_for_lines(page, 3)
        serving = max(backends, key=lambda backend: open_sockets(backend.process))
        serving.process.kill()  # as a crash would
        serving.process.wait()
        wait_for_id(page, shown_ids(page)[-1] + 5)  # back, through the other process
        ids = shown_ids(page)
        assert ids == list(range(len(ids))), ids  # no gap, no duplicate
    finally:
        nginx.terminate()
        nginx.wait(10)


# 4. Your own project: the README's chapter applied to `django-admin startproject` ---------

PASSWORD = "a password for this test only"


def readme_project_files(chapter):
    """A README chapter's files for your own project: (path, how, code) in its order."""
    readme = (HERE / "README.md").read_text()
    section = readme.split(f"\n## {chapter}\n")[1].split("\n## ")[0]
    pattern = r"^`([\w/.]+)`, (the whole file|at the end)[^:\n]*:\n\n```(?:python|html)\n(.*?)```"
    return re.findall(pattern, section, re.MULTILINE | re.DOTALL)


OWN_PROJECT = "Add it to your own project"
OWN_PROJECT_FILES = ["mysite/settings.py", "mysite/asgi.py", "live/views.py", "mysite/urls.py"]


def manage(root, *args, **env):
    """`python manage.py ARGS` in the project at `root`; its output."""
    command = [sys.executable, "manage.py", *args]
    done = subprocess.run(
        command,
        cwd=root,
        env={**os.environ, **env},
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    return done.stdout


# makemigrations, the migrations the README writes beside, migrate and createsuperuser, as
# the README runs them, in one process: each start of a project's Django takes 1 to 2 s of CPU.
SET_UP = f"""import importlib, json, os
from pathlib import Path
from django.core.management import call_command

if Path("live/models.py").read_text().count("class "):
    call_command("makemigrations", "live", verbosity=0)
for path, code in json.loads(os.environ["README_MIGRATIONS"]):
    Path(path).write_text(code)
importlib.invalidate_caches()  # so that Python looks again for what was written
call_command("migrate", verbosity=0, skip_checks=False)
os.environ["DJANGO_SUPERUSER_PASSWORD"] = {PASSWORD!r}
call_command("createsuperuser", interactive=False, username="admin", email="admin@example.com")
"""


def make_project(root, chapters, **env):
    """`django-admin startproject mysite` and `startapp live`, then the README's
    chapters applied as written, migrated, with a superuser."""
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "mysite", str(root)],
        check=True,
        timeout=60,
    )
    manage(root, "startapp", "live")
    migrations = []  # written after `makemigrations`, beside the migration it makes
    for chapter, paths in chapters.items():
        files = readme_project_files(chapter)
        assert [path for path, _, _ in files] == paths, chapter
        for path, how, code in files:
            if "/migrations/" in path:
                migrations.append((path, code))
                continue
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if how == "at the end":
                code = target.read_text() + "\n" + code
            target.write_text(code)
    with open(root / "mysite" / "settings.py", "a") as settings:
        # As Django's testing documentation advises: each login would hash for 0.3 s of CPU.
        settings.write('\nPASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]\n')
    migrations = json.dumps(migrations)
    manage(root, "shell", "--no-imports", "-c", SET_UP, README_MIGRATIONS=migrations, **env)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """`django-admin startproject mysite`, then the README's steps as written."""
    return make_project(tmp_path_factory.mktemp("project"), {OWN_PROJECT: OWN_PROJECT_FILES})


@pytest.fixture(scope="module")
def project_server(project, tmp_path_factory):
    server = Server(
        tmp_path_factory.mktemp("project-daphne"),
        application="mysite.asgi:application",
        cwd=project,
    )
    yield server.start()
    server.stop()
    assert "Traceback" not in server.served, server.served


@contextlib.contextmanager
def logged_in(url):
    """An httpx client logged in through Django's admin, as a person would."""
    with httpx.Client(base_url=url, timeout=10) as http:
        form = http.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)[1]
        fields = {"username": "admin", "password": PASSWORD, "csrfmiddlewaretoken": token}
        assert http.post("/admin/login/?next=/admin/", data=fields).status_code == 302
        yield http


def session_cookie(url):
    """The session cookie of a login through Django's admin."""
    with logged_in(url) as http:
        return f"sessionid={http.cookies['sessionid']}"


def status_of(url, **headers):
    """The status of a GET, without reading a body that may never end."""
    with httpx.stream("GET", url, headers=headers, timeout=5) as response:
        return response.status_code


@layer("own_project")
def test_your_project_refuses_an_anonymous_stream_with_403(project_server):
    assert status_of(project_server.url + "/stream/") == 403


READ_THREE_EVENTS = """() => new Promise((resolve, reject) => {
    const events = [], source = new EventSource("/stream/");
    source.onmessage = (event) => {
        events.push([event.lastEventId, event.data]);
        if (events.length === 3) { source.close(); resolve(events); }
    };
    source.onerror = () => { source.close(); reject(new Error("the stream failed")); };
})"""


@layer("own_project")
def test_your_project_streams_to_a_logged_in_browser(project_server, page):
    page.goto(project_server.url + "/admin/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url("**/admin/")
    events = page.evaluate(READ_THREE_EVENTS)  # the session cookie goes with it
    assert events == [["0", "admin 0"], ["1", "admin 1"], ["2", "admin 2"]]


@layer("own_project")
def test_your_project_holds_300_streams_without_a_thread_each(project_server):
    cookie = f"Cookie: {session_cookie(project_server.url)}\r\n"
    pid = project_server.process.pid

    async def hold_then_drop():
        warm = await open_streams(project_server.port, 1, headers=cookie)
        await until(lambda: len(warm[0].arrivals) >= 2, 10)
        warm[0].transport.close()
        baseline = proc_status(pid, "Threads")
        listeners = await open_streams(project_server.port, 300, ramp=1, headers=cookie)
        peak = baseline
        while not all(len(each.arrivals) >= 3 for each in listeners):
            peak = max(peak, proc_status(pid, "Threads"))
            await asyncio.sleep(0.05)
        assert {each.status for each in listeners} == {200}
        for listener in listeners:
            listener.transport.close()
        for _ in range(40):  # two seconds, sampled as the streams end
            peak = max(peak, proc_status(pid, "Threads"))
            await asyncio.sleep(0.05)
        return baseline, peak

    baseline, peak = run(hold_then_drop())
    assert peak <= baseline + 1, (baseline, peak)


@layer("own_project")
def test_your_project_cap_holds_for_requests_that_arrive_together(project, tmp_path):
    (project / "mysite" / "settings_cap_5.py").write_text(
        "from .settings import *\n\nSSE_MAX_STREAMS = 5\n"
    )
    server = Server(
        tmp_path,
        application="mysite.asgi:application",
        cwd=project,
        DJANGO_SETTINGS_MODULE="mysite.settings_cap_5",
    ).start()
    cookie = f"Cookie: {session_cookie(server.url)}\r\n"
    try:
        statuses = statuses_of_requests_sent_together(server.port, 60, cookie)
        again = statuses_of_requests_sent_together(server.port, 5, cookie)  # all freed
    finally:
        server.stop()
    assert statuses.count(200) == 5 and statuses.count(503) == 55, statuses
    assert again == [200] * 5
    assert "Traceback" not in server.served, server.served


# 5. Your own events: the next chapter, on a real PostgreSQL --------------------------

EVENTS = "Send your own events"
EVENTS_FILES = [
    "mysite/settings.py",
    "mysite/asgi.py",
    "live/models.py",
    "live/migrations/0002_in_commit_order.py",
    "live/migrations/0003_where_rights_change.py",
    "live/events.py",
    "live/views.py",
    "live/templates/live/index.html",
    "mysite/urls.py",
    "live/management/commands/publish.py",
]
# Settings the tests run the project with: as deployed, and beside that, each one change.
DEPLOYED = {"DJANGO_SETTINGS_MODULE": "mysite.settings_deployed"}
TEST_SETTINGS = {
    "deployed": 'DEBUG = False\nALLOWED_HOSTS = ["127.0.0.1"]',
    "atomic": 'DATABASES["default"]["ATOMIC_REQUESTS"] = True',
    "small_log": "SSE_LOG_SIZE = 100",
    "max_bytes": "SSE_MAX_BYTES = 4000",
    "mail": """import django

ADMINS = ["admin@example.com"] if django.VERSION >= (6,) else [("Admin", "admin@example.com")]
mailer = {
    "BACKEND": "django.core.mail.backends.filebased.EmailBackend",
    "OPTIONS": {"file_path": os.environ["MAIL_DIR"]},
}
if "MAILERS" in globals():  # startproject's since Django 6.1
    MAILERS = {"default": mailer}
else:
    EMAIL_BACKEND, EMAIL_FILE_PATH = mailer["BACKEND"], mailer["OPTIONS"]["file_path"]""",
}


class PostgreSQL:
    """A throwaway cluster in a temporary folder, on a free port of 127.0.0.1. PostgreSQL
    refuses to run as root, so as root it runs as the `postgres` user."""

    def __init__(self, **settings):
        programs = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
        )
        if not programs:
            why = "no PostgreSQL: apt-get install postgresql"
            pytest.fail(why) if CI else pytest.skip(why)
        self.programs = programs[-1]
        self.directory = Path(tempfile.mkdtemp(prefix="sse-postgresql-"))
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_owner:
            shutil.chown(self.directory, "postgres")
        self.port = free_port()
        self.settings = [f"--{name}={value}" for name, value in settings.items()]
        self.env = {"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": "mysite"}
        subprocess.run(
            [
                *self.as_owner,
                self.programs / "initdb",
                "-D",
                self.directory / "data",
                "-U",
                "mysite",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            timeout=60,
            capture_output=True,
        )

    @property
    def version(self):
        return self.programs.parent.name

    def start(self):
        self.log_path = self.directory / "postgresql.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.as_owner,
                    self.programs / "postgres",
                    "-D",
                    self.directory / "data",
                    f"--port={self.port}",
                    "--listen_addresses=127.0.0.1",
                    f"--unix_socket_directories={self.directory}",
                    *self.settings,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until_listening(self.port, self.process, log=self.log_path)
            # Listening is not ready: until recovery ends it refuses ("starting up"), and
            # pg_isready says so at once rather than waiting.
            deadline = time.monotonic() + 20
            ready = [self.programs / "pg_isready", "-q", *self.host_options()]
            while subprocess.run(ready, check=False, timeout=10).returncode:
                assert time.monotonic() < deadline, self.log_path.read_text()
                time.sleep(0.05)
        except BaseException:
            self.stop()  # stopped by its pid whatever went wrong: nothing left running
            raise
        return self

    def host_options(self):
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", "mysite"]

    def stop(self):
        """A fast shutdown: open sessions are ended, as in a restart."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def remove(self):
        """Stopped, and its files gone: 130 MB each."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def sql(self, query, *params, dbname="mysite"):
        import psycopg

        with psycopg.connect(**self.connection(dbname), autocommit=True) as connection:
            cursor = connection.execute(query, params)
            return cursor.fetchall() if cursor.description else None

    def restore(self, backup, table, position):
        """`table` as it was when copied to `backup`, and its positions' sequence back at
        `position`, as pg_restore brings a backup back: in one transaction, no trigger."""
        import psycopg

        with psycopg.connect(**self.connection("mysite")) as connection:
            connection.execute("SET LOCAL session_replication_role = replica")
            connection.execute(f"TRUNCATE {table}")
            connection.execute(f"INSERT INTO {table} SELECT * FROM {backup}")
            connection.execute(f"SELECT setval('{table}_position', %s)", [position])

    def connection(self, dbname):
        return {"host": "127.0.0.1", "port": self.port, "user": "mysite", "dbname": dbname}


@contextlib.contextmanager
def a_database():
    """A PostgreSQL of its own with the project's database, removed after."""
    pytest.importorskip("psycopg", reason="pip install psycopg[binary]")
    database = PostgreSQL(fsync="off").start()
    try:
        database.sql("CREATE DATABASE mysite", dbname="postgres")
        yield database
    finally:
        database.remove()


@pytest.fixture(scope="module")
def postgresql():
    with a_database() as database:
        yield database


def make_events_project(root, postgresql):
    """The project of the last chapter with this one's files added, on that PostgreSQL,
    with a user in a group and the settings the tests run it with."""
    chapters = {OWN_PROJECT: OWN_PROJECT_FILES, EVENTS: EVENTS_FILES}
    make_project(root, chapters, **postgresql.env)
    for name, lines in TEST_SETTINGS.items():
        base = "settings" if name == "deployed" else "settings_deployed"
        (root / "mysite" / f"settings_{name}.py").write_text(
            f"import os\n\nfrom .{base} import *  # noqa\n\n{lines}\n"
        )
    return root


@pytest.fixture(scope="module")
def events_project(postgresql, tmp_path_factory):
    return make_events_project(tmp_path_factory.mktemp("events"), postgresql)


def in_project(project, postgresql, code, settings="mysite.settings_deployed", timeout=60, **env):
    """Runs `code` with Django set up in the project, as `manage.py shell -c` does; its output."""
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", code],
        check=False,  # its stderr goes in the failure's message
        cwd=project,
        env={**os.environ, **postgresql.env, "DJANGO_SETTINGS_MODULE": settings, **env},
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def publish_with_command(project, postgresql, data, *to):
    """`python manage.py publish DATA [--user NAME | --group NAME | --topic TOPIC]`; the
    position it printed."""
    output = manage(project, "publish", json.dumps(data), *to, **postgresql.env)
    return int(re.fullmatch(r"published (\d+)\n", output)[1])


PUBLISHER = """import json, sys, time
from django.contrib.auth.models import Group, User
from live.events import publish

for line in sys.stdin:
    data, kind, name = json.loads(line)  # a user or group by name, or by id once deleted
    if kind == "user":
        name = User(pk=name) if isinstance(name, int) else User.objects.get(username=name)
    elif kind == "group":
        name = Group(pk=name) if isinstance(name, int) else Group.objects.get(name=name)
    event = publish(data, name)
    event.refresh_from_db()
    print(event.position, time.time(), flush=True)
"""


class Publisher:
    """publish() in a `manage.py shell` of its own that stays up: a publish takes
    milliseconds, not the second that starting `manage.py publish` takes."""

    def __init__(self, project, env):
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "shell", "--no-imports", "-c", PUBLISHER],
            cwd=project,
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def __call__(self, data, kind=None, name=None):
        """Publishes `data` to everyone, or to the user, group or topic `name`; its
        position."""
        return self.timed(data, kind, name)[0]

    def timed(self, data, kind=None, name=None):
        """The same; its position, and when it was committed."""
        self.process.stdin.write(json.dumps([data, kind, name]) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the publisher stopped"
        position, at = line.split()
        return int(position), float(at)

    def close(self):
        self.process.stdin.close()
        self.process.wait(10)


@pytest.fixture(scope="module")
def publisher(events_project, postgresql):
    publishing = Publisher(events_project, postgresql.env)
    yield publishing
    publishing.close()


def two_daphnes(log_dir, project, env, **options):
    """Two Daphne processes serving the project as deployed, started, as behind a load
    balancer."""
    env = {**DEPLOYED, **env}
    servers = [
        Server(log_dir, application="mysite.asgi:application", cwd=project, **options, **env)
        for _ in range(2)
    ]
    return start_all(servers)


def start_all(servers):
    """Starts each of `servers`; if one fails, stops those started before it."""
    for number, server in enumerate(servers):
        try:
            server.start()
        except BaseException:
            for started in servers[:number]:
                started.stop()
            raise
    return servers


@pytest.fixture(scope="module")
def two_processes(events_project, postgresql, publisher, tmp_path_factory):
    """Two Daphne processes on the one database, as behind a load balancer; the log has
    events from before they started."""
    for number in range(3):
        publisher({"before": number})
    servers = two_daphnes(tmp_path_factory.mktemp("events-daphne"), events_project, postgresql.env)
    yield servers
    for server in servers:
        server.stop()
    for server in servers:
        assert "Traceback" not in server.served, server.served


USERS = """from django.contrib.auth.models import Group, User
from django.test import Client

for name in {groups!r}:
    Group.objects.get_or_create(name=name)
sessions = {{}}
for username, groups in {users!r}.items():
    user, _ = User.objects.get_or_create(username=username)
    user.groups.set(Group.objects.filter(name__in=groups))
    client = Client()
    client.force_login(user)
    sessions[username] = client.cookies["sessionid"].value
print(json.dumps(sessions))
"""


def log_in_users(project, postgresql, users):
    """Users (not staff) in groups, each logged in as Django's login does; their session
    cookies. `users`: {username: [group name, ...]}."""
    groups = sorted({group for names in users.values() for group in names})
    code = "import json\n" + USERS.format(groups=groups, users=users)
    sessions = json.loads(in_project(project, postgresql, code))
    return {username: f"sessionid={session}" for username, session in sessions.items()}


class Follower:
    """A real SSE client (httpx-sse) that reconnects as a browser does: after the server's
    `retry:` delay, sending Last-Event-ID once it has one, the id of any message it
    dispatched, with data or without; to the next of `urls` each time. Any answer but a
    200 ends it, as it does an EventSource. `retry`, when given, overrides the server's."""

    def __init__(self, urls, cookie, last_event_id=None, topics=(), retry=None):
        self.urls, self.cookie, self.last_event_id = urls, cookie, last_event_id
        self.topics = sorted(topics)
        self.query = "".join(f"&topic={topic}" for topic in self.topics).replace("&", "?", 1)
        self.retry, self.fixed_retry = 3.0, retry
        self.events = []  # (id, event type, data) of the events with data
        self.statuses = []
        self.first_id = None  # the position its first stream gave
        self.ended_at = []  # when each stream ended, by the clock (time.time())
        self.attempt = None

    async def follow(self, http):
        self.loop = asyncio.get_running_loop()
        for url in cycle(self.urls):
            self.attempt = asyncio.ensure_future(self.stream(http, url))
            try:
                await asyncio.wait([self.attempt])
            finally:
                self.attempt.cancel()
            self.ended_at.append(time.time())
            if self.statuses and self.statuses[-1] != 200:
                return
            await asyncio.sleep(self.fixed_retry or self.retry)

    async def stream(self, http, url):
        headers = {"Cookie": self.cookie}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        try:
            async with aconnect_sse(
                http, "GET", url + "/stream/" + self.query, headers=headers
            ) as source:
                self.statuses.append(source.response.status_code)
                if source.response.status_code != 200:
                    return
                async for event in source.aiter_sse():
                    if event.retry is not None:
                        self.retry = event.retry / 1000
                    if event.id:
                        self.last_event_id = event.id
                        if self.first_id is None:
                            self.first_id = int(event.id)
                    if event.data:
                        self.events.append((int(event.id), event.event, json.loads(event.data)))
        except httpx.TransportError:
            pass

    def hang_up(self):
        """Drops the connection, as a network blip does; it comes back by itself."""
        self.loop.call_soon_threadsafe(self.attempt.cancel)

    @property
    def streams(self):
        return self.statuses.count(200)

    @property
    def data(self):
        return [data for _, kind, data in self.events if kind == "message"]

    @property
    def ids(self):
        return [event_id for event_id, kind, _ in self.events if kind == "message"]


def eventually(condition, timeout=10, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextlib.contextmanager
def following(followers, started=True):
    """The followers streaming, in an event loop of their own, while the block runs."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    http = httpx.AsyncClient(timeout=httpx.Timeout(5, read=None))
    tasks = [asyncio.run_coroutine_threadsafe(each.follow(http), loop) for each in followers]
    try:
        if started:
            eventually(
                lambda: all(each.first_id is not None for each in followers), 10, "every stream"
            )
        yield followers
    finally:
        for task in tasks:
            task.cancel()
        asyncio.run_coroutine_threadsafe(http.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def post_from_the_view(http, text):
    csrf = {"X-CSRFToken": http.cookies["csrftoken"]}
    assert http.post("/post/", data={"text": text}, headers=csrf).status_code == 204


def database_connections(pid, port):
    """The local ports of the connections process `pid` holds to the database on `port`."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since it was listed
            sockets.add(os.readlink(fd))
    ports = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and f"socket:[{fields[9]}]" in sockets:
            ports.append(int(fields[1].split(":")[1], 16))
    return ports


def feed_connections(pid, postgresql):
    """The names of the feed's connections in process `pid`. Only the feed's: the pool's
    have none, and their number is the pool's to change at any moment."""
    rows = postgresql.sql(
        "SELECT application_name FROM pg_stat_activity"
        " WHERE client_port = ANY(%s) AND application_name LIKE 'live %%'",
        database_connections(pid, postgresql.port),
    )
    return sorted(name for (name,) in rows)


def newest_position(postgresql):
    return postgresql.sql("SELECT coalesce(max(position), 0) FROM live_event")[0][0]


class Relay:
    """A TCP relay to PostgreSQL, as a NAT, a cloud load balancer or a failover address
    is. `freeze()` stops it forwarding on the connections it has, without closing them;
    `cut()` closes them and hangs up on new ones; `forward()` forwards new ones again."""

    def __init__(self, target_port):
        self.target_port, self.port = target_port, free_port()
        self.refusing = False
        self.connections = []  # (frozen, the two writers) of each
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        serving = asyncio.start_server(self.relay, "127.0.0.1", self.port)
        self.server = asyncio.run_coroutine_threadsafe(serving, self.loop).result(5)

    async def relay(self, client_reader, client_writer):
        if self.refusing:
            client_writer.transport.abort()
            return
        reader, writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        frozen = asyncio.Event()
        self.connections.append((frozen, client_writer, writer))

        async def pipe(source, destination):
            while data := await source.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # holds on, forwarding nothing, ever
                destination.write(data)
            destination.close()

        try:
            await asyncio.gather(
                pipe(client_reader, writer), pipe(reader, client_writer), return_exceptions=True
            )
        except asyncio.CancelledError:
            pass  # the relay closed: asyncio's server would log a cancelled handler as an error

    def freeze(self):
        for frozen, _, _ in self.connections:
            self.loop.call_soon_threadsafe(frozen.set)

    def cut(self):
        self.refusing = True
        for _, *writers in self.connections:
            for writer in writers:
                self.loop.call_soon_threadsafe(writer.transport.abort)

    def forward(self):
        self.refusing = False

    def close(self):
        async def stop():
            self.server.close()
            for _, *writers in self.connections:
                for writer in writers:
                    writer.transport.abort()
            running = asyncio.all_tasks() - {asyncio.current_task()}
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# Every event to every stream it is for: once, in order, across processes and restarts.


@layer("events")
def test_events_from_a_sync_view_and_a_command_reach_every_stream_on_both_processes(
    two_processes, events_project, postgresql
):
    cookie = session_cookie(two_processes[0].url)
    followers = [Follower([server.url], cookie) for server in two_processes for _ in range(5)]
    with following(followers), logged_in(two_processes[1].url) as http:
        for number in range(3):
            post_from_the_view(http, f"from the view {number}")
        for number in range(3):
            publish_with_command(events_project, postgresql, {"from the command": number})
        eventually(lambda: all(len(each.events) >= 6 for each in followers), 10, "6 events")
    for each in followers:
        assert each.data == [
            *({"user": "admin", "text": f"from the view {number}"} for number in range(3)),
            *({"from the command": number} for number in range(3)),
        ]
        assert each.ids == sorted(set(each.ids)), "once each, in order"


HELD_BACK = """import sys
from django.db import transaction
from live.events import publish

with transaction.atomic():
    publish({"held back": 1})
    print("published", flush=True)
    sys.stdin.readline()  # its row is written, not yet seen: the racing publisher commits first
"""


@layer("events")
def test_events_arrive_in_the_order_their_transactions_commit(
    two_processes, events_project, postgresql, publisher
):
    cookie = session_cookie(two_processes[0].url)
    followers = [Follower([server.url], cookie) for server in two_processes]
    with following(followers):
        held = subprocess.Popen(
            [sys.executable, "manage.py", "shell", "--no-imports", "-c", HELD_BACK],
            cwd=events_project,
            env={**os.environ, **postgresql.env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        racing = ThreadPoolExecutor(1)
        try:
            assert held.stdout.readline() == "published\n"
            # Publishers wait for each other's commits, never for each other's work.
            racing.submit(publisher, {"racing": 1}).result(timeout=10)
        finally:
            held.stdin.close()  # now it commits
            held.wait(10)
            racing.shutdown()
        publisher({"after both": 1})
        eventually(lambda: all({"after both": 1} in each.data for each in followers), 10)
    for each in followers:
        assert each.data == [{"racing": 1}, {"held back": 1}, {"after both": 1}]


ROLLED_BACK = """from django.db import transaction
from live.events import publish

with transaction.atomic():
    publish({"rolled back": 1})
    transaction.set_rollback(True)
"""


@layer("events")
def test_a_rolled_back_publish_never_arrives(two_processes, events_project, postgresql, publisher):
    cookie = session_cookie(two_processes[0].url)
    followers = [Follower([server.url], cookie) for server in two_processes]
    with following(followers):
        in_project(events_project, postgresql, ROLLED_BACK)
        publisher({"after": 1})
        eventually(lambda: all(each.data for each in followers), 10, "the event after")
    for each in followers:
        assert each.data == [{"after": 1}]


@layer("events")
def test_clients_of_a_killed_process_resume_on_the_other_with_nothing_lost(
    two_processes, postgresql
):
    killed, other = two_processes
    cookie = session_cookie(other.url)
    followers = [Follower([killed.url, other.url], cookie, retry=0.1) for _ in range(10)]
    with following(followers), logged_in(other.url) as http:
        for number in range(10):
            if number == 5:
                os.kill(killed.process.pid, signal.SIGKILL)
                killed.process.wait(10)
            post_from_the_view(http, str(number))
            time.sleep(0.1)
        eventually(lambda: all(len(each.events) >= 10 for each in followers), 10, "10 events")
    killed.start()  # for the tests after this one
    for each in followers:
        assert [data["text"] for data in each.data] == [str(number) for number in range(10)]
        assert each.streams == 2, "came back once"


@layer("events")
def test_300_streams_hold_one_listener_connection_per_process(
    events_project, postgresql, publisher, tmp_path
):
    """Fresh processes: the first streams arrive together and start the feed."""
    servers = two_daphnes(tmp_path, events_project, postgresql.env)
    try:
        # A login on each process opens its pool; the feeds are not started yet.
        cookies = [session_cookie(server.url) for server in servers]
        cookie = f"Cookie: {cookies[0]}\r\n"
        before = [feed_connections(s.process.pid, postgresql) for s in servers]

        async def hold_300():
            streams = []
            for server in servers:
                streams += await open_streams(server.port, 150, headers=cookie)
            await until(lambda: all(len(each.arrivals) >= 1 for each in streams), 20)
            await asyncio.to_thread(publisher, {"to": 300})
            await until(lambda: all(len(each.arrivals) >= 2 for each in streams), 10)
            held = [feed_connections(s.process.pid, postgresql) for s in servers]
            for each in streams:
                each.transport.close()
            return {each.status for each in streams}, held

        statuses, held = run(hold_300())
    finally:
        for server in servers:
            server.stop()
    assert statuses == {200}
    assert before == [[], []]
    assert held == [["live listener", "live reader"]] * 2, "the feed's two, however many streams"
    for server in servers:
        assert "Traceback" not in server.served


# The edges: nothing lost, no stream left deaf, bad input refused.


@layer("events", group="events: edges")
def test_a_stream_gives_its_position_at_once_so_a_drop_before_any_event_loses_nothing(
    two_processes, publisher
):
    """A quiet log: the connection drops before the first event, and an event is published
    while the client is away. A client that follows the SSE rules comes back with it."""
    dropped, other = two_processes
    cookie = session_cookie(other.url)
    followers = [Follower([dropped.url, other.url], cookie) for _ in range(3)]
    with following(followers):
        assert {each.first_id for each in followers} == {newest := followers[0].first_id}
        dropped.stop()
        position = publisher({"while away": 1})
        eventually(lambda: all(each.data for each in followers), 10, "the event")
    dropped.start()
    for each in followers:
        assert each.events == [(position, "message", {"while away": 1})]
        assert position > newest


READ_ON_THE_PAGE = (
    """() => [...document.querySelectorAll("#events li")].map((li) => li.textContent)"""
)


def log_in_on_the_page(page, url, then="live", path="/"):
    """Logs in through Django's admin, which sends the browser on to the page at `path`;
    until the page says `then`."""
    page.goto(url + f"/admin/login/?next={path}")
    page.fill("#id_username", "admin")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(url + path)
    # A fresh process's first stream also opens its listener: seconds, on a busy machine.
    expect(page.locator("#state")).to_have_text(then, timeout=15000)


def post_on_the_page(page, text):
    page.fill("#post input[name=text]", text)
    page.click("#post button")


@layer("events", "browser", group="events: edges")
def test_the_page_resumes_a_quiet_stream_across_a_restart_with_nothing_lost(
    two_processes, publisher, page
):
    server = two_processes[0]
    log_in_on_the_page(page, server.url)
    server.stop()
    expect(page.locator("#state")).to_have_text("reconnecting", timeout=5000)
    publisher({"while away": 1})
    server.start()
    expect(page.locator("#events li")).to_have_text(['{"while away": 1}'], timeout=10000)


@layer("events", group="events: edges")
def test_a_listener_connection_that_dies_without_a_word_is_noticed_and_nothing_is_lost(
    events_project, postgresql, publisher, tmp_path
):
    relay = Relay(postgresql.port)
    servers = two_daphnes(tmp_path, events_project, {**postgresql.env, "PGPORT": str(relay.port)})
    try:
        cookie = session_cookie(servers[0].url)
        followers = [Follower([server.url], cookie) for server in servers]
        with following(followers):
            relay.freeze()  # what the processes hold goes quiet, forever
            frozen_at = time.monotonic()
            position = publisher({"after the freeze": 1})  # straight to PostgreSQL
            eventually(lambda: all(each.data for each in followers), 25, "the event")
            noticed = time.monotonic() - frozen_at
        for each in followers:
            assert each.events == [(position, "message", {"after the freeze": 1})]
            assert each.streams == 1, "the streams themselves went on"
        for server in servers:
            server.wait_for_log("cannot follow the event log, trying again")
        assert noticed < 20, noticed
    finally:
        for server in servers:
            server.stop()
        relay.close()
    for server in servers:
        assert "Traceback" not in server.served, server.served


LISTENERS = "FROM pg_stat_activity WHERE application_name = 'live listener'"


@layer("events", group="events: edges")
def test_a_terminated_listener_connection_loses_nothing(two_processes, postgresql, publisher):
    cookie = session_cookie(two_processes[0].url)
    followers = [Follower([server.url], cookie) for server in two_processes]
    pids = [server.process.pid for server in two_processes]
    with following(followers):
        postgresql.sql(f"SELECT pg_terminate_backend(pid) {LISTENERS}")
        position = publisher({"while nobody listened": 1})
        eventually(lambda: all(each.data for each in followers), 10, "the event")
    for each in followers:
        assert each.events == [(position, "message", {"while nobody listened": 1})]
        assert each.streams == 1, "the streams themselves went on"
    for server in two_processes:
        server.wait_for_log("cannot follow the event log, trying again")
    eventually(
        lambda: (
            [feed_connections(pid, postgresql) for pid in pids]
            == [["live listener", "live reader"]] * 2
        ),
        10,
        "each process's listener again",
    )


def messages(follower):
    """(position, data) of each event it got, and the number of `missed` before them."""
    kinds = [kind for _, kind, _ in follower.events]
    got = [(position, data) for position, kind, data in follower.events if kind == "message"]
    return got, kinds.count("missed")


@layer("events", group="events: edges")
def test_after_the_log_went_back_every_new_event_reaches_every_stream(
    events_project, postgresql, publisher, tmp_path
):
    """`flush`, or TRUNCATE ... RESTART IDENTITY, with the servers running: the new log's
    positions are below what the processes read, and all of it is new."""
    for number in range(5):  # more than comes after: else the new log would reach the old
        publisher({"before": number})
    servers = two_daphnes(tmp_path, events_project, postgresql.env)
    try:
        cookie = session_cookie(servers[0].url)
        open_before = [Follower([server.url], cookie) for server in servers]
        with following(open_before):
            postgresql.sql("TRUNCATE live_event RESTART IDENTITY")
            opened_since = [Follower([server.url], cookie) for server in servers]
            with following(opened_since):
                first = publisher({"after": 1})
                second = publisher({"after": 2})
                eventually(
                    lambda: all(len(each.data) == 2 for each in open_before + opened_since),
                    15,
                    "both events on every stream",
                )
            # A browser that was away: it comes back with a position of the old log.
            comes_back = Follower([servers[1].url], cookie, last_event_id="4")
            with following([comes_back]):
                third = publisher({"after": 3})
                eventually(
                    lambda: all(len(each.data) == 3 for each in [comes_back, *open_before]),
                    10,
                    "every event of the new log",
                )
        new_log = [(first, {"after": 1}), (second, {"after": 2})]
        for each in open_before:
            assert messages(each) == ([*new_log, (third, {"after": 3})], 1)
            assert each.streams == 2, "ended, to be checked again on the new log"
        for each in opened_since:  # told, unless the feed had seen it before they began
            got, missed = messages(each)
            assert got == new_log and missed <= 1
        assert messages(comes_back) == ([*new_log, (third, {"after": 3})], 1)
    finally:
        for server in servers:
            server.stop()
    for server in servers:
        assert "Traceback" not in server.served, server.served


@layer("events", group="events: edges")
def test_after_a_restore_streams_get_only_what_was_committed_since(
    events_project, postgresql, publisher, tmp_path
):
    """A backup restored with the servers running: the log goes back to events the streams
    had, and its next positions are those of events they had too, now other events."""
    for number in range(3):
        publisher({"in the backup": number})
    backed_up = newest_position(postgresql)
    postgresql.sql("CREATE TABLE live_event_backup AS SELECT * FROM live_event")
    servers = two_daphnes(tmp_path, events_project, postgresql.env)
    try:
        cookie = session_cookie(servers[0].url)
        followers = [Follower([server.url], cookie) for server in servers]
        with following(followers):
            had = [publisher({"after the backup": number}) for number in range(3)]
            eventually(lambda: all(len(each.data) == 3 for each in followers), 10, "3 events")
            postgresql.restore("live_event_backup", "live_event", backed_up)
            since = publisher({"after the restore": 1})
            eventually(lambda: all(len(each.data) == 4 for each in followers), 15, "the next")
        assert since == had[0], "a position the streams had, for another event"
        for each in followers:
            assert messages(each) == (
                [
                    *((p, {"after the backup": n}) for n, p in enumerate(had)),
                    (since, {"after the restore": 1}),
                ],
                1,
            )
    finally:
        for server in servers:
            server.stop()
        postgresql.sql("DROP TABLE live_event_backup")
    for server in servers:
        assert "Traceback" not in server.served, server.served


# A server that suspends while its client does not read (uvicorn's flow control, for one)
# leaves a stream paused between two messages: the README's events_for(), driven by hand.
PAUSED_STREAM = """import asyncio, json
from asgiref.sync import sync_to_async
from django.db import transaction
from django.db.models import Max
from live.events import events_for, get_feed, publish
from live.models import Event


def publish_many(count, data):
    with transaction.atomic():
        for number in range(count):
            publish({data: number})
    return Event.objects.aggregate(newest=Max("position"))["newest"]  # committed


async def next_batch(stream):
    return [message.decode() for message in await asyncio.wait_for(anext(stream), 10)]


async def read_up_to(feed, position):
    async with asyncio.timeout(10):
        while feed.last_id < position:
            await asyncio.sleep(0.01)


async def main():
    feed = get_feed()
    await asyncio.wait_for(feed.up.wait(), 10)
    BODY

asyncio.run(main())
"""

AFTER_MISSED = """stream = events_for({"*"}, 10**15, feed.last_id)  # a position the log never had
    print(json.dumps(await next_batch(stream)))
    # Paused here, while three are published and read.
    await read_up_to(feed, await sync_to_async(publish_many)(3, "while paused"))
    print(json.dumps(await next_batch(stream)))"""


@layer("events", group="events: edges")
def test_after_missed_a_stream_goes_on_from_the_position_it_told(events_project, postgresql):
    body = AFTER_MISSED
    told, after = map(
        json.loads,
        in_project(events_project, postgresql, PAUSED_STREAM.replace("BODY", body)).splitlines(),
    )
    position = int(re.match(r"id: (\d+)\nevent: missed\n", told[0])[1])
    assert [re.match(r"id: (\d+)\n", message)[1] for message in after] == [
        str(position + number) for number in (1, 2, 3)
    ]


FALLING_BEHIND = """stream = events_for({"*"}, feed.last_id, feed.last_id)
    await sync_to_async(publish_many)(1, "first")
    print(json.dumps(await next_batch(stream)))
    # Paused here while more are published than memory holds, and the log keeps.
    await read_up_to(feed, await sync_to_async(publish_many)(1100, "while paused"))
    print(json.dumps(await next_batch(stream)))"""


@layer("events", group="events: edges")
def test_a_stream_that_falls_behind_what_the_log_keeps_is_told_so(events_project, postgresql):
    first, after = map(
        json.loads,
        in_project(
            events_project,
            postgresql,
            PAUSED_STREAM.replace("BODY", FALLING_BEHIND),
            settings="mysite.settings_small_log",
        ).splitlines(),
    )
    assert len(first) == 1 and '"first"' in first[0]
    assert len(after) == 1 and "event: missed" in after[0], after[:3]


# A keep-alive due at every turn of the loop: events arrive as the stream gives up waiting
# for them, as now and then one does when a stream's 25 s are up.
KEEP_ALIVE_DUE = """import live.events
    live.events.KEEP_ALIVE = 0
    stream, sent = events_for({"*"}, feed.last_id, feed.last_id), []

    async def read():
        async for batch in stream:
            sent.extend(message.decode() for message in batch)

    reading = asyncio.create_task(read())
    published = []
    for number in range(30):
        published.append(await sync_to_async(publish_many)(1, "kept"))
        await asyncio.sleep(0.005)
    await read_up_to(feed, published[-1])
    await asyncio.sleep(0.1)
    reading.cancel()
    print(json.dumps(published))
    print(json.dumps([message for message in sent if "data:" in message]))"""


@layer("events", group="events: edges")
def test_an_event_that_arrives_as_a_keep_alive_is_due_is_sent(events_project, postgresql):
    published, sent = map(
        json.loads,
        in_project(
            events_project, postgresql, PAUSED_STREAM.replace("BODY", KEEP_ALIVE_DUE)
        ).splitlines(),
    )
    assert [int(re.match(r"id: (\d+)\n", message)[1]) for message in sent] == published


@layer("events", group="events: edges")
def test_a_last_event_id_the_log_no_longer_has_or_never_had_is_told_so(
    events_project, postgresql, publisher, tmp_path
):
    gone = newest_position(postgresql)
    for number in range(101):  # SSE_LOG_SIZE + 1: the feed deletes `gone` as it reads them
        publisher({"filler": number})
    kept = newest_position(postgresql) - 50
    server = Server(
        tmp_path,
        application="mysite.asgi:application",
        cwd=events_project,
        DJANGO_SETTINGS_MODULE="mysite.settings_small_log",
        **postgresql.env,
    ).start()  # a fresh process: its memory does not reach back to `kept`
    try:
        cookie = session_cookie(server.url)
        assert status_of(server.url + "/stream/", Cookie=cookie) == 200  # starts the feed
        eventually(lambda: not postgresql.sql(f"SELECT 1 FROM live_event WHERE position = {gone}"))
        newest = newest_position(postgresql)
        followers = [
            Follower([server.url], cookie, str(gone)),  # no longer kept
            Follower([server.url], cookie, str(kept)),  # kept: read from the log
            Follower([server.url], cookie, "99999999999"),  # from another log
        ]
        with following(followers):
            eventually(
                lambda: all(each.events for each in followers) and len(followers[1].events) >= 50
            )
    finally:
        server.stop()
    assert followers[0].events == [(newest, "missed", {"after": gone})]
    assert followers[1].ids == list(range(kept + 1, newest + 1))
    assert followers[2].events == [(newest, "missed", {"after": 99999999999})]
    assert "Traceback" not in server.served, server.served


@layer("events", group="events: edges")
def test_with_atomic_requests_a_stream_works_and_a_view_publishes_as_it_commits(
    events_project, postgresql, tmp_path
):
    server = Server(
        tmp_path,
        application="mysite.asgi:application",
        cwd=events_project,
        DJANGO_SETTINGS_MODULE="mysite.settings_atomic",
        **postgresql.env,
    ).start()
    try:
        cookie = session_cookie(server.url)
        follower = Follower([server.url], cookie)
        with following([follower]), logged_in(server.url) as http:
            post_from_the_view(http, "in the request's transaction")
            eventually(lambda: follower.data, 10, "the event")
    finally:
        server.stop()
    assert follower.data == [{"user": "admin", "text": "in the request's transaction"}]
    assert "Traceback" not in server.served, server.served


FORM = "application/x-www-form-urlencoded"
BAD_POSTS = {
    "a NUL character": ({"text": "a\x00b"}, None),
    "too long": ({"text": "x" * 501}, None),
    "no text": ({}, None),
    "empty text": ({"text": ""}, None),
    "too many fields": ("&".join(f"f{number}=1" for number in range(1001)), FORM),
    "too large a body": ("text=" + "x" * 2_700_000, FORM),
    "broken multipart": ("--x\r\nno end", "multipart/form-data; boundary=x"),
    "multipart with no boundary": ("text=1", "multipart/form-data"),
    "JSON": ('{"text": "hello"}', "application/json"),
}


@layer("events", group="events: edges")
def test_bad_input_to_a_view_that_publishes_gets_400_and_no_traceback(two_processes, postgresql):
    before = newest_position(postgresql)
    with logged_in(two_processes[0].url) as http:
        headers = {"X-CSRFToken": http.cookies["csrftoken"]}
        statuses = {}
        for why, (body, content_type) in BAD_POSTS.items():
            if content_type is None:
                answer = http.post("/post/", data=body, headers=headers)
            else:
                answer = http.post(
                    "/post/", content=body, headers={**headers, "Content-Type": content_type}
                )
            statuses[why] = answer.status_code
    assert statuses == dict.fromkeys(BAD_POSTS, 400)
    assert newest_position(postgresql) == before, "nothing was published"
    log = two_processes[0].log
    assert "Traceback" not in log and " ERROR " not in log, log


ROW_THEN_PUBLISH = """import threading
from django.contrib.auth.models import User
from django.db import connection, transaction
from live.events import publish

updated, published = threading.Event(), threading.Event()
done = []


def updates_then_publishes():
    with transaction.atomic():
        User.objects.filter(username="admin").update(first_name="A")
        updated.set()
        published.wait(5)
        publish({"by": "A"})
    done.append("A")
    connection.close()


def publishes_then_updates():
    with transaction.atomic():
        updated.wait(5)
        publish({"by": "B"})
        published.set()
        User.objects.filter(username="admin").update(first_name="B")  # waits for A
    done.append("B")
    connection.close()


threads = [threading.Thread(target=updates_then_publishes), threading.Thread(target=publishes_then_updates)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(20)
print(*done)
"""


@layer("events", group="events: edges")
def test_publishers_that_lock_the_same_row_in_either_order_do_not_deadlock(
    two_processes, events_project, postgresql
):
    cookie = session_cookie(two_processes[0].url)
    follower = Follower([two_processes[0].url], cookie)
    with following([follower]):
        done = in_project(events_project, postgresql, ROW_THEN_PUBLISH).split()
        assert sorted(done) == ["A", "B"], "both committed: neither was chosen to die"
        eventually(lambda: len(follower.data) == 2, 10, "both events")
    assert follower.data == [{"by": "A"}, {"by": "B"}], "in the order they committed"


def read_streams_until(url, cookie, positions, last_id=None, timeout=15):
    """Reads streams one after another as a browser does, each from the last id the one
    before gave, until every position has come; the bytes of each stream, and the ids."""
    bodies, ids = [], []
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=httpx.Timeout(5, read=timeout)) as http:
        while not set(positions) <= set(ids):
            assert time.monotonic() < deadline, f"only {ids}"
            headers = {"Cookie": cookie, **({"Last-Event-ID": last_id} if last_id else {})}
            body = b""
            with http.stream("GET", url + "/stream/", headers=headers) as response:
                for chunk in response.iter_bytes():
                    body += chunk
                    ids += [int(i) for i in re.findall(rb"^id: (\d+)\ndata:", chunk, re.MULTILINE)]
                    if set(positions) <= set(ids):
                        break
            bodies.append(body)
            last_id = re.findall(rb"^id: (\d+)$", body, re.MULTILINE)[-1].decode()
    return bodies, ids


@layer("events", group="events: edges")
def test_a_stream_sends_at_most_sse_max_bytes_and_the_browser_comes_back_for_the_rest(
    events_project, postgresql, publisher, tmp_path
):
    server = Server(
        tmp_path,
        application="mysite.asgi:application",
        cwd=events_project,
        DJANGO_SETTINGS_MODULE="mysite.settings_max_bytes",  # 4000
        **postgresql.env,
    ).start()
    try:
        cookie = session_cookie(server.url)
        before = str(newest_position(postgresql))
        positions = [publisher({"text": "x" * 900, "number": number}) for number in range(10)]
        bodies, ids = read_streams_until(server.url, cookie, positions, last_id=before)
    finally:
        server.stop()
    assert ids == positions, "each once, in order"
    assert len(bodies) >= 3 and max(map(len, bodies)) <= 4000, list(map(len, bodies))
    with pytest.raises(subprocess.CalledProcessError) as refused:
        publish_with_command(events_project, postgresql, {"text": "x" * 70_000})
    assert "at most 65536" in refused.value.stderr


@layer("events", "browser", group="events: edges")
def test_a_plain_eventsource_comes_back_by_itself_after_the_log_was_out_of_reach(
    events_project, postgresql, publisher, page, tmp_path
):
    """A deploy during a database outage, and no mail to the admins for any of it."""
    relay = Relay(postgresql.port)
    mail = tmp_path / "mail"
    mail.mkdir()
    server = Server(
        tmp_path,
        application="mysite.asgi:application",
        cwd=events_project,
        DJANGO_SETTINGS_MODULE="mysite.settings_mail",
        MAIL_DIR=str(mail),
        **{**postgresql.env, "PGPORT": str(relay.port)},
    ).start()
    try:
        log_in_on_the_page(page, server.url)
        relay.cut()
        server.restart()  # the page's EventSource comes back to a process with no database
        server.wait_for_log("cannot follow the event log")
        server.wait_for_log(r'"GET /stream/" 200', timeout=15)  # told to come back later
        relay.forward()
        eventually(lambda: len(database_connections(server.process.pid, relay.port)) == 2, 10)
        publisher({"back": 1})
        expect(page.locator("#events li")).to_have_text(['{"back": 1}'], timeout=20000)
    finally:
        server.stop()
        relay.close()
    assert list(mail.iterdir()) == [], "nothing mailed to the admins"
    assert "Traceback" not in server.served, server.served


TWO_EVENT_LOOPS = """import asyncio
from asgiref.sync import sync_to_async
from live.events import events_for, get_feed, publish


async def main(number):
    feed = get_feed()
    await asyncio.wait_for(feed.up.wait(), 10)
    stream = events_for({"*"}, feed.last_id, feed.last_id)
    await sync_to_async(publish)({"loop": number})
    print(len(await asyncio.wait_for(anext(stream), 10)), flush=True)


for number in range(2):  # as tests do, or a server that runs a loop at a time
    asyncio.run(main(number))
"""


@layer("events", group="events: edges")
def test_each_event_loop_has_a_feed_of_its_own(events_project, postgresql):
    assert in_project(events_project, postgresql, TWO_EVENT_LOOPS) == "1\n1\n"


PLACES_FREED_IN_OTHER_THREADS = """import sys, threading
from django.conf import settings
from live.views import Place, places

sys.setswitchinterval(1e-6)


def churn():  # each place dropped at once, and freed in whichever thread collects it
    for _ in range(20_000):
        if places.acquire(blocking=False):
            Place()


threads = [threading.Thread(target=churn) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(sum(places.acquire(blocking=False) for _ in range(settings.SSE_MAX_STREAMS + 1)))
"""


@layer("events", group="events: edges")
def test_your_places_freed_in_any_thread_leave_the_cap_exact(events_project, postgresql):
    assert in_project(events_project, postgresql, PLACES_FREED_IN_OTHER_THREADS) == "1000\n"


# Events for whom they are meant: a user, a group, a topic, and no one else.

PEOPLE = {"ann": ["red"], "bob": ["red", "blue"], "cy": ["blue"], "dee": []}
TOPICS = ["news/a", "news/b"]  # can_follow: "news/..." for anyone logged in


@pytest.fixture(scope="module")
def people(events_project, postgresql):
    """Users who are not staff, in groups, logged in; and the ids the log knows them by."""
    cookies = log_in_users(events_project, postgresql, PEOPLE)
    users = dict(postgresql.sql("SELECT username, id FROM auth_user"))
    groups = dict(postgresql.sql("SELECT name, id FROM auth_group"))
    return cookies, users, groups


def addresses_for(person, topics, users, groups):
    return (
        {"*", f"user:{users[person]}"}
        | {f"group:{groups[group]}" for group in PEOPLE.get(person, [])}
        | {f"topic:{topic}" for topic in topics}
    )


def owed(postgresql, after, addresses):
    """The events the log holds for `addresses` after position `after`: what a stream
    that began there is owed, in order."""
    return postgresql.sql(
        'SELECT position, data FROM live_event WHERE position > %s AND "to" = ANY(%s)'
        " AND NOT revokes ORDER BY position",
        after,
        list(addresses),
    )


ADDRESSES = st.one_of(
    st.just((None, None)),
    st.tuples(st.just("user"), st.sampled_from(sorted(PEOPLE))),
    st.tuples(st.just("group"), st.sampled_from(["red", "blue"])),
    st.tuples(st.just("topic"), st.sampled_from([*TOPICS, "news/c"])),
)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), ADDRESSES),
        st.tuples(st.just("post"), st.sampled_from([0, 1])),  # from the view, on a process
        st.tuples(st.just("hang up"), st.integers(0, 5)),  # a client comes back elsewhere
    ),
    min_size=4,
    max_size=20,
)


@layer("events")
# Each example runs real servers for seconds: a failing one is reported as it is, unshrunk.
@settings(max_examples=5, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(steps=STEPS, topics=st.lists(st.sets(st.sampled_from(TOPICS)), min_size=4, max_size=4))
def test_each_client_gets_exactly_the_events_for_it_and_none_of_anyone_elses(
    two_processes, events_project, postgresql, publisher, people, steps, topics
):
    cookies, users, groups = people
    urls = [server.url for server in two_processes]
    clients = [  # each person on one process, then the other as they come back
        (
            person,
            Follower(
                urls[index % 2 :] + urls[: index % 2], cookies[person], topics=wants, retry=0.05
            ),
        )
        for index, (person, wants) in enumerate(zip(sorted(PEOPLE), topics))
    ]
    # Two come back from before the processes started: what they are owed is in the log.
    clients += [
        (person, Follower(urls, cookies[person], last_event_id="1", retry=0.05))
        for person in ("ann", "dee")
    ]
    with (
        following([each for _, each in clients]),
        logged_in(urls[0]) as first,
        logged_in(urls[1]) as second,
    ):
        for number, (step, what) in enumerate(steps):
            if step == "publish":
                publisher({"number": number}, *what)
            elif step == "post":
                post_from_the_view((first, second)[what], str(number))
            else:
                clients[what][1].hang_up()
        publish_with_command(events_project, postgresql, {"last": True}, "--group", "red")

        def complete():
            return all(
                each.ids[-1:] == [row[0] for row in expected[-1:]]
                for (person, each), expected in zip(clients, expectations)
            )

        expectations = [
            owed(postgresql, each.first_id, addresses_for(person, each.topics, users, groups))
            for person, each in clients
        ]
        eventually(complete, 15, "every client's events")
    for (person, each), expected in zip(clients, expectations):
        assert each.ids == [position for position, _ in expected], person
        assert each.data == [json.loads(data) for _, data in expected], person
        assert "missed" not in [kind for _, kind, _ in each.events]


@layer("events")
def test_a_stream_is_its_users_and_follows_only_topics_they_may(two_processes, people, publisher):
    cookies, users, _ = people
    url = two_processes[0].url + "/stream/"
    assert status_of(url) == 403, "not logged in"
    assert status_of(url + "?topic=staff/news", Cookie=cookies["ann"]) == 403, "not staff"
    assert status_of(url + "?topic=order/17", Cookie=cookies["ann"]) == 403, "no rule allows"
    assert status_of(url + "?topic=news/a&topic=order/17", Cookie=cookies["ann"]) == 403
    assert status_of(url + "?topic=staff/news", Cookie=session_cookie(two_processes[0].url)) == 200
    # A user or a topic named in the query string changes nothing of what the stream gets.
    forged = f"?user={users['bob']}&to=user:{users['bob']}&topic=news/a"
    follower = Follower([two_processes[0].url], cookies["ann"], topics=["news/a"])
    follower.query = forged
    with following([follower]):
        publisher({"for": "bob"}, "user", "bob")
        publisher({"for": "blue"}, "group", "blue")
        publisher({"for": "ann"}, "user", "ann")
        eventually(lambda: follower.data, 10, "ann's event")
    assert follower.data == [{"for": "ann"}]


BAD_STREAM_QUERIES = {
    "too many topics": "&".join(f"topic=news/{number}" for number in range(11)),
    "thousands of fields": "&".join("topic=n" for _ in range(1500)),
    "a topic of kilobytes": "topic=news/" + "x" * 3000,
    "an address for a topic": "topic=user:1",
    "capitals": "topic=News/A",
    "odd characters": "topic=news/%C3%A9t%C3%A9",
    "a path": "topic=news/../staff",
    "an empty topic": "topic=",
    "too many parts": "topic=a/b/c/d/e",
}


@layer("events")
def test_bad_input_to_a_stream_gets_400_and_no_traceback(two_processes, people):
    cookies, _, _ = people
    url = two_processes[1].url + "/stream/?"
    statuses = {
        why: status_of(url + query, Cookie=cookies["ann"])
        for why, query in BAD_STREAM_QUERIES.items()
    }
    assert statuses == dict.fromkeys(BAD_STREAM_QUERIES, 400)
    log = two_processes[1].log
    assert "Traceback" not in log and " ERROR " not in log, log


BAD_ADDRESSES = """from django.contrib.auth.models import Group, User
from live.events import publish

for to in [User(username="unsaved"), Group(name="unsaved"), "user:1", "Order/17", "a/b/c/d/e",
           "x" * 100, "", 17, ["news/a"], {"user": 1}]:
    try:
        publish({"never": "sent"}, to)
    except ValueError as error:
        print("refused:", error)
for data in [float("nan"), {1, 2}, b"bytes"]:
    try:
        publish(data)
    except (TypeError, ValueError) as error:
        print("refused:", type(error).__name__)
"""


@layer("events")
def test_publish_refuses_what_is_not_an_address_or_json(events_project, postgresql):
    before = newest_position(postgresql)
    output = in_project(events_project, postgresql, BAD_ADDRESSES).splitlines()
    assert len(output) == 13 and all(line.startswith("refused: ") for line in output), output
    assert newest_position(postgresql) == before


LOG_OUT = "#logout-form button"


@layer("events", "browser")
def test_logging_out_ends_the_users_stream_on_the_other_process_within_2_s(two_processes, page):
    one, other = two_processes
    log_in_on_the_page(page, other.url)
    admin = page.context.new_page()  # the same browser: cookies are per host, not per port
    admin.goto(one.url + "/admin/")
    admin.click(LOG_OUT)
    logged_out = time.monotonic()
    expect(page.locator("#state")).to_have_text("reconnecting", timeout=2000)
    ended_within = time.monotonic() - logged_out
    expect(page.locator("#state")).to_have_text("closed: Log in first", timeout=10000)
    admin.close()
    assert ended_within < 2


@layer("events", "browser")
def test_a_page_refused_by_a_server_then_gone_says_so_without_a_script_error(two_processes, page):
    # The page asks again to read why: by then the server may be out of reach too.
    asked = []

    def refuse_then_drop(route):
        asked.append(route.request.url)
        if len(asked) == 1:
            route.fulfill(status=403, body="Log in first", content_type="text/plain")
        else:
            route.abort("connectionrefused")

    page.route(re.compile(r"/stream/"), refuse_then_drop)
    log_in_on_the_page(page, two_processes[0].url, then="closed: the server is out of reach")
    assert len(asked) == 2


@layer("events", "browser", group="events: edges")
def test_a_message_not_taken_stays_in_the_box_and_the_page_says_why(
    two_processes, page, postgresql
):
    before = newest_position(postgresql)
    log_in_on_the_page(page, two_processes[0].url)
    page.route(re.compile(r"/post/"), lambda route: route.abort("connectionrefused"))
    post_on_the_page(page, "not sent")
    expect(page.locator("#refused")).to_have_text("The server is out of reach")
    expect(page.locator("#post input[name=text]")).to_have_value("not sent")
    page.unroute(re.compile(r"/post/"))
    page.context.clear_cookies(name="sessionid")  # logged out, as by another tab
    page.click("#post button")
    # Not the login page that login_required would redirect fetch() to, taken for a post.
    expect(page.locator("#refused")).to_have_text("Log in again")
    expect(page.locator("#post input[name=text]")).to_have_value("not sent")
    assert newest_position(postgresql) == before, "nothing was published"


# Every way Django takes a right away, each on a user of its own, in a group of its own:
# the change, and what the user's stream then gets when it comes back.
REFUSED, ONLY_THEIR_OWN, ALL_BUT_THE_CHANGE = 403, "their own", "their own and the group's"
RIGHTS_TAKEN = {
    "user deleted": ("user.delete()", REFUSED),
    "users deleted by a queryset": ("User.objects.filter(pk=user.pk).delete()", REFUSED),
    "deactivated by save()": ("user.is_active = False\nuser.save()", REFUSED),
    "deactivated by update()": (
        "User.objects.filter(pk=user.pk).update(is_active=False)",
        REFUSED,
    ),
    "a new password by save()": ("user.set_password('another one')\nuser.save()", REFUSED),
    "a new password by update()": (
        "User.objects.filter(pk=user.pk).update(password='!')",
        REFUSED,
    ),
    "session deleted": ("Session.objects.filter(pk=session).delete()", REFUSED),
    "session deleted by raw SQL": (
        "cursor.execute('DELETE FROM django_session WHERE session_key = %s', [session])",
        REFUSED,
    ),
    "group deleted": ("group.delete()", ONLY_THEIR_OWN),
    "left by user.groups.remove()": ("user.groups.remove(group)", ONLY_THEIR_OWN),
    "left by group.user_set.remove()": ("group.user_set.remove(user)", ONLY_THEIR_OWN),
    "left by user.groups.clear()": ("user.groups.clear()", ONLY_THEIR_OWN),
    "left by group.user_set.clear()": ("group.user_set.clear()", ONLY_THEIR_OWN),
    "left by user.groups.set()": ("user.groups.set([])", ONLY_THEIR_OWN),
    "left by a queryset of memberships": (
        "User.groups.through.objects.filter(user=user).delete()",
        ONLY_THEIR_OWN,
    ),
    "left by raw SQL": (
        "cursor.execute('DELETE FROM auth_user_groups WHERE user_id = %s', [user.pk])",
        ONLY_THEIR_OWN,
    ),
    "a permission taken from the user": ("user.user_permissions.clear()", ALL_BUT_THE_CHANGE),
    "a permission taken from the group": ("group.permissions.clear()", ALL_BUT_THE_CHANGE),
}
GIVE_RIGHTS = """from django.contrib.auth.models import Group, Permission, User

view_user = Permission.objects.get(codename="view_user")
ids = {}
for name in NAMES:
    user, (group, _) = User.objects.get(username=name), Group.objects.get_or_create(name=name)
    if name in WITH_PERMISSIONS:
        user.user_permissions.add(view_user)
        group.permissions.add(view_user)
    ids[name] = [user.pk, group.pk]
print(json.dumps(ids))
"""
TAKE_RIGHTS = """import time
from django.contrib.auth.models import Group, User
from django.contrib.sessions.models import Session
from django.db import connection, transaction

changed = {}
for case, (name, session, change) in CHANGES.items():
    user, group = User.objects.get(username=name), Group.objects.get(name=name)
    with transaction.atomic(), connection.cursor() as cursor:
        exec(change, {**globals(), "user": user, "group": group, "session": session, "cursor": cursor})
    changed[case] = time.time()
print(json.dumps(changed))
"""


@pytest.fixture(scope="module")
def rights_taken(two_processes, events_project, postgresql, publisher):
    """A user of its own for each way in RIGHTS_TAKEN and a group of the same name, a stream
    open on each process. The rights taken, each in a transaction of its own; then events
    for each user and group. Per way: when it was committed, the streams, and the
    positions published after it."""
    names = {case: f"right{number}" for number, case in enumerate(RIGHTS_TAKEN)}
    # Those refused are in no group and have no permission: only the change ends their
    # streams, not the memberships and permissions that a deleted user's rows take along.
    groups = {
        name: [] if RIGHTS_TAKEN[case][1] == REFUSED else [name] for case, name in names.items()
    }
    cookies = log_in_users(events_project, postgresql, groups)
    given = [name for case, name in names.items() if RIGHTS_TAKEN[case][1] == ALL_BUT_THE_CHANGE]
    code = f"import json\nNAMES, WITH_PERMISSIONS = {sorted(names.values())!r}, {given!r}\n"
    ids = json.loads(in_project(events_project, postgresql, code + GIVE_RIGHTS))
    followers = {
        case: [Follower([server.url], cookies[name], retry=0.1) for server in two_processes]
        for case, name in names.items()
    }
    changes = {
        case: (name, cookies[name].removeprefix("sessionid="), RIGHTS_TAKEN[case][0])
        for case, name in names.items()
    }
    with following([each for pair in followers.values() for each in pair]):
        code = f"import json\nCHANGES = {changes!r}\n" + TAKE_RIGHTS
        changed = json.loads(in_project(events_project, postgresql, code))
        after = {
            case: {
                "group": publisher({"for": "the group"}, "group", ids[name][1]),
                "user": publisher({"for": "the user"}, "user", ids[name][0]),
            }
            for case, name in names.items()
        }

        def settled(case):
            streams = followers[case]
            if RIGHTS_TAKEN[case][1] == REFUSED:
                return all(each.statuses == [200, 403] for each in streams)
            return all(after[case]["user"] in each.ids for each in streams)

        # Each test judges its own way: where one never settles, its test fails, not all.
        with contextlib.suppress(AssertionError):
            eventually(lambda: all(map(settled, RIGHTS_TAKEN)), 15)
    return {case: (changed[case], followers[case], after[case]) for case in RIGHTS_TAKEN}


@layer("events")
@pytest.mark.parametrize("case", RIGHTS_TAKEN)
def test_a_right_taken_away_ends_the_stream_on_every_process_within_2_s(rights_taken, case):
    changed, followers, after = rights_taken[case]
    comes_back = RIGHTS_TAKEN[case][1]
    for each in followers:
        assert each.ended_at[0] - changed < 2, "ended within 2 s"
        assert each.statuses[:2] == [200, 403 if comes_back == REFUSED else 200]
        got = set(each.ids) & set(after.values())
        if comes_back == REFUSED:
            assert got == set(), "nothing for the user or the group after the change"
        elif comes_back == ONLY_THEIR_OWN:
            assert got == {after["user"]}, "their own events, not the former group's"
        else:
            assert got == set(after.values())


# 6. Keep gunicorn: the project where it already runs ------------------------------------

KEEP_GUNICORN = "Keep gunicorn"


def on_ports(command, ports):
    """`command` with the README's ports 8001, 8002 changed to `ports`."""
    line = shlex.join(command)
    for readme_port, port in zip(["8001", "8002"], ports, strict=False):
        line = line.replace(readme_port, str(port))
    return shlex.split(line)


@contextlib.contextmanager
def readme_wsgi_shape(directory, project, env):
    """The README's shape, as written: gunicorn's sync workers serve the pages, a Daphne
    process serves /stream/, nginx sends each its part; stopped by their pids after."""
    front, pages_port, streams_port = free_port(), free_port(), free_port()
    (gunicorn,) = readme_commands(KEEP_GUNICORN, "gunicorn mysite.wsgi")
    (daphne,) = readme_commands(KEEP_GUNICORN, "daphne")
    pages, streams = start_all(
        [
            Server(
                directory,
                kind,
                command=on_ports(command, [pages_port, streams_port]),
                port=port,
                cwd=project,
                **env,
            )
            for kind, command, port in [
                ("gunicorn", gunicorn, pages_port),
                ("daphne", daphne, streams_port),
            ]
        ]
    )
    config = readme_nginx_config([front, pages_port, streams_port], KEEP_GUNICORN)
    nginx = start_nginx(directory, config)
    try:
        wait_until_listening(front, nginx, log=directory / "error.log")
        pages.until_answering()
        url = f"http://127.0.0.1:{front}"
        yield SimpleNamespace(url=url, port=front, pages=pages, streams=streams)
    finally:
        nginx.terminate()
        nginx.wait(10)
        for server in pages, streams:
            server.stop()


@pytest.fixture(scope="module")
def wsgi_shape(events_project, postgresql, tmp_path_factory):
    directory = tmp_path_factory.mktemp("wsgi-shape")
    with readme_wsgi_shape(directory, events_project, {**postgresql.env, **DEPLOYED}) as shape:
        yield shape
    for server in shape.pages, shape.streams:
        assert "Traceback" not in server.served, server.served


def readme_uvicorn_workers(directory, project, env):
    """The project on gunicorn's uvicorn workers, by the README's command, started."""
    (command,) = readme_commands(KEEP_GUNICORN, "gunicorn mysite.asgi:application")
    port = free_port()
    command = [*command, "--bind", f"127.0.0.1:{port}"]
    server = Server(directory, "gunicorn", command=command, port=port, cwd=project, **env).start()
    try:  # gunicorn listens before its workers have imported Django: a busy machine takes seconds
        workers = int(command[command.index("--workers") + 1])
        server.wait_for_log("Application startup complete", count=workers, timeout=30)
    except BaseException:
        server.stop()
        raise
    return server


@layer("gunicorn", "browser")
def test_wsgi_pages_and_a_daphne_stream_behind_nginx_work_as_one_site(wsgi_shape, publisher, page):
    log_in_on_the_page(page, wsgi_shape.url)  # through nginx: gunicorn, then Daphne
    post_on_the_page(page, "posted to gunicorn")
    expect(page.locator("#events li")).to_have_count(1, timeout=5000)
    assert "posted to gunicorn" in page.locator("#events li").first.text_content()
    wsgi_shape.pages.restart()  # the stream goes on
    publisher({"while": "gunicorn restarted"})
    expect(page.locator("#events li")).to_have_count(2, timeout=5000)
    wsgi_shape.streams.stop()  # the browser comes back, and loses nothing
    away = page.wait_for_event("response", lambda answer: "/stream/" in answer.url, timeout=10000)
    assert away.status == 200, "nginx's own stream, not a 502 that ends EventSource for good"
    publisher({"while": "daphne was down"})
    wsgi_shape.streams.start()
    expect(page.locator("#events li").first).to_have_text(
        '{"while": "daphne was down"}', timeout=10000
    )
    expect(page.locator("#events li")).to_have_count(3)
    # Had nginx sent the stream to gunicorn, the page would never have gone live.
    assert "/admin/" not in wsgi_shape.streams.served + wsgi_shape.streams.log, "streams only"


@layer("gunicorn")
def test_wsgi_pages_keep_answering_with_300_streams_open_through_nginx(wsgi_shape, publisher):
    cookie = f"Cookie: {session_cookie(wsgi_shape.url)}\r\n"

    async def pages_while_streaming():
        streams = await open_streams(wsgi_shape.port, 300, headers=cookie)
        await until(lambda: all(len(each.arrivals) >= 1 for each in streams), 20)
        async with httpx.AsyncClient(base_url=wsgi_shape.url, timeout=5) as http:
            statuses = [(await http.get("/admin/login/")).status_code for _ in range(20)]
        await asyncio.to_thread(publisher, {"to": "all 300"})
        await until(lambda: all(len(each.arrivals) >= 2 for each in streams), 10)
        for each in streams:
            each.transport.close()
        return statuses, {each.status for each in streams}

    statuses, stream_statuses = run(pages_while_streaming())
    assert statuses == [200] * 20 and stream_statuses == {200}


@layer("gunicorn")
def test_asgi_under_gunicorn_with_4_uvicorn_workers_loses_nothing_and_stops_in_time(
    events_project, postgresql, publisher, tmp_path
):
    server = readme_uvicorn_workers(tmp_path, events_project, {**postgresql.env, **DEPLOYED})
    cookie = session_cookie(server.url)
    followers = [Follower([server.url], cookie, retry=0.05) for _ in range(12)]
    with following(followers), logged_in(server.url) as http:
        for number in range(12):
            followers[number].hang_up()  # back on whichever worker takes it
            if number % 3:
                publisher({"number": number})
            else:
                post_from_the_view(http, str(number))
        publish_with_command(events_project, postgresql, {"last": True})
        eventually(lambda: all({"last": True} in each.data for each in followers), 10)
        stopping = time.monotonic()
        server.stop(timeout=20)  # with every stream open
        stopped_in = time.monotonic() - stopping
    workers = {line for line in server.served.splitlines() if "Booting worker with pid" in line}
    assert len(workers) == 4
    for each in followers:
        expected = owed(postgresql, each.first_id, {"*"})
        assert each.ids == [position for position, _ in expected]
    assert stopped_in < 5 + 3, "--graceful-timeout bounds the wait for open streams"
    assert "Traceback" not in server.served, server.served


@layer("gunicorn", "browser")
def test_the_stream_under_a_wsgi_server_says_so_once_and_the_page_stops_asking(
    events_project, postgresql, page, tmp_path
):
    port = free_port()
    server = Server(
        tmp_path,
        "gunicorn",
        command=["gunicorn", "mysite.wsgi", "--workers", "2", "--bind", f"127.0.0.1:{port}"],
        port=port,
        cwd=events_project,
        **postgresql.env,
        **DEPLOYED,
    ).start()
    server.until_answering()
    asked = []
    page.on("request", lambda request: "/stream/" in request.url and asked.append(request.url))
    try:
        refused = re.compile(r"closed: /stream/ needs an ASGI server: serve it with Daphne")
        log_in_on_the_page(page, server.url, then=refused)
        for _ in range(3):
            page.reload()
            expect(page.locator("#state")).to_have_text(refused, timeout=5000)
        time.sleep(4)  # longer than EventSource waits before it asks again
    finally:
        server.stop()
    assert len(asked) == 4 * 2, "each page: its EventSource, then the page's one question"
    said = server.served.count("/stream/ needs an ASGI server")
    assert 1 <= said <= 2, "once a process, whichever served the streams"
    assert "Traceback" not in server.served, server.served


# 7. A reply streamed as it is made: the next chapter, with a stand-in for the model ----

CHAT = "Stream a reply as it is made"
CHAT_FILES = [
    "mysite/settings.py",
    "live/models.py",
    "live/replies.py",
    "live/management/commands/replies.py",
    "live/chat.py",
    "live/templates/live/chat.html",
    "mysite/urls.py",
]


def answer_to(messages):
    """The stand-in's answer: it names the turn and the prompt, and holds what a page must
    show as text (markup, a line break, characters outside the BMP)."""
    prompt = messages[-1]["content"]
    turn = sum(message["role"] == "user" for message in messages)
    if "[long]" in prompt:  # 16,000 characters that compress as prose does, not as one word
        words = random.Random(prompt).choices(LONG_WORDS, k=4000)
        return f"Turn {turn}: {' '.join(words)}"[:16_000]
    return f"Turn {turn}: «{prompt}» <b>not bold</b>\n" + "".join(
        f"word{number} 🦾 " for number in range(200)
    )


LONG_WORDS = [
    "".join(random.Random(n).choices("abcdefghijklmnopqrstuvwxyz", k=n % 9 + 2))
    for n in range(5000)
]


class StandIn:
    """The model, as the tests have it: a server of OpenAI's chat completions and of
    Anthropic's messages, streaming each answer in `chunks` at `per_second`, or as a
    prompt says ("[400 at 20/s]"); failing where a prompt says so ([429], [500], [break]
    mid-answer, [stall] mid-answer), or refusing connections after refuse(). Each request
    is kept: its messages, its chunks, when each went out, when its client hung up; a
    process of its own gives them as JSON at /records."""

    PACE = re.compile(r"\[(\d+) at (\d+)/s\]")

    def __init__(self, port=None, chunks=30, per_second=100):
        self.port, self.chunks, self.per_second = port or free_port(), chunks, per_second
        self.requests = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.listen()

    def listen(self):
        serving = asyncio.start_server(self.serve, "127.0.0.1", self.port, reuse_address=True)
        self.server = asyncio.run_coroutine_threadsafe(serving, self.loop).result(5)

    def refuse(self):
        """Stops listening: connections are refused, until listen()."""
        asyncio.run_coroutine_threadsafe(self.stop_listening(), self.loop).result(5)

    async def stop_listening(self):
        self.server.close()

    def requests_for(self, prompt):
        return [each for each in self.requests if each.messages[-1]["content"] == prompt]

    def request_for(self, prompt):
        """The latest request whose prompt was `prompt`."""
        return self.requests_for(prompt)[-1]

    async def serve(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /records "):
                records = json.dumps([vars(each) for each in self.requests]).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(records), records)
                )
                return await writer.drain()
            length = int(re.search(rb"(?im)^content-length: *(\d+)", head)[1])
            body = json.loads(await reader.readexactly(length))
            request = SimpleNamespace(
                messages=body["messages"], received=time.time(), sent=[], hung_up=None
            )
            self.requests.append(request)
            anthropic = head.split()[1].endswith(b"/messages")
            streaming = asyncio.ensure_future(self.stream(request, writer, anthropic))
            closed = asyncio.ensure_future(reader.read(1))  # b"" once the client hangs up
            await asyncio.wait([streaming, closed], return_when=asyncio.FIRST_COMPLETED)
            # The client's close seen as the end of what it sends, or as a reset.
            if not streaming.done() or isinstance(streaming.exception(), ConnectionError):
                request.hung_up = time.time()
                streaming.cancel()
            closed.cancel()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stream(self, request, writer, anthropic):
        prompt = request.messages[-1]["content"]
        refused = re.search(r"\[(429|500)\]", prompt)
        status = refused[1] if refused else None
        if anthropic and not all(message["content"].strip() for message in request.messages):
            status = "400"  # as Anthropic's API refuses a turn of no text
        if status:
            body = b'{"error": {"type": "stand_in", "message": "as the prompt asked"}}'
            writer.write(
                b"HTTP/1.1 %b Refused\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%b"
                % (status.encode(), len(body), body)
            )
            return await writer.drain()
        chunks, per_second = self.chunks, self.per_second
        if pace := self.PACE.search(prompt):
            chunks, per_second = int(pace[1]), int(pace[2])
        text = answer_to(request.messages)
        size = -(-len(text) // chunks)
        request.pieces = pieces = [
            text[start : start + size] for start in range(0, len(text), size)
        ]
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )

        def send(kind, data):
            event = (f"event: {kind}\n" if anthropic else "") + f"data: {json.dumps(data)}\n\n"
            writer.write(b"%x\r\n%b\r\n" % (len(event.encode()), event.encode()))

        counted = {"input_tokens": len(request.messages), "output_tokens": len(pieces)}
        message = {"id": "stand-in", "type": "message", "role": "assistant", "content": []}
        chunk = {"id": "stand-in", "object": "chat.completion.chunk", "created": 0}
        if anthropic:
            message.update(model="stand-in", stop_reason=None, stop_sequence=None)
            send(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        **message,
                        "usage": {"input_tokens": counted["input_tokens"], "output_tokens": 0},
                    },
                },
            )
            send(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        started = time.monotonic()
        for number, piece in enumerate(pieces):
            if number == 3 and "[break]" in prompt:
                return  # the connection goes, mid-answer
            if number == 3 and "[stall]" in prompt:
                await asyncio.Event().wait()  # not a byte more
            if anthropic:
                send(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
            else:
                send(
                    "chunk",
                    {
                        **chunk,
                        "model": "stand-in",
                        "choices": [
                            {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                        ],
                    },
                )
            await writer.drain()
            request.sent.append(time.time())
            await asyncio.sleep(max(0, started + (number + 1) / per_second - time.monotonic()))
        if anthropic:
            send("content_block_stop", {"type": "content_block_stop", "index": 0})
            send(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": counted["output_tokens"]},
                },
            )
            send("message_stop", {"type": "message_stop"})
        else:
            usage = {
                "prompt_tokens": counted["input_tokens"],
                "completion_tokens": counted["output_tokens"],
                "total_tokens": sum(counted.values()),
            }
            send("chunk", {**chunk, "model": "stand-in", "choices": [], "usage": usage})
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    def close(self):
        self.refuse()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    @classmethod
    def serve_forever(cls, port):
        """A stand-in in a process of its own, for a benchmark: it takes a core of its own."""
        cls(port)
        threading.Event().wait()


class ReplyWorker:
    """`python manage.py replies` in a process of its own, its output in a file."""

    def __init__(self, log_dir, project, env):
        self.log_dir, self.project, self.env = log_dir, project, env
        self.starts, self.served = 0, ""

    def start(self):
        self.starts += 1
        self.log_path = self.log_dir / f"worker-{id(self)}-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "replies"],
                cwd=self.project,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self, timeout=20):
        """SIGTERM, as a deploy sends it; SIGKILL if it has not ended within `timeout`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.served += self.log_path.read_text(errors="replace")
        return self.process.returncode

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.served += self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def paused(*pids):
    """The processes `pids` stand still, as on a machine that stalls, to the block's end."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def paused_inside_a_transaction(pid, database):
    """As paused(), caught between two statements of a transaction of its own."""
    inside = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE state = 'idle in transaction' AND client_port = ANY(%s)"
    )
    connections, deadline = database_connections(pid, database.port), time.monotonic() + 20
    for attempt in count():
        with paused(pid):
            time.sleep(0.02)  # for what it sent before it stopped
            if database.sql(inside, connections) != [(0,)]:
                yield
                return
        assert time.monotonic() < deadline, "never caught inside a transaction"
        time.sleep(0.003 * (attempt % 7))  # not in step with its commits


def until_workers_listen(database, count):
    """Until `count` workers listen: on a loaded machine one takes seconds to start."""
    listening = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'live replies'"
    eventually(lambda: database.sql(listening) == [(count,)], 30, f"{count} workers listening")


@pytest.fixture(scope="module")
def stand_in():
    model = StandIn()
    yield model
    model.close()


@pytest.fixture(scope="module")
def chat_database():
    """A PostgreSQL of its own: the chat's project has a model more than the last one's."""
    with a_database() as database:
        yield database


def make_chat_project(root, database, stand_in):
    """The project of the last two chapters with this one's files added, on `database`,
    with the stand-in for the model."""
    chapters = {OWN_PROJECT: OWN_PROJECT_FILES, EVENTS: EVENTS_FILES, CHAT: CHAT_FILES}
    make_project(root, chapters, **database.env)
    for name, lines in TEST_SETTINGS.items():
        base = "settings" if name == "deployed" else "settings_deployed"
        (root / "mysite" / f"settings_{name}.py").write_text(
            f"import os\n\nfrom .{base} import *  # noqa\n\n{lines}\n"
        )
    (root / "mysite" / "settings_chat.py").write_text(
        "import os\n\nfrom .settings_deployed import *  # noqa\n\n"
        f'MODEL_URL = "http://127.0.0.1:{stand_in.port}/v1"\n'
        'MODEL_KEY = "a key for the stand-in"\n'
        'MODEL_NAME = "stand-in"\n'
        # Time for a Stop to land between the renewal of a silent reply's lease and its stall.
        'MODEL_STALL = int(os.environ.get("MODEL_STALL", 3))\n'
    )
    (root / "mysite" / "settings_chat_small_log.py").write_text(
        "from .settings_chat import *  # noqa\n\nSSE_LOG_SIZE = 100\n"
    )
    (root / "mysite" / "settings_anthropic.py").write_text(
        f'from .settings_chat import *  # noqa\n\nMODEL_URL = "http://127.0.0.1:{stand_in.port}"\n'
    )
    return root


@pytest.fixture(scope="module")
def chat_project(chat_database, stand_in, tmp_path_factory):
    return make_chat_project(tmp_path_factory.mktemp("chat"), chat_database, stand_in)


CHAT_SETTINGS = {"DJANGO_SETTINGS_MODULE": "mysite.settings_chat"}


@pytest.fixture(scope="module")
def chat(chat_project, chat_database, tmp_path_factory):
    """Two Daphne processes and two workers on the chat's project, as deployed."""
    logs = tmp_path_factory.mktemp("chat-servers")
    env = {**chat_database.env, **CHAT_SETTINGS}
    servers = two_daphnes(logs, chat_project, env)
    workers = [ReplyWorker(logs, chat_project, env).start() for _ in range(2)]
    until_workers_listen(chat_database, 2)
    yield SimpleNamespace(servers=servers, workers=workers, urls=[s.url for s in servers])
    for each in [*workers, *servers]:
        each.stop()
    for each in [*workers, *servers]:
        assert "Traceback" not in each.served, each.served


SHOWN = """() => [...document.querySelectorAll("#replies li")].map((item) => ({
    prompt: item.querySelector(".prompt").textContent,
    answer: item.querySelector(".answer").textContent,
    status: item.querySelector(".status").textContent,
    markup: item.querySelector(".answer").children.length,
}))"""


def open_chat(page, url):
    log_in_on_the_page(page, url, path="/chat/")


def press(button):
    """Clicks `button` as a person would, but for where: the answers growing above it move it
    between where Playwright aims and where its click lands, and such a click is lost."""
    expect(button).to_be_visible()
    expect(button).to_be_enabled()
    button.dispatch_event("click")


def ask_on_the_page(page, prompt):
    page.fill("#send textarea", prompt)
    press(page.locator("#send button"))


def reply_on(page, prompt):
    """The page's latest reply to `prompt`: its answer, its status, its buttons."""
    return page.locator("#replies li").filter(has=page.locator(".prompt", has_text=prompt)).last


def until_status(page, prompt, status, timeout=10):
    expect(reply_on(page, prompt).locator(".status")).to_have_text(status, timeout=timeout * 1000)


def until_answered_at_least(page, prompt, characters, timeout=10):
    answer = reply_on(page, prompt).locator(".answer")
    deadline = time.monotonic() + timeout
    while len(answer.text_content() or "") < characters:
        assert time.monotonic() < deadline, f"no {characters} characters of {prompt!r}"
        page.wait_for_timeout(20)


def shown_answer(page, prompt):
    return reply_on(page, prompt).locator(".answer").text_content()


def saved(database, prompt):
    (row,) = database.sql(
        "SELECT status, why, text, parts, tokens_in, tokens_out FROM live_reply WHERE prompt = %s",
        prompt,
    )
    return SimpleNamespace(
        **dict(zip(["status", "why", "text", "parts", "tokens_in", "tokens_out"], row))
    )


def saved_id(database, prompt):
    return database.sql("SELECT id FROM live_reply WHERE prompt = %s", prompt)[0][0]


def worker_of(database, prompt):
    """The worker that claimed the reply to `prompt`, or "" before one does."""
    return database.sql("SELECT worker FROM live_reply WHERE prompt = %s", prompt)[0][0]


def published_at(database, prompt, status):
    """When the status `status` of the reply to `prompt` was committed to the log."""
    ((at,),) = database.sql(
        "SELECT extract(epoch FROM committed_at) FROM live_event"
        " WHERE data::jsonb->>'reply' = %s AND data::jsonb->>'status' = %s",
        str(saved_id(database, prompt)),
        status,
    )
    return float(at)


def unique(prompt):
    """`prompt`, told from every other: by the system's randomness, which hypothesis, that
    makes `random` repeat itself from one example to the next, leaves alone."""
    return f"{prompt} {secrets.token_hex(4)}"


# Events for everyone, as publish() writes them: the log gives each its position as it commits.
SITE_EVENTS = (
    "INSERT INTO live_event (\"to\", data, revokes) SELECT '*', data, false"
    " FROM unnest(%s::text[]) AS data"
)


@layer("chat", "browser")
def test_a_reply_grows_on_the_page_as_text_and_is_saved_with_its_conversation(
    chat, chat_database, stand_in, page
):
    open_chat(page, chat.urls[0])
    # The site's other events reach the page too, whatever JSON they hold: it lets them be
    # (a script error fails the test).
    chat_database.sql(SITE_EVENTS, ['"a notice"', "null", "7", '["a list"]', '{"text": "hi"}'])
    first, second = unique("What is SSE?"), unique("And resuming?")
    ask_on_the_page(page, first)
    until_status(page, first, "finished")
    ask_on_the_page(page, second)
    until_status(page, second, "finished")
    asked = stand_in.request_for(second).messages
    assert asked == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": answer_to(asked[:1])},
        {"role": "user", "content": second},
    ], "the conversation so far, then the prompt"
    for prompt in first, second:
        made = answer_to(stand_in.request_for(prompt).messages)
        assert shown_answer(page, prompt) == made
        row = saved(chat_database, prompt)
        assert (row.status, row.text) == ("finished", made)
        assert (row.tokens_in, row.tokens_out) == (len(stand_in.request_for(prompt).messages), 30)
    assert {each["markup"] for each in page.evaluate(SHOWN)} == {0}, "text, never HTML"
    page.reload()  # the conversation, as saved
    expect(page.locator("#state")).to_have_text("live")
    assert [(each["prompt"], each["status"]) for each in page.evaluate(SHOWN)][-2:] == [
        (first, "finished"),
        (second, "finished"),
    ]


@layer("chat", "browser")
def test_a_reload_and_a_second_tab_on_the_other_process_show_the_answer_byte_for_byte(
    chat, stand_in, page
):
    open_chat(page, chat.urls[0])
    prompt = unique("A long one [150 at 50/s]")
    ask_on_the_page(page, prompt)
    until_answered_at_least(page, prompt, 100)
    page.reload()  # mid-answer
    until_answered_at_least(page, prompt, 400)
    other = page.context.new_page()
    other.goto(chat.urls[1] + "/chat/")
    until_status(page, prompt, "finished")
    until_status(other, prompt, "finished")
    made = answer_to(stand_in.request_for(prompt).messages)
    assert shown_answer(page, prompt) == made
    assert shown_answer(other, prompt) == made
    other.close()


@layer("chat", "browser")
def test_a_page_whose_position_the_log_no_longer_has_shows_the_text_so_far_and_goes_on(
    chat, chat_project, chat_database, stand_in, page, tmp_path
):
    server = Server(
        tmp_path,
        application="mysite.asgi:application",
        cwd=chat_project,
        DJANGO_SETTINGS_MODULE="mysite.settings_chat_small_log",  # 100 events kept
        **chat_database.env,
    ).start()
    loads = []
    try:
        open_chat(page, server.url)
        prompt = unique("Away for long [240 at 50/s]")
        ask_on_the_page(page, prompt)
        until_answered_at_least(page, prompt, 100)
        server.stop()
        expect(page.locator("#state")).to_have_text("reconnecting")
        page.on("load", lambda _: loads.append(1))
        in_project(
            chat_project,
            chat_database,
            "from live.events import publish\nfor n in range(150):\n    publish({'filler': n})",
        )
        server.start()  # its feed deletes what is 100 positions behind the newest
        until_status(page, prompt, "finished", timeout=15)
    finally:
        server.stop()
    assert loads, "told it missed what the log no longer has: the page read the rows again"
    assert shown_answer(page, prompt) == answer_to(stand_in.request_for(prompt).messages)


# A model that streams, and one silent since its third chunk (the stand-in's [stall]) for
# 1.4 s, past the worker's renewal of its leases: the worker stops a reply as it is told,
# not when its next commit reads the row, at the next renewal, a second after the last.
# Timed from the Stop's commit too, when the workers are told: the click is not theirs.
STOP_WITHIN = {"streaming": ("[400 at 30/s]", 0, 1), "silent": ("[stall]", 1.4, 0.5)}


@layer("chat", "browser")
@pytest.mark.parametrize("model", STOP_WITHIN)
def test_stop_in_a_tab_on_the_other_process_closes_the_model_within_1_s_and_all_say_so(
    chat, chat_database, stand_in, page, model
):
    asks_for, silent_for, within = STOP_WITHIN[model]
    open_chat(page, chat.urls[0])
    other = page.context.new_page()
    other.goto(chat.urls[1] + "/chat/")
    expect(other.locator("#state")).to_have_text("live")
    prompt = unique(f"Stop me {asks_for}")
    ask_on_the_page(page, prompt)
    until_answered_at_least(other, prompt, 50)
    eventually(lambda: len(stand_in.request_for(prompt).sent) >= 3, 5, "three chunks sent")
    time.sleep(max(0, stand_in.request_for(prompt).sent[2] + silent_for - time.time()))
    stopped_at = time.time()
    press(reply_on(other, prompt).locator(".stop"))
    until_status(page, prompt, "stopped")
    until_status(other, prompt, "stopped")
    hung_up = stand_in.request_for(prompt).hung_up
    row = saved(chat_database, prompt)
    assert hung_up is not None and hung_up - stopped_at < 1, "the model's connection closed"
    assert hung_up - published_at(chat_database, prompt, "stopping") < within, "as it was told"
    assert row.status == "stopped" and row.text
    assert shown_answer(page, prompt) == shown_answer(other, prompt) == row.text
    assert answer_to(stand_in.request_for(prompt).messages).startswith(row.text)
    assert not reply_on(page, prompt).locator(".again").is_hidden(), "it can be tried again"
    other.close()


# A reply asked for the admin as ask() does it, and replies stopped as the Stop view does it,
# all in one commit: the workers hear each of those stops in the same read, as under load.
ASKED = (
    "WITH asked AS (INSERT INTO live_reply (user_id, prompt, text, parts, status, why, worker)"
    " SELECT id, %s, '', 0, 'queued', '', '' FROM auth_user WHERE username = 'admin'"
    " RETURNING id) SELECT pg_notify('live_reply', 'ask') FROM asked"
)
STOPPED_TOGETHER = (
    "WITH told AS (UPDATE live_reply SET status = 'stopping' WHERE prompt = ANY(%s)"
    " RETURNING id) SELECT pg_notify('live_reply', 'stop ' || id) FROM told"
)
CLAIMING = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE state = 'active' AND query LIKE 'UPDATE live_reply SET status%%'"
)


@layer("chat")
def test_stops_heard_together_each_close_their_model_at_once(chat, chat_database, stand_in):
    # A reply on each worker, each silent since its third part: a stop a worker left for
    # its next commit would wait for the renewal of its leases, a second away.
    until_workers_listen(chat_database, 2)
    prompts = []
    for standing_still in reversed(chat.workers):  # each reply claimed by the other worker
        prompts.append(unique("Stopped together [stall]"))
        with paused(standing_still.process.pid):
            # A claim it sent just before would still take the reply.
            eventually(lambda: chat_database.sql(CLAIMING) == [(0,)], 5, "no claim under way")
            chat_database.sql(ASKED, prompts[-1])
            eventually(functools.partial(worker_of, chat_database, prompts[-1]), 5, "claimed")
    assert len({worker_of(chat_database, prompt) for prompt in prompts}) == 2, "one on each worker"

    def sent_three(prompt):
        return any(len(each.sent) >= 3 for each in stand_in.requests_for(prompt))

    eventually(lambda: all(map(sent_three, prompts)), 5, "three parts of each")
    # Past the commit of the third part, which would read the stop as well.
    last = max(stand_in.request_for(prompt).sent[2] for prompt in prompts)
    time.sleep(max(0, last + 0.3 - time.time()))
    chat_database.sql(STOPPED_TOGETHER, prompts)
    stopped_at = time.time()  # committed: the workers are told
    eventually(
        lambda: all(stand_in.request_for(prompt).hung_up for prompt in prompts), 5, "hung up"
    )
    took = [stand_in.request_for(prompt).hung_up - stopped_at for prompt in prompts]
    assert max(took) < 0.5, f"each as it was told, not at a renewal: {took}"

    def stopped():
        return {saved(chat_database, prompt).status for prompt in prompts} == {"stopped"}

    eventually(stopped, 5, "both saved as stopped")


@layer("chat", "browser")
def test_a_killed_worker_fails_its_reply_within_10_s_and_the_page_tries_again(
    chat, chat_database, stand_in, page
):
    open_chat(page, chat.urls[1])
    prompt = unique("Killed [120 at 50/s]")
    ask_on_the_page(page, prompt)
    until_answered_at_least(page, prompt, 50)
    worker = worker_of(chat_database, prompt)
    making = next(each for each in chat.workers if f":{each.process.pid}" in worker)
    killed = time.monotonic()
    making.kill()
    until_status(page, prompt, "failed: its worker stopped: try again", timeout=10)
    within = time.monotonic() - killed
    making.start()
    row = saved(chat_database, prompt)
    assert row.text and shown_answer(page, prompt) == row.text, "the text so far, kept"
    press(reply_on(page, prompt).locator(".again"))
    until_status(page, prompt, "finished")
    assert shown_answer(page, prompt) == answer_to(stand_in.request_for(prompt).messages)
    assert within < 10


@layer("chat")
@pytest.mark.parametrize("while_claiming", [False, True], ids=["at rest", "while it claims"])
def test_a_worker_ends_when_the_database_is_out_of_reach(
    chat_project, chat_database, tmp_path, while_claiming
):
    # Ended, its process manager starts it again; one that hung on would make nothing. A
    # connection closed fails at once; one that died without a word, as a NAT or a failover
    # leaves it, holds a thread's query until TCP gives up, a quarter of an hour.
    relay = Relay(chat_database.port)
    env = {**chat_database.env, **CHAT_SETTINGS, "PGPORT": str(relay.port)}
    cut_off = ReplyWorker(tmp_path, chat_project, env).start()
    try:
        # Listening, and committing from a thread: its leases, renewed each second.
        connected = functools.partial(database_connections, cut_off.process.pid, relay.port)
        eventually(lambda: len(connected()) >= 2, 30, "the worker connected")
        if while_claiming:  # as a migration's lock holds it, longer than a query may take
            import psycopg

            with psycopg.connect(**chat_database.connection("mysite")) as holding:
                holding.execute("LOCK TABLE live_reply")
                eventually(lambda: claims_waiting(chat_database), 10, "a claim waiting")
                time.sleep(4)
                assert cut_off.process.poll() is None, "a lock is no reason to end"
                relay.freeze()
                holding.rollback()
        else:  # as a busy moment of the database holds it, longer than a query may take
            (listener,) = chat_database.sql(
                "SELECT pid FROM pg_stat_activity"
                " WHERE application_name = 'live replies' AND client_port = ANY(%s)",
                database_connections(os.getpid(), chat_database.port),  # the relay's
            )[0]
            with paused(listener):  # its server process: the next SELECT 1 waits
                time.sleep(4.5)
            time.sleep(1.5)  # its answer, and a quiet second more
            assert cut_off.process.poll() is None, (
                f"a busy moment is no reason to end: {cut_off.served}"
            )
            relay.freeze()
        started = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            cut_off.process.wait(25)
        ended_in = time.monotonic() - started
    finally:
        returncode = cut_off.process.poll()
        cut_off.kill()
        relay.close()
    # A quiet second, PATIENCE, and up to 5 s for psycopg to give up the SELECT 1 it cancelled.
    assert returncode and ended_in < 15, f"ended after {ended_in:.1f} s: {cut_off.served}"
    assert "TimeoutError" in cut_off.served, "its log says why"


def claims_waiting(database):
    return database.sql(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE live_reply SET status %%'"
    )[0][0]


@layer("chat", "browser")
def test_a_worker_that_stood_still_past_its_lease_lets_its_reply_go(
    chat, chat_project, chat_database, stand_in, page, tmp_path
):
    # A worker whose model may be silent for longer than it stands still: its answer goes
    # on after it, unless the worker sees that the reply is no longer its own.
    patient = ReplyWorker(
        tmp_path, chat_project, {**chat_database.env, **CHAT_SETTINGS, "MODEL_STALL": "30"}
    )
    prompt = unique("Stood still [900 at 50/s]")
    until_workers_listen(chat_database, 2)  # one may have been started again just before
    patient.start()
    try:
        until_workers_listen(chat_database, 3)
        open_chat(page, chat.urls[0])
        # The reply for the patient worker alone. The others stand still briefly: one caught
        # in its SELECT 1 for longer than PATIENCE would end, as it should.
        with paused(*(each.process.pid for each in chat.workers)):
            ask_on_the_page(page, prompt)
            until_answered_at_least(page, prompt, 50)
        # As a machine that stalls, at the worst moment: with its reply's row locked.
        with paused_inside_a_transaction(patient.process.pid, chat_database):
            until_status(page, prompt, "failed: its worker stopped: try again", timeout=15)
            failed = saved(chat_database, prompt)
        resumed = time.monotonic()
        eventually(lambda: stand_in.request_for(prompt).hung_up, 5, "the model let go")
        went = time.monotonic() - resumed
        page.wait_for_timeout(500)  # what a late commit would have published, by now
    finally:
        patient.stop()
    assert saved(chat_database, prompt) == failed, "another's to end, and ended"
    assert statuses_published(chat_database, prompt) == ["failed"]
    assert shown_answer(page, prompt) == failed.text
    until_status(page, prompt, "failed: its worker stopped: try again", timeout=0.1)
    assert went < 2


FAULTS = {  # what the model does: the prompt that asks for it, what the page then says
    "refuses the connection": ("", "the model could not be reached"),
    "answers 429": ("[429]", "the model answered 429"),
    "answers 500": ("[500]", "the model answered 500"),
    "breaks off mid-answer": ("[break]", "the model's answer broke off"),
    "stalls mid-answer": ("[stall]", "the model sent nothing for 3 s"),
}


@layer("chat", "browser")
@pytest.mark.parametrize("fault", FAULTS)
def test_a_model_that_fails_ends_the_answer_and_the_page_says_why(
    chat, chat_database, stand_in, page, fault
):
    asks_for, why = FAULTS[fault]
    prompt = unique(f"Fail {asks_for}")
    open_chat(page, chat.urls[0])
    if fault == "refuses the connection":
        stand_in.refuse()
    try:
        ask_on_the_page(page, prompt)
        until_status(page, prompt, f"failed: {why}", timeout=10)
    finally:
        if fault == "refuses the connection":
            stand_in.listen()
    row = saved(chat_database, prompt)
    assert (row.status, row.why) == ("failed", why)
    reached = 0 if fault == "refuses the connection" else 1
    assert len(stand_in.requests_for(prompt)) == reached, "no retry behind the page's back"
    assert shown_answer(page, prompt) == row.text, "the text so far, kept"
    if asks_for in ("[break]", "[stall]"):
        assert row.text and answer_to(stand_in.request_for(prompt).messages).startswith(row.text)
    assert not reply_on(page, prompt).locator(".again").is_hidden()


BAD_PROMPTS = {"empty": "", "too long": "x" * 4001, "a NUL character": "a\x00b"}


@layer("chat", "browser")
def test_bad_prompts_get_400_and_more_replies_at_once_than_allowed_429_which_the_page_shows(
    chat, chat_database, page
):
    before = chat_database.sql("SELECT count(*) FROM live_reply")
    with logged_in(chat.urls[0]) as http:
        csrf = {"X-CSRFToken": http.cookies["csrftoken"]}
        statuses = {
            why: http.post("/chat/send/", data={"prompt": prompt}, headers=csrf).status_code
            for why, prompt in BAD_PROMPTS.items()
        }
    assert statuses == dict.fromkeys(BAD_PROMPTS, 400)
    assert chat_database.sql("SELECT count(*) FROM live_reply") == before
    open_chat(page, chat.urls[1])
    prompts = [unique(f"One of many [400 at 30/s] {number}") for number in range(4)]
    prompt_box = page.locator("#send textarea")
    for prompt in prompts[:3]:
        ask_on_the_page(page, prompt)
        until_status(page, prompt, "running")
        expect(prompt_box).to_have_value("")
    ask_on_the_page(page, prompts[3])
    expect(page.locator("#refused")).to_have_text("At most 3 replies at once: try again in 10 s")
    expect(prompt_box).to_have_value(prompts[3])  # refused, kept to send again
    with logged_in(chat.urls[0]) as http:
        refused = http.post(
            "/chat/send/",
            data={"prompt": "one more"},
            headers={"X-CSRFToken": http.cookies["csrftoken"]},
        )
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "10")
    for prompt in prompts[:3]:
        press(reply_on(page, prompt).locator(".stop"))
        until_status(page, prompt, "stopped")
    assert reply_on(page, prompts[3]).count() == 0

    # Two sends at once, the one accepted answered after the one refused: the refusal stays.
    running = [unique(f"Running [400 at 30/s] {number}") for number in range(2)]
    for prompt in running:
        ask_on_the_page(page, prompt)
        until_status(page, prompt, "running")
    held = []  # the Sends, held on their way, in the order sent
    page.route("**/chat/send/", lambda route: held.append(route))
    # Accepted runs as long as the others: ended before the second Send, it would let it in.
    accepted, turned_away = unique("Accepted [400 at 30/s]"), unique("Turned away")
    for sent, prompt in enumerate([accepted, turned_away], 1):
        ask_on_the_page(page, prompt)
        wait_for_asks(page, held, sent)
    first, second = held
    answer = first.fetch()  # the server takes it: three under way
    second.continue_()  # and turns this one away, answered first
    expect(page.locator("#refused")).to_have_text("At most 3 replies at once: try again in 10 s")
    with page.expect_response(lambda response: response.request == first.request):
        first.fulfill(response=answer)  # and now the page has the answer to the first
    until_status(page, accepted, "running")
    page.unroute("**/chat/send/")
    expect(page.locator("#refused")).to_have_text("At most 3 replies at once: try again in 10 s")
    expect(prompt_box).to_have_value(turned_away)
    for prompt in [*running, accepted]:
        press(reply_on(page, prompt).locator(".stop"))
        until_status(page, prompt, "stopped")


# What keeps a Send from the view, each made to happen on the page; and the one thing to do.
NOT_TAKEN = {
    "The server is out of reach": lambda page: page.route("**/chat/send/", lambda r: r.abort()),
    "Log in again": lambda page: page.context.clear_cookies(name="sessionid"),  # in another tab
    "The server answered 403": lambda page: page.evaluate(  # a CSRF token gone stale
        "document.querySelector('[name=csrfmiddlewaretoken]').value = 'x'.repeat(64)"
    ),
}


@layer("chat", "browser")
def test_a_prompt_the_server_did_not_take_stays_in_the_box_and_the_page_says_why(
    chat, chat_database, page
):
    open_chat(page, chat.urls[0])
    before = chat_database.sql("SELECT count(*) FROM live_reply")
    for why, keep_it_from_the_view in NOT_TAKEN.items():
        prompt = unique(f"Not taken: {why}")
        keep_it_from_the_view(page)
        ask_on_the_page(page, prompt)
        expect(page.locator("#refused")).to_have_text(why)
        expect(page.locator("#send textarea")).to_have_value(prompt)
        page.unroute_all()
    assert chat_database.sql("SELECT count(*) FROM live_reply") == before
    token = secrets.token_hex(16)  # a CSRF token, as cookie and header, and no session
    for path in "/chat/send/", "/chat/1/stop/":
        answer = httpx.post(
            chat.urls[1] + path,
            data={"prompt": "Hello"},
            headers={"Cookie": f"csrftoken={token}", "X-CSRFToken": token},
        )
        assert (answer.status_code, answer.text) == (403, "Log in again")


@layer("chat")
def test_another_users_reply_is_neither_shown_nor_sent_nor_stoppable(
    chat, chat_project, chat_database, stand_in
):
    cookies = log_in_users(chat_project, chat_database, {"ann": [], "bob": []})
    anns, bobs = unique("Ann's [60 at 60/s]"), unique("Bob's")
    follower = Follower([chat.urls[1]], cookies["bob"])
    with following([follower]):
        ann, bob = (Chatter(url, cookies[name]) for url, name in zip(chat.urls, ["ann", "bob"]))
        assert ann.send(anns) == 202
        eventually(lambda: chat_database.sql("SELECT 1 FROM live_reply WHERE prompt = %s", anns))
        ((reply,),) = chat_database.sql("SELECT id FROM live_reply WHERE prompt = %s", anns)
        stopped = bob.post(f"/chat/{reply}/stop/").status_code
        page = bob.get("/chat/").text
        eventually(lambda: saved(chat_database, anns).status == "finished", 10, "Ann's reply")
        assert bob.send(bobs) == 202  # after Ann's reply: had Bob got hers, he got them first
        eventually(lambda: any(data.get("status") == "finished" for data in follower.data), 10)
    assert stopped == 404
    assert anns not in page
    assert {data["reply"] for data in follower.data} == {saved_id(chat_database, bobs)}


class Chatter:
    """A logged-in client of the chat's views, its session cookie and a CSRF token."""

    def __init__(self, url, cookie):
        self.token = secrets.token_hex(16)
        self.http = httpx.Client(base_url=url, timeout=10)
        self.headers = {"Cookie": f"{cookie}; csrftoken={self.token}", "X-CSRFToken": self.token}

    def get(self, path):
        return self.http.get(path, headers=self.headers)

    def post(self, path, **data):
        return self.http.post(path, data=data, headers=self.headers)

    def send(self, prompt):
        return self.post("/chat/send/", prompt=prompt).status_code


def statuses_published(database, prompt):
    """Each status the log has for the reply to `prompt`, in order."""
    said = database.sql(
        "SELECT data::jsonb->>'status' FROM live_event WHERE data::jsonb->>'reply' = %s"
        " AND data::jsonb->>'status' IS NOT NULL ORDER BY position",
        str(saved_id(database, prompt)),
    )
    return [status for (status,) in said]


@layer("chat", "browser")
def test_a_deploy_of_the_web_servers_and_of_the_worker_loses_no_answer(
    chat, chat_database, stand_in, page
):
    open_chat(page, chat.urls[0])
    # Longer than a lease: the worker told to stop renews it until its answer ends.
    prompt, during = unique("Through a deploy [400 at 50/s]"), unique("Asked during it")
    ask_on_the_page(page, prompt)
    until_answered_at_least(page, prompt, 50)
    chat.servers[0].restart()  # the page's process: the page comes back to the new one
    worker = worker_of(chat_database, prompt)
    making = next(each for each in chat.workers if f":{each.process.pid}" in worker)
    told = time.monotonic()
    stopping = threading.Thread(target=making.stop)  # SIGTERM: it ends what it makes
    stopping.start()
    ask_on_the_page(page, during)
    until_status(page, during, "finished")
    stopping.join(20)
    ended_in = time.monotonic() - told
    until_status(page, prompt, "finished")
    making.start()
    assert shown_answer(page, prompt) == answer_to(stand_in.request_for(prompt).messages)
    assert worker_of(chat_database, during) != worker, "the worker told to stop took no new reply"
    assert making.process.returncode is None and ended_in < 10
    said = statuses_published(chat_database, prompt)
    assert said == ["finished"], "its lease renewed to the end: never failed on the way"


def in_place_of(source, block):
    """`source` with each function that `block` defines replaced by the block's."""
    names = re.findall(r"^(?:async )?def (\w+)", block, re.MULTILINE)
    definition = r"(?:^@.*\n)*^(?:async )?def {}\(.*?(?=^\S)"
    at = re.search(definition.format(names[0]), source, re.MULTILINE | re.DOTALL).start()
    for name in names:
        source = re.sub(definition.format(name), "", source, flags=re.MULTILINE | re.DOTALL)
    return source[:at] + block + "\n\n" + source[at:]


ANSWER_FROM_ANTHROPIC = """import asyncio, json
from django.contrib.auth.models import User
from live.models import Reply
from live.replies_anthropic import answer, failure, messages

# A conversation with a reply stopped before its first word, then a prompt.
user = User.objects.create(username=USERNAME)
Reply.objects.create(user=user, prompt="Stopped at once", status=Reply.STOPPED)
conversation = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
conversation.append(messages(Reply.objects.create(user=user, prompt=PROMPTS[0] + " again")))


async def main():
    for turns in conversation:
        usage, text, why = {}, "", None
        try:
            async for part in answer(turns, usage):
                text += part
        except Exception as error:
            why = failure(error, began=text)
        print(json.dumps([text, usage, why]))

asyncio.run(main())
"""


@layer("chat", group="chat: elsewhere")
def test_the_answer_for_anthropics_api_streams_from_it(chat_project, chat_database, stand_in):
    readme = (HERE / "README.md").read_text().split(f"\n## {CHAT}\n")[1]
    block = re.search(
        r"in place of `model\(\)` and `answer\(\)`.*?```python\n(.*?)```", readme, re.DOTALL
    )[1]
    replies = (chat_project / "live" / "replies.py").read_text()
    (chat_project / "live" / "replies_anthropic.py").write_text(in_place_of(replies, block))
    prompts = [unique("Hello, Claude"), unique("Fail [429]"), unique("Break [break]")]
    code = ANSWER_FROM_ANTHROPIC.replace("PROMPTS", repr(prompts))
    code = code.replace("USERNAME", repr(unique("anthropic")))
    output = in_project(chat_project, chat_database, code, settings="mysite.settings_anthropic")
    answered, refused, broken, again = map(json.loads, output.splitlines())
    made = answer_to([{"role": "user", "content": prompts[0]}])
    assert answered == [made, {"input": 1, "output": 30}, None]
    assert refused[2] == "the model answered 429"
    assert broken[2] == "the model's answer broke off"
    assert broken[0] and answer_to([{"role": "user", "content": prompts[2]}]).startswith(broken[0])
    # The stopped reply left out of the conversation: one turn of no text, and a 400.
    again_made = answer_to([{"role": "user", "content": prompts[0] + " again"}])
    assert again == [again_made, {"input": 1, "output": 30}, None]


@layer("chat", "browser", group="chat: elsewhere")
@pytest.mark.parametrize("shape", ["gunicorn beside Daphne", "gunicorn's uvicorn workers"])
def test_the_chat_works_where_the_project_already_runs(
    chat, chat_project, chat_database, stand_in, page, tmp_path, shape
):
    env = {**chat_database.env, **CHAT_SETTINGS}
    with contextlib.ExitStack() as running:
        if shape == "gunicorn beside Daphne":
            url = running.enter_context(readme_wsgi_shape(tmp_path, chat_project, env)).url
        else:
            server = readme_uvicorn_workers(tmp_path, chat_project, env)
            running.callback(server.stop)
            url = server.url
        open_chat(page, url)
        prompt = unique(f"Served by {shape}")
        ask_on_the_page(page, prompt)
        until_status(page, prompt, "finished")
        assert shown_answer(page, prompt) == answer_to(stand_in.request_for(prompt).messages)
        page.goto("about:blank")  # its stream closed, the servers stop at once


CHATTERS = ["cat", "dan", "eva"]
CHAT_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("ask"), st.integers(0, 2)),
        st.tuples(st.just("reload"), st.integers(0, 2), st.integers(0, 1)),  # on a process
    ),
    min_size=3,
    max_size=8,
)


@layer("chat", "browser", group="chat: elsewhere")
# Each example runs for seconds: a failing one is reported as it is, unshrunk.
@settings(max_examples=3, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(steps=CHAT_STEPS)
def test_each_page_ends_with_exactly_its_users_answers_whatever_reloads_it(
    chat, chat_project, chat_database, stand_in, browser, steps
):
    cookies = log_in_users(chat_project, chat_database, {name: [] for name in CHATTERS})
    contexts = [browser.new_context() for _ in CHATTERS]
    try:
        pages = []
        for context, name in zip(contexts, CHATTERS):
            session = cookies[name].removeprefix("sessionid=")
            context.add_cookies([{"name": "sessionid", "value": session, "url": chat.urls[0]}])
            pages.append(context.new_page())
            pages[-1].goto(chat.urls[len(pages) % 2] + "/chat/")
        asked = {name: [] for name in CHATTERS}
        for step, who, *where in steps:
            if step == "ask":
                asked[CHATTERS[who]].append(unique(f"{CHATTERS[who]} asks [30 at 60/s]"))
                ask_on_the_page(pages[who], asked[CHATTERS[who]][-1])
            else:
                pages[who].goto(chat.urls[where[0]] + "/chat/")
            pages[who].wait_for_timeout(50)
        for name, page in zip(CHATTERS, pages):
            for prompt in asked[name]:
                refused = page.locator("#refused").text_content()
                if reply_on(page, prompt).count() or not refused:
                    until_status(page, prompt, "finished")
            rows = chat_database.sql(
                "SELECT prompt, text FROM live_reply JOIN auth_user ON auth_user.id = user_id"
                " WHERE username = %s ORDER BY live_reply.id",
                name,
            )
            shown = [(each["prompt"], each["answer"]) for each in page.evaluate(SHOWN)]
            assert shown == rows, name
            for prompt, text in rows:
                assert text == answer_to(stand_in.request_for(prompt).messages)
    finally:
        for context in contexts:
            context.close()


# 8. Measurements, not tests: python test_app.py bench|storm ----------------------

# The ceiling for Python: the same stream (shared clock, bytes, chunked HTTP/1.1, retry,
# resume) from asyncio alone, with no framework and no server library.
BARE_ASYNCIO_SERVER = """
import asyncio, random, re, sys
import probe

async def main(port, max_age):
    asyncio.get_running_loop().create_task(probe.watch())
    tick = asyncio.Event()

    async def clock():
        nonlocal tick
        while True:
            await asyncio.sleep(1)
            tick, struck = asyncio.Event(), tick
            struck.set()

    async def stream(reader, writer):
        head = await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: text/event-stream\\r\\n"
                     b"Cache-Control: no-cache\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n")
        resume = re.search(rb"(?im)^last-event-id: *([0-9]{1,18})\\r$", head)
        next_id = int(resume[1]) + 1 if resume else 0
        retry = b"retry: %d\\n\\n" % random.randint(1000, 3000)
        writer.write(b"%x\\r\\n%b\\r\\n" % (len(retry), retry))
        ends_at = asyncio.get_running_loop().time() + max_age * random.uniform(0.5, 1)
        try:
            while True:
                event = b"id: %d\\ndata: %b %d\\n\\n" % (next_id, random.choice(EMOJIS), next_id)
                writer.write(b"%x\\r\\n%b\\r\\n" % (len(event), event))
                await writer.drain()
                next_id += 1
                if asyncio.get_running_loop().time() >= ends_at:
                    writer.write(b"0\\r\\n\\r\\n")
                    break
                await tick.wait()
        except ConnectionError:
            pass
        writer.close()

    EMOJIS = "🚀 🐎 🌅 🦾 🍇".encode().split()
    asyncio.get_running_loop().create_task(clock())
    server = await asyncio.start_server(stream, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()

asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
"""


# In each measured server: its event loop's stalls and its collector's pauses, as lines
# "<time.monotonic()> loop|gen0|gen1|gen2 <seconds>", a clock every process shares.
PROBE = """
import asyncio, gc, os, time

out = open(os.environ["BENCH_STATS"], "a", buffering=1)
began = []


def timed(phase, info):
    if phase == "start":
        began.append(time.monotonic())
    elif began:
        now = time.monotonic()
        out.write(f"{now} gen{info['generation']} {now - began.pop()}\\n")


gc.callbacks.append(timed)


async def watch(every=0.01):
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(every)
        if (late := loop.time() - before - every) > 0.005:
            out.write(f"{time.monotonic()} loop {late}\\n")
"""
# An ASGI application of $BENCH_APP's, watched by the probe from its first request.
PROBED_ASGI_APP = """
import asyncio, importlib, os
import probe

inner = importlib.import_module(os.environ["BENCH_APP"]).application
watching = []


async def application(scope, receive, send):
    if not watching:
        watching.append(asyncio.ensure_future(probe.watch()))
    await inner(scope, receive, send)
"""


def stalls(stats, start, end):
    """From the probe's lines, between `start` and `end`: the event loop's longest stall,
    and the collector's pauses (all, and full collections), in seconds."""
    seen = [line.split() for line in stats.read_text().splitlines()]
    seen = [(kind, float(seconds)) for at, kind, seconds in seen if start <= float(at) <= end]
    loop = [seconds for kind, seconds in seen if kind == "loop"]
    pauses = [seconds for kind, seconds in seen if kind.startswith("gen")]
    full = [seconds for kind, seconds in seen if kind == "gen2"]
    return {
        "loop's longest stall (ms)": 1000 * max(loop, default=0),
        "collector: pauses, longest (ms)": 1000 * max(pauses, default=0),
        "collector: full collections": len(full),
        "collector: ms in pauses a second": 1000 * sum(pauses) / (end - start),
    }


# What Django costs: app.py's stream (shared clock, bytes, retry, resume, random ends) as a
# plain ASGI application, served by the same server.
PLAIN_ASGI_APP = """
import asyncio, os, random, re, weakref

SSE_INTERVAL = float(os.environ.get("SSE_INTERVAL", "1.0"))
SSE_MAX_AGE = float(os.environ.get("SSE_MAX_AGE", "300"))
EMOJIS = "🚀 🐎 🌅 🦾 🍇".encode().split()
ticks = weakref.WeakKeyDictionary()


async def next_tick():
    loop = asyncio.get_running_loop()
    if (tick := ticks.get(loop)) is None:
        tick = ticks[loop] = asyncio.Event()
        loop.call_later(SSE_INTERVAL, lambda: ticks.pop(loop).set())
    await tick.wait()


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    resume = re.fullmatch(rb"[0-9]{1,18}", dict(scope["headers"]).get(b"last-event-id", b""))
    next_id = int(resume[0]) + 1 if resume else 0
    stream = asyncio.current_task()

    async def until_disconnect():
        while (await receive())["type"] != "http.disconnect":
            pass
        stream.cancel()

    watcher = asyncio.ensure_future(until_disconnect())
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + SSE_MAX_AGE * random.uniform(0.5, 1)
        body = b"retry: %d\\n\\n" % random.randint(1000, 3000)
        while True:
            await send({"type": "http.response.body", "body": body, "more_body": True})
            body = b"id: %d\\ndata: %b %d\\n\\n" % (next_id, random.choice(EMOJIS), next_id)
            next_id += 1
            if loop.time() >= ends_at:
                break
            await next_tick()
        await send({"type": "http.response.body", "body": body})
    except asyncio.CancelledError:
        pass
    finally:
        watcher.cancel()
"""


def serving_pid(pid):
    """The process that serves: the server's one worker if it has one, else itself."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if len(children) == 1 else pid


def measure(command, port, log_path, measurement, **env):
    """Runs `measurement(pid)` against a server pinned to core 0, then stops the server."""
    # Capacity, not the cap, is measured.
    env = {**os.environ, "SSE_MAX_STREAMS": "1000000", "PYTHONPATH": str(HERE), **env}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            ["taskset", "-c", "0", *command],
            cwd=log_path.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_listening(port, server, timeout=30, log=log_path)
        return run(measurement(serving_pid(server.pid)))
    finally:
        server.terminate()
        server.wait(10)


async def load(pid, *, port, streams, hold, stats):
    warm = await open_streams(port, 1)
    await until(lambda: len(warm[0].arrivals) >= 2, 10)
    warm[0].transport.close()
    await asyncio.sleep(1)
    rss, threads = proc_status(pid, "VmRSS"), proc_status(pid, "Threads")
    figures = {}

    listeners = await open_streams(port, streams, ramp=max(5, streams / 800))
    await asyncio.sleep(3)
    start, cpu_start = time.monotonic(), cpu_seconds(pid)
    threads_during = proc_status(pid, "Threads")
    await asyncio.sleep(hold)
    end, cpu_end = time.monotonic(), cpu_seconds(pid)
    figures["streams held"] = sum(l.status == 200 and not l.ended for l in listeners)
    rss_during = proc_status(pid, "VmRSS")
    figures["KB RSS per stream"] = (rss_during - rss) / streams
    figures["threads, idle"] = threads
    figures["threads, streams open"] = max(threads_during, proc_status(pid, "Threads"))
    gaps, events = [], 0
    for listener in listeners:
        seen = [t for t in listener.arrivals if start <= t <= end]
        events += len(seen)
        gaps += [later - earlier for earlier, later in pairwise(seen)]
    gaps.sort()
    figures["CPU us per event"] = (cpu_end - cpu_start) / max(1, events) * 1e6
    figures["gap p50 (s)"] = gaps[len(gaps) // 2]
    figures["gap p99 (s)"] = gaps[int(len(gaps) * 0.99)]
    figures["gap max (s)"] = gaps[-1]
    figures["late gaps > 1.25 s (%)"] = 100 * sum(g > 1.25 for g in gaps) / len(gaps)
    figures.update(stalls(stats, start, end))

    for listener in listeners:
        listener.transport.close()
    peak = threads
    for _ in range(60):  # three seconds, sampled as the streams end
        peak = max(peak, proc_status(pid, "Threads"))
        await asyncio.sleep(0.05)
    figures["threads, peak after mass drop"] = peak
    asked = time.monotonic()
    fresh = await open_streams(port, 1)
    await until(lambda: fresh[0].arrivals, 10, step=0.001)
    figures["ms to first event after drop"] = (fresh[0].arrivals[0] - asked) * 1000
    fresh[0].transport.close()
    figures.update(await proxy_restart(pid, port, streams))

    rounds = []
    for _ in range(3):
        batch = await open_streams(port, 1500, ramp=2)
        await asyncio.sleep(3)
        for listener in batch:
            listener.transport.close()
        await asyncio.sleep(4)
        rounds.append(proc_status(pid, "VmRSS") / 1024)
    figures["RSS MB after rounds 1/2/3 of 1500"] = "/".join(f"{mb:.0f}" for mb in rounds)
    figures["RSS round 3 / round 1"] = rounds[2] / rounds[0]
    return figures


def arriving_crowd(port, clients, ramp, stop_at):
    """`clients` browser-like clients, arriving evenly over `ramp` seconds; their tasks."""
    crowd = [Reconnecting(port) for _ in range(clients)]

    async def join(each, delay):
        await asyncio.sleep(delay)
        await each.run(stop_at)

    tasks = [asyncio.create_task(join(c, ramp * i / clients)) for i, c in enumerate(crowd)]
    return crowd, tasks


async def proxy_restart(pid, port, clients):
    """Browser-like clients all hang up at once and come back after their `retry:`."""
    ramp = max(5, clients / 800)
    crowd, tasks = arriving_crowd(port, clients, ramp, stop_at=time.monotonic() + 90)
    figures = {}
    try:
        await until(lambda: all(len(each.ids) >= 2 for each in crowd), ramp + 30)
        dropped_at, peak = time.monotonic(), 0
        for each in crowd:
            each.hang_up()
        while not all(each.back_at and each.back_at > dropped_at for each in crowd):
            assert time.monotonic() < dropped_at + 30, "clients left behind"
            peak = max(peak, proc_status(pid, "Threads"))
            await asyncio.sleep(0.05)
        figures["proxy restart: s until all back"] = max(c.back_at for c in crowd) - dropped_at
        figures["proxy restart: threads, peak"] = peak
        figures["proxy restart: ids skipped/repeated"] = sum(
            each.ids != list(range(len(each.ids))) for each in crowd
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return figures


async def turnover(pid, *, port, clients, stats, seconds=60):
    """Browser-like clients on streams that end every SSE_MAX_AGE and come back: a
    minute of that steady state, with whatever pauses the server takes in it."""
    ramp, warm_up = max(5, clients / 800), 25
    stop_at = time.monotonic() + ramp + warm_up + seconds + 5
    crowd, tasks = arriving_crowd(port, clients, ramp, stop_at)
    figures = {}
    try:
        await asyncio.sleep(ramp + warm_up)
        for each in crowd:
            each.gaps.clear()
        connections = sum(each.connections for each in crowd)
        rss, cpu_start, events = proc_status(pid, "VmRSS"), cpu_seconds(pid), total_ids(crowd)
        start = time.monotonic()
        await asyncio.sleep(seconds)
        events = total_ids(crowd) - events
        figures["streams ended and begun per s"] = (
            sum(each.connections for each in crowd) - connections
        ) / seconds
        gaps = sorted(gap for each in crowd for gap in each.gaps)
        figures["gap p99 (s)"] = gaps[int(len(gaps) * 0.99)]
        figures["longest stall: gap max (s)"] = gaps[-1]
        figures["late gaps > 1.25 s (%)"] = 100 * sum(g > 1.25 for g in gaps) / len(gaps)
        figures["CPU us per event"] = (cpu_seconds(pid) - cpu_start) / max(1, events) * 1e6
        figures["RSS MB, minute's start/end"] = (
            f"{rss / 1024:.0f}/{proc_status(pid, 'VmRSS') / 1024:.0f}"
        )
        figures.update(stalls(stats, start, start + seconds))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(3)  # the streams end before the server is stopped
    return figures


def total_ids(crowd):
    return sum(len(each.ids) for each in crowd)


def print_side_by_side(title, results):
    """app.py, then what Django costs (plain ASGI), then the ceiling (bare asyncio)."""
    print(f"\n{title}")
    print(f"{'':38}{'app.py':>12}{'plain ASGI':>12}{'bare asyncio':>14}")
    for name, ours in results["app.py"].items():
        plain, ceiling = results["plain ASGI"][name], results["bare asyncio"][name]
        print(f"{name:38}{figure(ours):>12}{figure(plain):>12}{figure(ceiling):>14}")


def figure(value):
    if isinstance(value, float) and value < 100:
        return f"{value:.3g}"
    return value if isinstance(value, str) else f"{value:.0f}"


# For a benchmark, no access log and one worker on one thread: the figures are per core.
BENCH_OPTIONS = {
    "daphne": "",
    "uvicorn": "--no-access-log --workers 1",
    "hypercorn": "--workers 0",  # serves in its own process, as the others do here
    "granian": "--no-access-log --workers 1 --runtime-threads 1",
}


def bench_command(server, application, port):
    if server == "daphne":
        endpoint = f"tcp:port={port}:interface=127.0.0.1:backlog=8192"
        return [DAPHNE, "-e", endpoint, application]
    options = f"{OTHER_SERVERS[server]} {BENCH_OPTIONS[server]}".format(port=port).split()
    return [beside_python(server), *options, application]


def bench(streams=4000, server="daphne", hold=20.0, max_age=20):
    """app.py on `server`, on core 0, this load on core 1; beside it, the same stream as a
    plain ASGI app on the same server, and from bare asyncio (the ceiling). First streams
    held, dropped and restarted; then streams that end every `max_age` and come back."""
    os.sched_setaffinity(0, {1})
    logs = Path(tempfile.mkdtemp(prefix="sse-bench-"))
    for module, code in (
        ("plain_asgi", PLAIN_ASGI_APP),
        ("probe", PROBE),
        ("probed", PROBED_ASGI_APP),
    ):
        (logs / f"{module}.py").write_text(code)
    modules = {"app.py": "app", "plain ASGI": "plain_asgi", "bare asyncio": None}
    held, ending = {}, {}
    for name, module in modules.items():
        for results, phase, age in (held, "held", 100_000), (ending, "ending", max_age):
            port = free_port()
            if module is None:
                command = [sys.executable, "-c", BARE_ASYNCIO_SERVER, str(port), str(age)]
            else:
                command = bench_command(server, "probed:application", port)
            stats = logs / f"{name.split()[0]}-{phase}.stats"
            if phase == "held":
                measurement = functools.partial(
                    load, port=port, streams=streams, hold=hold, stats=stats
                )
            else:
                measurement = functools.partial(turnover, port=port, clients=streams, stats=stats)
            log_path = logs / f"{name.split()[0]}-{phase}.log"
            env = {"SSE_MAX_AGE": str(age), "BENCH_APP": module or "", "BENCH_STATS": str(stats)}
            results[name] = measure(command, port, log_path, measurement, **env)
    versions = f"Python {sys.version.split()[0]}, Django {django.__version__}, {server} " + (
        importlib.metadata.version(server)
    )
    print_side_by_side(
        f"{streams} streams, one event a second, held {hold:.0f} s; {versions} on core 0",
        held,
    )
    print_side_by_side(
        f"{streams} browser-like clients, each stream ending after {max_age / 2:.0f}-{max_age:.0f} s"
        " and coming back, measured for a minute",
        ending,
    )
    errors = sum(
        len(re.findall("ERROR|Traceback", log.read_text())) for log in logs.glob("app.py-*.log")
    )
    print(f"{'errors logged by app.py':38}{errors:>12}")
    print(f"logs: {logs}")


def storm_report(clients=3000, seconds=40):
    """A restart with `clients` browser-like clients streaming: how soon all are back."""
    server = Server(
        Path(tempfile.mkdtemp(prefix="sse-storm-")),
        endpoint="tcp:port={port}:interface=127.0.0.1:backlog=4096",
    ).start()
    try:
        crowd, restarted = storm(server, clients, seconds)
    finally:
        server.stop()
    outages = sorted(max(each.outages) for each in crowd if each.outages)
    back = sorted(each.back_at - restarted for each in crowd if each.back_at)
    broken = sum(each.ids != list(range(len(each.ids))) for each in crowd)
    print(f"\n{clients} clients, server restarted once they all streamed (SIGTERM, start)")
    print(f"clients that saw the restart      {len(outages)}")
    print(
        f"never back                        {sum(each.down_since is not None for each in crowd)}"
    )
    print(
        f"outage per client p50/p99/max (s) {outages[len(outages) // 2]:.2f} / "
        f"{outages[int(len(outages) * 0.99)]:.2f} / {outages[-1]:.2f}"
    )
    print(f"all back, from the SIGTERM (s)    {back[-1]:.2f}")
    print(f"clients with an id skipped or repeated  {broken}")
    print(f"logs: {server.log_dir}")


class EventCounter(Listener):
    """A load client for one stream of the log: each id with data, and when it arrived."""

    def __init__(self, request):
        super().__init__(request)
        self.buffer = b""
        self.ids, self.times = [], []

    def connection_made(self, transport):
        super().connection_made(transport)
        self.opened = time.time()

    def data_received(self, data):
        super().data_received(data)
        # A chunk holds whole events, so chunk framing never falls inside one.
        self.buffer += data
        *whole, self.buffer = self.buffer.split(b"\n\n")
        arrived = time.time()
        for event_id in re.findall(rb"^id: (\d+)\ndata:", b"\n\n".join(whole), re.MULTILINE):
            self.ids.append(int(event_id))
            self.times.append(arrived)


READERS = """import json
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore

User.objects.bulk_create([User(username=f"reader{number}") for number in range(COUNT)])
sessions = []
for user in User.objects.filter(username__startswith="reader").order_by("pk"):
    session = SessionStore()  # as login() makes it
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    sessions.append((user.username, session.session_key))
print(json.dumps(sessions))
"""

PUBLISHING_RATE = """import multiprocessing, time
from django.db import connection, transaction
from live.events import publish


def publisher(after, locked, counts, seconds=5):
    count, stop = 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        with transaction.atomic():
            if locked:  # as the chapter once had it: taken in publish(), held to commit
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_xact_lock(7400001)")
            publish({"rate": count})
            time.sleep(after)  # the caller's transaction goes on after publish()
        count += 1
    connection.close()
    counts.put(count)


forking = multiprocessing.get_context("fork")  # each publisher a process, its own connection
for publishers, after, locked in CASES:
    counts = forking.Queue()
    processes = [
        forking.Process(target=publisher, args=(after, locked, counts)) for _ in range(publishers)
    ]
    started = time.monotonic()
    for process in processes:
        process.start()
    total = sum(counts.get() for _ in processes)
    for process in processes:
        process.join()
    print(publishers, after, locked, total / (time.monotonic() - started), flush=True)
"""
RATE_CASES = [  # publishers, seconds their transactions go on after publish(), old lock
    (1, 0, False),
    (4, 0, False),
    (8, 0, False),
    (16, 0, False),
    (32, 0, False),
    (4, 0.05, False),
    (4, 0.05, True),
]


def percentile(values, share):
    """By nearest rank: of 100 values, the 99th percentile is the second highest."""
    ordered = sorted(values)
    return ordered[math.ceil(len(ordered) * share) - 1]


def p50_p99(values):
    return f"{1000 * percentile(values, 0.5):.0f} / {1000 * percentile(values, 0.99):.0f}"


def bench_events(streams=3000):
    """The chapter's project on a PostgreSQL of its own, two Daphne processes and a reader
    for each stream, one user each: events for everyone, for one user, during a reconnect
    storm; publishing rates; clients that never read; then a LISTEN connection per stream,
    as popular tutorials do, beside it."""
    root = Path(tempfile.mkdtemp(prefix="sse-bench-events-"))
    database = PostgreSQL().start()  # fsync and synchronous commits on, as deployed
    try:
        project, env, sessions = bench_project(root, database, streams)
        figures = run_events_load(root, project, database, env, sessions)
        figures.update(publishing_rates(project, database, env))
        figures.update(stalled_clients(root, project, database, env, sessions))
        figures.update(silently_cut(root, project, database, env, sessions))
        figures.update(woken(project, database, env))
        print(
            f"\n{streams} streams, a user each, on two Daphne processes; the log in PostgreSQL "
            f"{database.version}; Python {sys.version.split()[0]}, Django {django.__version__}"
        )
        for name, value in figures.items():
            print(f"{name:58}{figure(value):>12}")
        print(
            "\nA LISTEN connection per stream, as popular tutorials do "
            f"(max_connections = {database.sql('SHOW max_connections')[0][0]}):"
        )
        for name, value in per_stream_listen(root, project, env).items():
            print(f"{name:38}{value}")
        print(f"logs: {root}")
    finally:
        database.remove()


def bench_project(root, database, readers, make=make_events_project, base="settings_deployed"):
    """The chapters' project on `database` (made by `make`), served with the settings of
    `base` and no cap, through an application role (not a superuser: the connection slots
    kept for superusers stay free), and `readers` users logged in; its settings'
    environment and their sessions."""
    database.sql("CREATE DATABASE mysite", dbname="postgres")
    (root / "project").mkdir()
    project = make(root / "project", database)
    for statement in (
        "CREATE ROLE app LOGIN",
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO app",
        "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app",
    ):
        database.sql(statement)
    (project / "mysite" / "settings_bench.py").write_text(
        f"from .{base} import *  # noqa\n\n"
        "SSE_MAX_STREAMS = 1_000_000  # capacity, not the cap\n"
        # Past 150 s, half of the chapter's 300, streams begin to end; a browser comes back
        # for what follows, these clients do not, and a run slowed by a busy machine got
        # that far: an hour, longer than any run.
        "SSE_MAX_AGE = 3600\n"
    )
    env = {**database.env, "PGUSER": "app", "DJANGO_SETTINGS_MODULE": "mysite.settings_bench"}
    code = READERS.replace("COUNT", str(readers))
    sessions = json.loads(in_project(project, database, code, **env))
    database.sql("VACUUM ANALYZE")  # now, not by autovacuum in the middle of a measurement
    return project, env, sessions


WOKEN = """import asyncio
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from live.events import Subscription, get_feed, publish


async def main():
    feed = get_feed()
    await asyncio.wait_for(feed.up.wait(), 10)
    users = await sync_to_async(list)(User.objects.filter(username__startswith="reader"))
    streams = [Subscription({"*", f"user:{user.pk}"}) for user in users]
    for stream in streams:
        feed.subscribe(stream)
    before = feed.last_id
    await sync_to_async(publish)({"for": "one"}, users[len(users) // 2])
    async with asyncio.timeout(10):
        while feed.last_id == before:
            await asyncio.sleep(0.01)
    print(sum(stream.arrived.is_set() for stream in streams), len(streams))


asyncio.run(main())
"""


def woken(project, database, env):
    """Subscriptions of every reader on one feed, the README's own: how many an event for
    one of them wakes."""
    count, streams = in_project(project, database, WOKEN, **env).split()
    return {f"streams woken by an event for one user, of {streams}": int(count)}


def run_events_load(root, project, database, env, sessions):
    endpoint = "tcp:port={port}:interface=127.0.0.1:backlog=8192"
    servers = two_daphnes(root, project, env, endpoint=endpoint)
    publisher = Publisher(project, env)
    meant_for = {}  # position: the username it was published for, None for everyone

    def publish(data, username=None):
        position, at = publisher.timed(data, "user" if username else None, username)
        meant_for[position] = username
        return position, at

    def cpu_of_servers():
        return sum(cpu_seconds(server.process.pid) for server in servers)

    async def load():
        loop = asyncio.get_running_loop()
        readers = []  # (username, counter), one for each stream

        async def connect(index, last_id=None):
            username, session = sessions[index]
            resume = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
            request = (
                f"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Cookie: sessionid={session}\r\n{resume}\r\n"
            ).encode()
            made = functools.partial(EventCounter, request)
            _, counter = await loop.create_connection(made, "127.0.0.1", servers[index % 2].port)
            readers.append((username, counter))
            return counter

        async def connect_many(indexes):
            ramp, started, counters = max(2, len(indexes) / 800), time.monotonic(), []
            for number, index in enumerate(indexes):
                counters.append(await connect(index))
                await asyncio.sleep(
                    max(0, started + ramp * number / len(indexes) - time.monotonic())
                )
            await until(lambda: all(each.arrivals for each in counters), 60)
            return counters

        async def published_over(events, every):
            """Publishes each (data, username) `every` seconds; their (position, time)."""
            published = []
            for data, username in events:
                tick = time.monotonic()
                published.append(await asyncio.to_thread(publish, data, username))
                await asyncio.sleep(max(0, tick + every - time.monotonic()))
            return published

        def latencies(published, counters):
            return [
                each.times[each.ids.index(position)] - at
                for position, at in published
                for each in counters
                if position in each.ids
            ]

        async def one_user_events(open_streams, count=300):
            """Events each for one user with a stream open, twenty a second: their latency,
            the servers' CPU for each beyond what they spend idle, and who got them."""
            idle_from, started = cpu_of_servers(), time.monotonic()
            await asyncio.sleep(count / 20)
            idle = (cpu_of_servers() - idle_from) / (time.monotonic() - started)
            users = [sessions[random.randrange(open_streams)][0] for _ in range(count)]
            cpu_from, started = cpu_of_servers(), time.monotonic()
            published = await published_over([({"for": user}, user) for user in users], 0.05)
            # Up to 5 s for the last: one later than that is printed below, with when.
            theirs = dict(readers)
            with contextlib.suppress(AssertionError):
                await until(
                    lambda: all(
                        position in theirs[meant_for[position]].ids for position, _ in published
                    ),
                    5,
                )
            await asyncio.sleep(0.5)  # and for a copy to any other stream
            cpu = cpu_of_servers() - cpu_from - idle * (time.monotonic() - started)
            got = {position: [] for position, _ in published}  # who got it, and when
            for username, each in readers:
                for position in got.keys() & set(each.ids):
                    got[position].append((username, each.times[each.ids.index(position)]))
            at = dict(published)
            astray = {
                position: whom
                for position, whom in got.items()
                if [username for username, _ in whom] != [meant_for[position]]
            }
            for position, whom in astray.items():
                # Had their stream ended, a browser would come back for it; this client
                # does not.
                stream = theirs[meant_for[position]]
                print(
                    f"event {position} for {meant_for[position]}, published at {at[position]:.3f},"
                    f" reached {[(name, f'+{when - at[position]:.3f} s') for name, when in whom]}"
                    f" {time.time() - at[position]:.3f} s after; their stream, status"
                    f" {stream.status}, opened {at[position] - stream.opened:.0f} s before it,"
                    f" {'ended' if stream.ended else 'open'}, its last event"
                    f" {stream.ids[-1] if stream.ids else None}",
                    flush=True,
                )
            latencies_all = latencies(published, [each for _, each in readers])
            return cpu / count, latencies_all, not astray

        figures = {}
        counters = await connect_many(range(300))
        cpu_300, latencies_300, only_theirs_300 = await one_user_events(300)
        counters += await connect_many(range(300, len(sessions)))
        cpu_all, latencies_all, only_theirs_all = await one_user_events(len(sessions))
        streams = len(counters)
        figures["streams"] = sum(each.status == 200 for each in counters)
        figures[f"an event for one user, {streams} streams: p50 / p99 ms"] = p50_p99(latencies_all)
        figures["  the same, 300 streams: p50 / p99 ms"] = p50_p99(latencies_300)
        figures["  the latest of the 600, ms"] = round(1000 * max(latencies_300 + latencies_all))
        figures[f"  server CPU ms for each, {streams} / 300 streams"] = (
            f"{1000 * cpu_all:.2f} / {1000 * cpu_300:.2f}"
        )
        figures["  reached its user's stream and no other"] = only_theirs_300 and only_theirs_all

        # Everyone's events: one a second for 30 s, then 200 as fast as one publisher goes.
        connections = threads = 0
        published = []
        for number in range(30):
            published += await published_over([({"number": number}, None)], 1)
            connections = max(connections, connected(database))
            threads = max(threads, *(proc_status(s.process.pid, "Threads") for s in servers))
        burst_at = time.time()
        burst = await published_over([({"burst": number}, None) for number in range(200)], 0)
        last = burst[-1][0]
        await until(lambda: all(last in each.ids for each in counters), 30)
        everyones = [position for position, _ in published + burst]
        figures["everyone's events: lost / repeated / out of order"] = "/".join(
            str(sum(count(each) for each in counters))
            for count in (
                lambda each: len(set(everyones) - set(each.ids)),
                lambda each: len(each.ids) - len(set(each.ids)),
                lambda each: sum(later < earlier for earlier, later in pairwise(each.ids)),
            )
        )
        figures["  from publish() to the client: p50 / p99 ms"] = p50_p99(
            latencies(published, counters)
        )
        figures["  the burst of 200, on every stream after: s"] = (
            max(each.times[each.ids.index(last)] for each in counters) - burst_at
        )
        figures["database connections, in all"] = connections
        figures["threads per process"] = threads

        # A reconnect storm: a third of the clients hang up and come back at once, with
        # Last-Event-ID, while everyone's events go on, ten a second.
        leaving, stayed = counters[: streams // 3], counters[streams // 3 :]
        for each in leaving:
            each.transport.abort()
        back = [await connect(index, each.ids[-1]) for index, each in enumerate(leaving)]
        during = await published_over([({"storm": number}, None) for number in range(30)], 0.1)
        last = during[-1][0]
        await until(lambda: all(last in each.ids for each in stayed + back), 30)
        figures[f"during {len(back)} reconnects at once: p50 / p99 ms"] = p50_p99(
            latencies(during, stayed)
        )
        figures["  the reconnected: lost / repeated"] = "/".join(
            str(sum(count(each) for each in back))
            for count in (
                lambda each: len({position for position, _ in during} - set(each.ids)),
                lambda each: len(each.ids) - len(set(each.ids)),
            )
        )
        figures["events delivered to a stream they were not for"] = sum(
            meant_for.get(position, "unknown") not in (None, username)
            for username, each in readers
            for position in each.ids
        )
        for each in stayed + back:
            each.transport.close()
        return figures

    try:
        figures = run(load())
    finally:
        publisher.close()
        for server in servers:
            server.stop()
    figures["errors logged"] = sum(
        len(re.findall("ERROR|Traceback", server.served)) for server in servers
    )
    # A query given up after TIMEOUT: the feed listens again, and what it had not read
    # comes seconds late. The one way found for an event to be a second late.
    figures["feeds that started over (cannot follow the event log)"] = sum(
        server.served.count("cannot follow the event log") for server in servers
    )
    return figures


# The client connections to the project's database, but the one that counts them.
CONNECTED = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'mysite'"
    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


def connected(database):
    return database.sql(CONNECTED)[0][0]


def publishing_rates(project, database, env):
    """Events a second from publishers in processes of their own, each a transaction."""
    code = PUBLISHING_RATE.replace("CASES", repr(RATE_CASES))
    figures = {}
    for line in in_project(project, database, code, timeout=300, **env).splitlines():
        publishers, after, locked, rate = line.split()
        name = f"publishing: {publishers} publishers"
        if float(after):
            name += f", each transaction {float(after) * 1000:.0f} ms on after publish()"
        if locked == "True":
            name = "  the same with the lock taken in publish()"
        figures[f"{name}, events/s"] = float(rate)
    return figures


def silently_cut(root, project, database, env, sessions):
    """A relay between a Daphne process and PostgreSQL stops forwarding on the connections
    it has, without closing them: how soon an event published then reaches a stream."""
    relay = Relay(database.port)
    server = Server(
        root,
        application="mysite.asgi:application",
        cwd=project,
        **{**env, "PGPORT": str(relay.port)},
    ).start()
    follower = Follower([server.url], f"sessionid={sessions[0][1]}")
    try:
        with following([follower]):
            relay.freeze()
            frozen = time.monotonic()
            in_project(
                project, database, "from live.events import publish\npublish('after')", **env
            )
            eventually(lambda: follower.data, 60, "the event")
            arrived = time.monotonic() - frozen
    finally:
        server.stop()
        relay.close()
    return {"the listener cut without a word: the event came after s": arrived}


def stalled_clients(root, project, database, env, sessions, cap=100, clients=300):
    """Clients that never read, more of them than the cap, and events of 60 KB: what the
    process holds."""
    (project / "mysite" / "settings_stalled.py").write_text(
        f"from .settings_bench import *  # noqa\n\nSSE_MAX_STREAMS = {cap}\n"
    )
    server = Server(
        root,
        application="mysite.asgi:application",
        cwd=project,
        **{**env, "DJANGO_SETTINGS_MODULE": "mysite.settings_stalled"},
    ).start()
    stop = threading.Event()

    def publish_large():
        code = (
            "import time\nfrom live.events import publish\n"
            "while True:\n    publish({'large': 'x' * 60_000})\n    time.sleep(0.02)\n"
        )
        with subprocess.Popen(
            [sys.executable, "manage.py", "shell", "--no-imports", "-c", code],
            cwd=project,
            env={**os.environ, **env},
        ) as publishing:
            stop.wait()
            publishing.kill()

    sockets = []
    try:
        cookie = f"sessionid={sessions[0][1]}"
        assert status_of(server.url + "/stream/", Cookie=cookie) == 200  # the feed is up
        rss_before = proc_status(server.process.pid, "VmRSS")
        threading.Thread(target=publish_large, daemon=True).start()
        for wave in range(clients // cap):
            for _ in range(cap):
                raw = socket.socket()
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing
                raw.connect(("127.0.0.1", server.port))
                raw.sendall(
                    f"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n".encode()
                )
                sockets.append(raw)
            # Each stream ends once it has sent SSE_MAX_BYTES, and frees its place.
            server.wait_for_log(r'"GET /stream/" 200 \d{6,}', count=(wave + 1) * cap, timeout=60)
        time.sleep(2)
        rss_after = proc_status(server.process.pid, "VmRSS")
        # What the kernel holds in the server's send queues, not in the process's memory.
        queues = subprocess.run(
            ["ss", "-tnH", "state", "established", f"( sport = :{server.port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        kernel = sum(int(line.split()[1]) for line in queues.splitlines())
    finally:
        stop.set()
        for raw in sockets:
            raw.close()
        server.stop()
    return {
        f"{clients} clients that never read, cap {cap}: RSS grew MB": (rss_after - rss_before)
        / 1024,
        "  and the kernel's send queues held MB": kernel / 2**20,
        "  SSE_MAX_BYTES times the cap, MB": cap,
    }


# As popular tutorials have it: the view opens a connection of its own and LISTENs on it.
PER_STREAM_LISTEN = """import psycopg
from django.http import StreamingHttpResponse


async def events():
    async with await psycopg.AsyncConnection.connect("dbname=mysite", autocommit=True) as db:
        await db.execute("LISTEN live_event")
        yield ": listening\\n\\n"
        async for notification in db.notifies():
            yield f"data: {notification.payload}\\n\\n"


async def stream(request):
    return StreamingHttpResponse(events(), content_type="text/event-stream")
"""


def with_stream_view(project, name, code, at="stream/"):
    """The bench project with `code`'s `stream` view at `at`, before the chapter's, as
    module live/NAME.py; the settings module that serves it."""
    (project / "live" / f"{name}.py").write_text(code)
    (project / "mysite" / f"urls_{name}.py").write_text(
        f"from django.urls import path\n\nfrom live.{name} import stream\n"
        "from mysite.urls import urlpatterns as chapter\n\n"
        f'urlpatterns = [path("{at}", stream), *chapter]\n'
    )
    (project / "mysite" / f"settings_{name}.py").write_text(
        f'from .settings_bench import *  # noqa\n\nROOT_URLCONF = "mysite.urls_{name}"\n'
    )
    return f"mysite.settings_{name}"


def per_stream_listen(root, project, env, most=200):
    """Streams opened one by one until one fails: at which, and what its client sees."""
    settings_module = with_stream_view(project, "per_stream_listen", PER_STREAM_LISTEN)
    server = Server(
        root,
        application="mysite.asgi:application",
        cwd=project,
        **{**env, "DJANGO_SETTINGS_MODULE": settings_module},
    ).start()
    opened, seen = [], "never failed"
    try:
        cookie = session_cookie(server.url)
        for number in range(1, most + 1):
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            opened.append(raw)
            raw.sendall(b"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            try:
                status_line = raw.recv(4096).split(b"\r\n")[0].decode()
            except TimeoutError:
                status_line = "nothing within 5 s"
            if not status_line.endswith("200 OK"):
                seen = f"stream {number}: {status_line or 'hung up'}"
                break
        with httpx.Client(base_url=server.url, timeout=10) as http:
            admin = http.get("/admin/", headers={"Cookie": cookie})
        return {
            "the first stream that failed": seen,
            "then a view that reads the database": f"HTTP {admin.status_code}",
        }
    finally:
        for raw in opened:
            raw.close()
        server.stop()


# What readers try first under WSGI, as tutorials have it: a sync view that polls the log.
POLLING_VIEW = """import time

from django.http import StreamingHttpResponse

from .models import Event


def stream(request):
    def events():
        yield "retry: 2000\\n\\n"
        last = Event.objects.order_by("-position").values_list("position", flat=True).first()
        while True:
            new = Event.objects.filter(position__gt=last or 0).order_by("position")
            for position, data in new.values_list("position", "data"):
                yield f"id: {position}\\ndata: {data}\\n\\n"
                last = position
            time.sleep(1)

    return StreamingHttpResponse(events(), content_type="text/event-stream")
"""
# gunicorn serving everything, the polling view for /stream/: as it ships, and two ways
# readers widen it.
OBVIOUS_SHAPES = {
    "gunicorn's defaults (1 sync worker)": [],
    "--workers 4": ["--workers", "4"],
    "-k gthread --workers 2 --threads 4": ["-k", "gthread", "--workers", "2", "--threads", "4"],
}
OPEN_STREAMS = [0, 4, 8, 100]


def page_loads(url, cookie, count=200, timeout=5):
    """The seconds each of `count` page loads took, one after another, up to the first
    that had no answer within `timeout` (then None)."""
    times = []
    with httpx.Client(base_url=url, headers={"Cookie": cookie}, timeout=timeout) as http:
        for _ in range(count + 10):  # the first ten warm every worker up, and do not count
            started = time.monotonic()
            try:
                http.get("/").raise_for_status()
            except httpx.TimeoutException:
                return [*times[10:], None]
            times.append(time.monotonic() - started)
    return times[10:]


def page_p99(times):
    if None in times:
        return "none in 5 s" if times == [None] else f"{len(times) - 1} then none"
    return f"{1000 * percentile(times, 0.99):.0f} ms"


def streams_held(port, cookie, count, held):
    """Opens `count` more streams at once; how many began (a status line within 2 s, and
    5 ms more for each)."""
    request = f"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n".encode()
    opened = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    for raw in opened:
        raw.sendall(request)
        raw.setblocking(False)
    held += opened
    began, deadline = 0, time.monotonic() + 2 + count / 200
    with selectors.DefaultSelector() as waiting:
        for raw in opened:
            waiting.register(raw, selectors.EVENT_READ)
        while waiting.get_map() and time.monotonic() < deadline:
            for key, _ in waiting.select(0.1):
                began += key.fileobj.recv(64).startswith(b"HTTP/1.1 200")
                waiting.unregister(key.fileobj)
    return began


def bench_deploy(streams=3000):
    """The README's shapes where a project already runs, and the obvious attempt beside
    them: page loads as streams open, on gunicorn's sync workers with the polling view, and
    in the README's WSGI shape; then `streams` streams on 4 uvicorn workers under gunicorn."""
    root = Path(tempfile.mkdtemp(prefix="sse-bench-deploy-"))
    database = PostgreSQL().start()
    try:
        project, env, sessions = bench_project(root, database, streams)
        cookie = f"sessionid={sessions[0][1]}"
        polling = with_stream_view(project, "polling", POLLING_VIEW)
        rows = {}
        for shape, options in OBVIOUS_SHAPES.items():
            port = free_port()
            server = Server(
                root,
                "gunicorn",
                command=["gunicorn", "mysite.wsgi", *options, "--bind", f"127.0.0.1:{port}"],
                port=port,
                cwd=project,
                **{**env, "DJANGO_SETTINGS_MODULE": polling},
            ).start()
            held, began, row = [], 0, []
            try:
                for count in OPEN_STREAMS:
                    began += streams_held(port, cookie, count - len(held), held)
                    row.append(page_p99(page_loads(server.url, cookie)))
            finally:
                for raw in held:
                    raw.close()
                server.stop()
            rows[f"{shape}, the polling view"] = [*row, f"{began} of {OPEN_STREAMS[-1]}"]
        rows["the README's WSGI shape: gunicorn --workers 4, Daphne, nginx"] = wsgi_shape_load(
            root, project, env, cookie
        )
        print(
            f"\nPage load p99 (200 loads, one at a time) with streams open; Python "
            f"{sys.version.split()[0]}, Django {django.__version__}, gunicorn "
            f"{importlib.metadata.version('gunicorn')}"
        )
        print(
            f"{'':66}"
            + "".join(f"{count:>12}" for count in [*OPEN_STREAMS, 1000])
            + f"{'streams begun':>16}"
        )
        for shape, row in rows.items():
            cells = row[:-1] + [""] * (len(OPEN_STREAMS) + 1 - len(row[:-1]))
            print(f"{shape:66}" + "".join(f"{cell:>12}" for cell in cells) + f"{row[-1]:>16}")
        print(
            "\nThe chapter's stream view under gunicorn's sync workers (--workers 4),"
            f" {UNDER_WSGI_PAGES} pages open for {UNDER_WSGI_SECONDS} s:"
        )
        print(f"{'':30}{'requests a minute a page':>26}{'lines logged':>14}{'tracebacks':>12}")
        for name, row in under_wsgi(root, project, env, cookie).items():
            print(
                f"{name:30}"
                + "".join(f"{cell:>{width}}" for cell, width in zip(row, (26, 14, 12)))
            )
        print(f"\n{streams} streams on gunicorn with 4 uvicorn workers:")
        for name, value in uvicorn_workers_load(root, project, env, sessions).items():
            print(f"{name:58}{figure(value):>12}")
        print(f"logs: {root}")
    finally:
        database.remove()


UNDER_WSGI_PAGES, UNDER_WSGI_SECONDS = 10, 60


def under_wsgi(root, project, env, cookie):
    """The chapter's stream view served by gunicorn's sync workers, as if by mistake, and
    the same view without its check for WSGI: how often each open page asks for a stream
    (an EventSource, coming back as browsers do), and what the log gets."""
    views = {path: code for path, _, code in readme_project_files(EVENTS)}["live/views.py"]
    unguarded = views.replace("if not isinstance(request, ASGIRequest):", "if False:")
    variants = {
        "as written": env["DJANGO_SETTINGS_MODULE"],
        "without its check": with_stream_view(project, "unguarded", unguarded),
    }
    rows = {}
    for name, settings_module in variants.items():
        port = free_port()
        server = Server(
            root,
            "gunicorn",
            command=["gunicorn", "mysite.wsgi", "--workers", "4", "--bind", f"127.0.0.1:{port}"],
            port=port,
            cwd=project,
            **{**env, "DJANGO_SETTINGS_MODULE": settings_module},
        ).start()
        try:
            time.sleep(2)  # every worker booted: its lines are not counted
            logged = len(server.log.splitlines())
            pages = [Follower([server.url], cookie) for _ in range(UNDER_WSGI_PAGES)]
            with following(pages, started=False):
                time.sleep(UNDER_WSGI_SECONDS)
            log = server.log.splitlines()[logged:]
        finally:
            server.stop()
        asked = sum(len(page.statuses) for page in pages) / UNDER_WSGI_PAGES
        rows[name] = [
            f"{asked * 60 / UNDER_WSGI_SECONDS:.0f}",
            str(sum(bool(line.strip()) for line in log)),
            str(sum("Traceback" in line for line in log)),
        ]
    return rows


def wsgi_shape_load(root, project, env, cookie):
    held, began, row = [], 0, []
    with readme_wsgi_shape(root, project, env) as shape:
        try:
            for count in [*OPEN_STREAMS, 1000]:
                began += streams_held(shape.port, cookie, count - len(held), held)
                row.append(page_p99(page_loads(shape.url, cookie)))
        finally:
            for raw in held:
                raw.close()
    return [*row, f"{began} of 1000"]


def uvicorn_workers_load(root, project, env, sessions):
    server = readme_uvicorn_workers(root, project, env)
    port = server.port
    publisher = Publisher(project, env)
    publish = publisher.timed

    async def load():
        loop = asyncio.get_running_loop()
        counters = []
        for index, (_, session) in enumerate(sessions):
            request = (
                f"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: sessionid={session}\r\n\r\n"
            ).encode()
            made = functools.partial(EventCounter, request)
            counters.append((await loop.create_connection(made, "127.0.0.1", port))[1])
            await asyncio.sleep(max(5, len(sessions) / 800) / len(sessions))
        await until(lambda: all(each.arrivals for each in counters), 60)
        published = []
        for number in range(20):
            tick = time.monotonic()
            published.append(await asyncio.to_thread(publish, {"number": number}))
            await asyncio.sleep(max(0, tick + 1 - time.monotonic()))
        for number in range(100):
            published.append(await asyncio.to_thread(publish, {"burst": number}))
        last = published[-1][0]
        await until(lambda: all(last in each.ids for each in counters), 30)
        for each in counters:
            each.transport.close()
        return counters, published

    try:
        counters, published = run(load())
    finally:
        publisher.close()
        server.stop(timeout=20)
    positions = [position for position, _ in published]
    latencies = [
        each.times[each.ids.index(position)] - at
        for position, at in published[:20]
        for each in counters
        if position in each.ids
    ]
    return {
        "streams": sum(each.status == 200 for each in counters),
        "workers": len(re.findall("Booting worker with pid", server.served)),
        "lost / repeated / out of order": "/".join(
            str(sum(count(each) for each in counters))
            for count in (
                lambda each: len(set(positions) - set(each.ids)),
                lambda each: len(each.ids) - len(set(each.ids)),
                lambda each: sum(later < earlier for earlier, later in pairwise(each.ids)),
            )
        ),
        "from publish() to the client: p50 / p99 ms": p50_p99(latencies),
        "errors logged": len(re.findall("ERROR|Traceback", server.served)),
    }


class ReplyReader(Listener):
    """A load client for one user's stream, read as the chat page reads it: each event's
    data, and when it arrived."""

    def __init__(self, request):
        super().__init__(request)
        self.buffer, self.events = b"", []

    def data_received(self, data):
        super().data_received(data)
        self.buffer += data
        *whole, self.buffer = self.buffer.split(b"\n\n")
        arrived = time.time()
        for event in re.findall(rb"^data: (.*)$", b"\n\n".join(whole), re.MULTILINE):
            self.events.append((arrived, json.loads(event)))

    def of(self, prompt):
        """The events of the reply to `prompt`."""
        replies = {data["reply"] for _, data in self.events if data.get("prompt") == prompt}
        return [(at, data) for at, data in self.events if data.get("reply") in replies]

    def over(self, prompt):
        return any(data.get("status") in ENDED for _, data in self.of(prompt))

    def reply(self, prompt):
        """The reply to `prompt` as the page builds it (each part once, in order): its
        text; when each part arrived, with the text's length then; parts lost, doubled."""
        parts = [(at, data) for at, data in self.of(prompt) if "part" in data]
        numbers = [data["part"] for _, data in parts]
        text, arrivals = "", []
        for at, data in parts:
            if data["part"] == len(arrivals):
                text += data["text"]
                arrivals.append((at, len(text)))
        lost = max(numbers, default=-1) + 1 - len(set(numbers))
        return text, arrivals, lost, len(numbers) - len(set(numbers))


ENDED = ("finished", "stopped", "failed")


def chunk_latencies(record, arrivals):
    """Seconds from each chunk the model sent to the part that brought it to the page."""
    latencies, end = [], 0
    for piece, sent in zip(record["pieces"], record["sent"]):
        end += len(piece)
        arrived = next((at for at, reached in arrivals if reached >= end), None)
        if arrived is not None:
            latencies.append(arrived - sent)
    return latencies


class ChatLoad:
    """The chat's project as deployed: two Daphne processes and two workers, the model a
    stand-in in a process of its own; a stream and a client for each user."""

    def __init__(self, root, database, project, env, sessions, model_port):
        self.database, self.sessions = database, sessions
        self.model = f"http://127.0.0.1:{model_port}"
        endpoint = "tcp:port={port}:interface=127.0.0.1:backlog=8192"
        self.servers = two_daphnes(root, project, env, endpoint=endpoint)
        self.workers = [ReplyWorker(root, project, env).start() for _ in range(2)]
        self.token = secrets.token_hex(16)  # a CSRF token of the client's own, cookie and header

    def records(self):
        """What the model was asked, by prompt: the latest request for each."""
        records = httpx.get(f"{self.model}/records", timeout=60).json()
        return {each["messages"][-1]["content"]: each for each in records}

    def commits(self):
        """WAL flushes so far: commits that wrote, one flush for those that commit at once."""
        return self.database.sql("SELECT wal_sync FROM pg_stat_wal")[0][0]

    def threads(self, kind):
        processes = self.servers if kind == "Daphne" else self.workers
        return max(proc_status(each.process.pid, "Threads") for each in processes)

    async def readers(self, users):
        loop = asyncio.get_running_loop()
        readers = []
        for index in users:
            session = self.sessions[index][1]
            request = (
                f"GET /stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: sessionid={session}\r\n\r\n"
            ).encode()
            port = self.servers[index % 2].port
            made = functools.partial(ReplyReader, request)
            readers.append((await loop.create_connection(made, "127.0.0.1", port))[1])
        await until(lambda: all(each.arrivals for each in readers), 30)
        return readers

    async def post(self, http, index, path, **data):
        """A POST by user `index` to the process their stream is on; when it was sent."""
        cookie = f"sessionid={self.sessions[index][1]}; csrftoken={self.token}"
        url = self.servers[index % 2].url + path
        sent = time.time()
        answer = await http.post(
            url, data=data, headers={"Cookie": cookie, "X-CSRFToken": self.token}
        )
        assert answer.status_code in (202, 204), (answer.status_code, answer.text)
        return sent

    async def answers(
        self, count, chunks, per_second, over=0.0, stop_after=None, first=0, kind=""
    ):
        """`count` users from the `first` each ask for an answer of `chunks` at
        `per_second`, one after another over `over` seconds; with `stop_after`, each asks
        to stop it that many seconds after asking. `kind` goes in the prompts: "[long]"."""
        import psycopg

        indexes = range(first, first + count)
        readers = await self.readers(indexes)
        tag = secrets.token_hex(3)
        prompts = [
            f"{tag} {self.sessions[i][0]} [{chunks} at {per_second}/s]{kind}" for i in indexes
        ]

        async def user(number):
            await asyncio.sleep(over * number / count)
            index = indexes[number]
            asked = await self.post(http, index, "/chat/send/", prompt=prompts[number])
            if stop_after is None:
                return asked, None
            await asyncio.sleep(stop_after)
            reply = readers[number].of(prompts[number])[0][1]["reply"]
            return asked, await self.post(http, index, f"/chat/{reply}/stop/")

        commits, threads, connections = self.commits(), {"Daphne": 0, "worker": 0}, 0
        started = time.monotonic()
        deadline = started + 30 + over + chunks / per_second
        # Counted on a connection held open, and awaited: a new connection each time held
        # this loop, and so the arrivals it stamps, up to 20 ms.
        watch = await psycopg.AsyncConnection.connect(
            **self.database.connection("mysite"), autocommit=True
        )
        # One client for all: making one costs milliseconds of this loop, that every
        # answer being read would wait for.
        unlimited = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        # This client's own collections kept out of what it times, as timeit does: a full
        # one, between a Send and its first part, added up to 100 ms.
        gc.collect()
        gc.disable()
        try:
            async with watch, httpx.AsyncClient(timeout=30, limits=unlimited) as http:
                users = asyncio.gather(*map(user, range(count)))
                while not users.done() or not all(map(ReplyReader.over, readers, prompts)):
                    counted = await (await watch.execute(CONNECTED)).fetchone()
                    connections = max(connections, counted[0])
                    threads = {k: max(most, self.threads(k)) for k, most in threads.items()}
                    assert time.monotonic() < deadline, "not ended"
                    await asyncio.sleep(0.2)
        finally:
            gc.enable()
        commits = (self.commits() - commits) / (time.monotonic() - started)
        records = await asyncio.to_thread(self.records)
        for reader in readers:
            reader.transport.close()
        figures = SimpleNamespace(
            commits=commits,
            connections=connections,
            threads=threads,
            latencies=[],
            added=[],
            lost=0,
            doubled=0,
            inexact=0,
            hang_ups=[],
            never_asked=0,
        )
        for reader, prompt, (asked, stopped) in zip(readers, prompts, users.result()):
            if stopped and prompt not in records:  # stopped while queued: no model to stop
                assert any(data.get("status") == "stopped" for _, data in reader.of(prompt))
                figures.never_asked += 1
                continue
            record = records[prompt]
            text, arrivals, lost, doubled = reader.reply(prompt)
            figures.latencies += chunk_latencies(record, arrivals)
            model_first = record["sent"][0] - record["received"]
            figures.added.append(arrivals[0][0] - asked - model_first)
            figures.lost += lost
            figures.doubled += doubled
            made = answer_to(record["messages"])
            figures.inexact += not made.startswith(text) if stopped else text != made
            if stopped:
                ended = [data for _, data in reader.of(prompt) if data.get("status") in ENDED]
                assert record["hung_up"], (prompt, ended, len(record["sent"]))
                figures.hang_ups.append(record["hung_up"] - stopped)
        return figures

    def stop(self):
        for each in [*self.workers, *self.servers]:
            each.stop()


# What tutorials have: the provider's sync SDK iterated in a sync generator inside a
# StreamingHttpResponse, the prompt in the query string.
USUAL_RECIPE = """from django.conf import settings
from django.http import StreamingHttpResponse
from openai import OpenAI

client = OpenAI(base_url=settings.MODEL_URL, api_key=settings.MODEL_KEY)


def stream(request):
    def answer():
        for chunk in client.chat.completions.create(
            model=settings.MODEL_NAME,
            messages=[{"role": "user", "content": request.GET["prompt"]}],
            stream=True,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    return StreamingHttpResponse(answer(), content_type="text/plain")
"""


USUAL_GONE = 10  # clients that hang up, in the usual recipe's measurement


def usual_recipe(server, model, count, chunks=60, per_second=30, gone=USUAL_GONE):
    """`count` answers at once from the usual recipe on `server`, started: when each first
    byte came, the most threads its processes had; then `gone` clients that hang up after
    1 s: when the model's connection closed, if it did."""
    tag = secrets.token_hex(3)

    async def ask(number, hang_up_after=None):
        """An answer read to its end: when its first byte came. Or the client gone after
        `hang_up_after` seconds: when it went."""
        prompt, started, first = f"{tag} {number} [{chunks} at {per_second}/s]", time.time(), None

        async def read():
            nonlocal first
            async with (
                httpx.AsyncClient(base_url=server.url, timeout=300) as http,
                http.stream("GET", "/usual/", params={"prompt": prompt}) as answer,
            ):
                async for _ in answer.aiter_bytes():
                    first = first or time.time() - started

        reading = asyncio.create_task(read())
        if hang_up_after is None:
            await reading
            return prompt, first
        await asyncio.sleep(hang_up_after)
        reading.cancel()
        return prompt, time.time()

    async def load():
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        threads, tasks = 0, [asyncio.create_task(ask(number)) for number in range(count)]
        while not all(task.done() for task in tasks):
            pids = [server.process.pid, *map(int, children.read_text().split())]
            threads = max(threads, sum(proc_status(pid, "Threads") or 0 for pid in pids))
            await asyncio.sleep(0.1)
        firsts = [first for _, first in await asyncio.gather(*tasks)]
        hung_up = await asyncio.gather(*(ask(f"gone {number}", 1) for number in range(gone)))
        await asyncio.sleep(chunks / per_second)  # long enough for the model to end
        return firsts, threads, hung_up

    firsts, threads, hung_up = run(load())
    records = httpx.get(f"{model}/records", timeout=60).json()
    records = {each["messages"][-1]["content"]: each for each in records}
    asked = [(records[prompt], at) for prompt, at in hung_up if prompt in records]
    closed = [record["hung_up"] - at for record, at in asked if record["hung_up"]]
    return firsts, threads, closed, len(asked) - len(closed), gone - len(asked)


def bench_replies(count=100):
    """The chapter's chat on two Daphne processes and two workers, the model a stand-in
    streaming 30 chunks a second: `count` answers at once, then stopped, then more
    until the chunks' p99 passes 250 ms; beside it, the usual recipe."""
    root = Path(tempfile.mkdtemp(prefix="sse-bench-replies-"))
    database = PostgreSQL().start()  # fsync and synchronous commits on, as deployed
    port = free_port()
    model = subprocess.Popen(
        [
            "taskset",
            "-c",
            "1",
            sys.executable,
            "-c",
            f"import test_app; test_app.StandIn.serve_forever({port})",
        ],
        cwd=HERE,
    )
    try:
        wait_until_listening(port, model)
        make = functools.partial(make_chat_project, stand_in=SimpleNamespace(port=port))
        most = [count // 2, count, 2 * count, 3 * count, 4 * count]
        project, env, sessions = bench_project(root, database, most[-1], make, "settings_chat")
        load = ChatLoad(root, database, project, env, sessions, port)
        try:
            # Each process and worker warmed up: a worker's first answer waits for its SDK
            # to load what it loads on first use.
            for _ in range(20):
                run(load.answers(2, 10, 30))
                if load.database.sql("SELECT count(DISTINCT worker) FROM live_reply")[0][0] == 2:
                    break
            # Each the first prompt of a conversation; then one conversation's 21st to 60th.
            first_prompts = range(most[-1] - 100, most[-1])
            alone = [run(load.answers(1, 10, 30, first=user)).added[0] for user in first_prompts]
            conversation = [run(load.answers(1, 10, 30)).added[0] for _ in range(60)][20:]
            wal = []  # bytes, for one long answer in 60 chunks, then in 600
            for chunks in 60, 600:
                before = load.database.sql("SELECT wal_bytes FROM pg_stat_wal")[0][0]
                long = load.answers(1, chunks, 60, first=most[-1] - 101, kind=" [long]")
                assert not run(long).inexact
                wal.append(load.database.sql("SELECT wal_bytes FROM pg_stat_wal")[0][0] - before)
            at_once = run(load.answers(count, 180, 30, over=3))
            burst = run(load.answers(count, 60, 30))
            stopping = run(load.answers(count, 600, 30, over=2, stop_after=2))
            ceiling = []
            for answers in most:
                p99 = percentile(run(load.answers(answers, 180, 30, over=3)).latencies, 0.99)
                ceiling.append(f"{answers}: {1000 * p99:.0f} ms")
                if p99 > 0.25:
                    break
        finally:
            load.stop()
        usual = {}
        for name, kind, command in (
            ("Daphne", "daphne", None),
            ("gunicorn --workers 4", "gunicorn", ["gunicorn", "mysite.wsgi", "--workers", "4"]),
        ):
            # Not at /stream/, which mysite/asgi.py serves outside Django's per-request thread.
            settings_module = with_stream_view(project, "usual", USUAL_RECIPE, at="usual/")
            port_usual = free_port()
            server = Server(
                root,
                kind,
                application="mysite.asgi:application",
                cwd=project,
                command=command
                and [*command, "--timeout", "300", "--bind", f"127.0.0.1:{port_usual}"],
                port=port_usual,
                **{**env, "DJANGO_SETTINGS_MODULE": settings_module},
            ).start()
            try:
                usual[name] = usual_recipe(server, f"http://127.0.0.1:{port}", count)
            finally:
                server.stop()

        print(
            f"\n{count} answers at once (asked over 3 s, 180 chunks at 30 a second), to pages"
            f" on two Daphne processes, two workers; Python {sys.version.split()[0]}, Django"
            f" {django.__version__}, PostgreSQL {database.version}"
        )
        rows = {
            "chunk to the page, p50 / p99 ms": p50_p99(at_once.latencies),
            "time added before the first chunk, one answer alone, p50 / p99 ms": p50_p99(alone),
            "  the same, with 20 earlier turns of the conversation": p50_p99(conversation),
            f"  the same, {count} at once": p50_p99(at_once.added),
            f"  the same, {count} asked in the same instant": p50_p99(burst.added),
            "parts lost / doubled; answers not byte-exact": f"{at_once.lost} / {at_once.doubled}; {at_once.inexact}",
            "commits that wrote (WAL flushes), a second": f"{at_once.commits:.0f}",
            "WAL for an answer of 16,000 characters, in 1 s / 10 s, MB": " / ".join(
                f"{float(written) / 1e6:.2f}" for written in wal
            ),
            "database connections, in all": at_once.connections,
            "threads, a Daphne / a worker": f"{at_once.threads['Daphne']} / {at_once.threads['worker']}",
            f"Stop, {count} over 2 s: to the model's hang-up, p50 / p99 ms": p50_p99(
                stopping.hang_ups
            ),
            "  lost / doubled; not what the model sent": f"{stopping.lost} / {stopping.doubled}; {stopping.inexact}",
            "  stopped before a worker took them": stopping.never_asked,
            "answers at once: chunk to the page, p99": ", ".join(ceiling),
        }
        for name, value in rows.items():
            print(f"{name:66}{value:>24}")
        print(f"\nThe usual recipe, {count} answers at once:")
        gone = USUAL_GONE
        for name, (firsts, threads, closed, went_on, unasked) in usual.items():
            print(
                f"{name:24} first byte p50 / p99 ms {p50_p99(firsts):>14}   threads, most {threads}"
            )
            print(
                f"{'':24} {gone} clients gone after 1 s: the model hung up on {len(closed)}"
                f" (after {p50_p99(closed) if closed else '-'} ms), went on to the end for"
                f" {went_on}, was not asked yet for {unasked}"
            )
        print(f"logs: {root}")
    finally:
        model.kill()
        database.remove()


if __name__ == "__main__":
    usage = (
        "python test_app.py bench [STREAMS] [--server NAME] | storm [CLIENTS]"
        " | bench-events [STREAMS] | bench-deploy [STREAMS] | bench-replies [ANSWERS]"
    )
    command, *rest = sys.argv[1:] or ["bench"]
    server = rest[rest.index("--server") + 1] if "--server" in rest else "daphne"
    count = [word for word in rest if word.isdigit()]
    resource.setrlimit(resource.RLIMIT_NOFILE, (20_000, 20_000))  # a socket per stream
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if command == "bench" and server in SERVERS:
        bench(int(count[0]) if count else 4000, server)
    elif command == "storm":
        storm_report(int(count[0]) if count else 3000)
    elif command == "bench-events":
        bench_events(int(count[0]) if count else 3000)
    elif command == "bench-deploy":
        bench_deploy(int(count[0]) if count else 3000)
    elif command == "bench-replies":
        bench_replies(int(count[0]) if count else 100)
    else:
        sys.exit(f"usage: {usage}; servers: {', '.join(SERVERS)}")
