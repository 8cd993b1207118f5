"""Server-sent events with Django and Daphne, in one file.

Run:    daphne app:application        then open http://127.0.0.1:8000/
Watch:  curl -N http://127.0.0.1:8000/stream/
Resume: curl -N -H 'Last-Event-ID: 41' http://127.0.0.1:8000/stream/
"""

import asyncio
import gc
import logging
import os
import random
import re
import secrets
import sys
import threading
import weakref
from pathlib import Path

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.signals import request_finished, request_started
from django.dispatch import receiver
from django.http import HttpResponse, StreamingHttpResponse
from django.template.loader import render_to_string
from django.urls import path
from django.views.decorators.http import require_GET, require_safe

SSE_INTERVAL = float(os.environ.get("SSE_INTERVAL", "1.0"))  # seconds between events
SSE_MAX_AGE = float(os.environ.get("SSE_MAX_AGE", "300"))  # seconds before a stream ends
SSE_MAX_STREAMS = int(os.environ.get("SSE_MAX_STREAMS", "6000"))  # per process

settings.configure(
    DEBUG=os.environ.get("DJANGO_DEBUG") == "1",
    # Django signs nothing here, so a fresh random key per start loses nothing.
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50),
    ALLOWED_HOSTS=os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(","),
    # Make this module the URLconf.
    ROOT_URLCONF=__name__,
    # With daphne installed as an app, `python app.py runserver` serves ASGI through it.
    INSTALLED_APPS=["daphne"],
    # __name__, not "app": under `python app.py` this module is __main__.
    ASGI_APPLICATION=f"{__name__}.application",
    # Each hook of Django's stock middleware is a hop to a thread and back, and
    # three of them double the cost of starting a stream: the views set the few
    # headers the page needs themselves.
    MIDDLEWARE=[],
    TEMPLATES=[
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "DIRS": [Path(__file__).resolve().parent],  # sse.html sits beside us
        }
    ],
    LOGGING={
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
        # Daphne gives the root logger a handler; runserver, uvicorn, hypercorn and
        # granian do not, and without one our lines would go nowhere under them.
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "filters": {
            "not_refused": {
                "()": "django.utils.log.CallbackFilter",
                "callback": lambda record: getattr(record, "status_code", None) != 503,
            }
        },
        "loggers": {
            # A refused stream is expected under load, and the access log counts
            # them: an ERROR line each would page someone. A 500 still logs.
            "django.request": {"filters": ["not_refused"]},
            # A foreign Host or a flood of query fields is the client's fault: it
            # gets a 400, the access log shows it, and a traceback per bad request
            # would only bury the log.
            "django.security": {"level": "CRITICAL"},
        },
    },
)

logger = logging.getLogger(__name__)

EMOJIS = "🚀 🐎 🌅 🦾 🍇".encode().split()  # bytes: Django sends them as they are
LAST_EVENT_ID = re.compile(r"[0-9]{1,18}")  # ASCII only, and small enough to add 1
places = threading.BoundedSemaphore(SSE_MAX_STREAMS)


class Place:
    """One of SSE_MAX_STREAMS, freed exactly once: when its stream ends, or when it is
    collected if the client left before the stream began, in whichever thread that is."""

    def __init__(self):
        self.free = weakref.finalize(self, places.release)


ticks = weakref.WeakKeyDictionary()  # event loop: the streams waiting for its next tick
AT_A_TIME = 250  # streams woken in one turn of the event loop


async def next_tick():
    """Wakes every open stream from one timer, not one timer per stream. A future
    belongs to one event loop, and a server may run several: one clock each."""
    loop = asyncio.get_running_loop()
    if (waiting := ticks.get(loop)) is None:
        waiting = ticks[loop] = []
        loop.call_later(SSE_INTERVAL, lambda: wake(loop, ticks.pop(loop)))
    waiting.append(woken := loop.create_future())
    await woken


def wake(loop, waiting, start=0):
    """Wakes AT_A_TIME streams, and the next ones in the next turn of the event loop,
    which serves everything else in between: 10,000 at once held it for half a second."""
    for woken in waiting[start : start + AT_A_TIME]:
        if not woken.done():  # a stream cancelled as it waited
            woken.set_result(None)
    if len(waiting) > start + AT_A_TIME:
        loop.call_soon(wake, loop, waiting, start + AT_A_TIME)


async def events(next_id, place):
    """Yield `retry:`, then one event per tick, until SSE_MAX_AGE has passed."""
    loop = asyncio.get_running_loop()
    # Ends at random, so that streams which began together do not all end, and come
    # back, together again, every SSE_MAX_AGE.
    ends_at = loop.time() + SSE_MAX_AGE * random.uniform(0.5, 1)
    try:
        # Jitter spreads the reconnects of many browsers after a restart.
        yield b"retry: %d\n\n" % random.randint(1000, 3000)
        while True:
            yield b"id: %d\ndata: %b %d\n\n" % (next_id, random.choice(EMOJIS), next_id)
            next_id += 1
            if loop.time() >= ends_at:
                # A clean end: the browser reconnects with Last-Event-ID, maybe to
                # a fresher process, and a dead client costs no more than this.
                logger.info("stream reached SSE_MAX_AGE before id %d", next_id)
                return
            await next_tick()
    except (asyncio.CancelledError, GeneratorExit):
        logger.info("client went away before id %d", next_id)
        raise  # Django cancels us when the client goes; let it finish.
    except Exception:
        # Once streaming, an error can no longer become a 500, and Daphne would
        # leave the client hanging: end the stream, and the browser resumes.
        logger.exception("stream failed before id %d", next_id)
    finally:
        place.free()


@require_GET
async def stream(request):
    request.get_host()  # No middleware checks ALLOWED_HOSTS, so do it here.
    if not places.acquire(blocking=False):
        # EventSource gives up on a 503; the page retries it later by itself.
        return HttpResponse("Too many streams", status=503, headers={"Retry-After": "5"})
    place = Place()  # taken before anything awaits, so the cap holds however many arrive
    # EventSource sends Last-Event-ID when it reconnects; the page passes the
    # last id in the query string when it opens a new EventSource.
    last_id = request.headers.get("Last-Event-ID") or request.GET.get("lastEventId", "")
    next_id = int(last_id) + 1 if LAST_EVENT_ID.fullmatch(last_id) else 0
    return StreamingHttpResponse(
        events(next_id, place),
        content_type="text/event-stream",
        headers={
            "Cache-Control": "no-cache",  # Every event is new; never store one.
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once.
        },
    )


@require_safe
def index(request):
    request.get_host()
    nonce = secrets.token_urlsafe(16)  # Only the page's own script may run.
    csp = (
        f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}';"
        " img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    page = render_to_string("sse.html", {"nonce": nonce}, request)
    return HttpResponse(
        page,
        headers={
            "Content-Security-Policy": csp,
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
        },
    )


urlpatterns = [path("", index), path("stream/", stream)]

django_application = get_asgi_application()


async def application(scope, receive, send):
    """Django, with the stream served outside a per-request thread."""
    if scope["type"] == "http" and scope["path"] == "/stream/":
        # Django runs each request in a ThreadSensitiveContext of its own, where its sync
        # code (signal receivers, response.close) gets a thread that lives as long as the
        # request: for a stream, its whole life. Outside one, asgiref runs that code in a
        # single thread shared by every stream.
        asking = None

        async def receiving():
            nonlocal asking
            asking = asyncio.current_task()  # last of all, the one waiting for a disconnect
            return await receive()

        await django_application.handle(scope, receiving, send)
        # Django 5.2 and 6.0 keep the RequestAborted it raised when the client left, whose
        # traceback holds handle()'s frame: a cycle through the request, the response and
        # the stream that only a full collection frees. Without it, they go as it ends.
        if asking.done() and not asking.cancelled() and (aborted := asking.exception()):
            aborted.__traceback__ = None
    else:
        await django_application(scope, receive, send)


# Garbage collection, for a process that serves thousands of streams ---------------
# This tunes the collector for the whole process, every object in it, as measured
# by `python test_app.py bench`; with few streams open, leave it out.

# Everything imported so far lives as long as the process: leave it out of every
# collection, which then walks only the objects of open streams.
gc.freeze()
# Collecting the young every 8,000 allocations, not 700, lets what an event makes
# die young instead of reaching the old generation, so full collections no longer
# come every few ticks: with streams ending and coming back, late events fell from
# a half to a twentieth, and the CPU per event by 40 %.
gc.set_threshold(8_000)
FREEZE_EVERY = 256  # requests begun
started = ended = frozen_at = collected_at = 0  # requests begun and ended, and when
closed_streams_leave_cycles = True  # until a full collection shows otherwise
counting = threading.Lock()


@receiver(request_finished)
def count_ended(**kwargs):
    global ended
    with counting:  # pages end in threads of their own, streams in the one they share
        ended += 1


@receiver(request_started)
async def freeze_open_streams(**kwargs):
    """A full collection walks the objects of every open stream, stalling them all: 0.7 s
    at 10,000. Frozen, no collection walks them, and an ended stream is freed all the same
    unless it left a cycle. So every FREEZE_EVERY requests, free the garbage among what
    came since and freeze the rest. While closed streams do leave cycles (Django 6.1 on
    Python 3.13.0), once a turnover of the open streams has ended, free theirs too: with
    few open, every FREEZE_EVERY requests, not at each one."""
    global started, frozen_at, collected_at, closed_streams_leave_cycles
    started += 1  # on the event loop, one at a time
    ended_since = ended - collected_at
    turnover = closed_streams_leave_cycles and ended_since > max(started - ended, FREEZE_EVERY)
    if turnover:
        gc.unfreeze()
    elif started - frozen_at < FREEZE_EVERY:
        return
    found = gc.collect()  # of what is not frozen
    if turnover:
        closed_streams_leave_cycles = found > ended_since
        collected_at = ended
    gc.freeze()
    frozen_at = started


if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
