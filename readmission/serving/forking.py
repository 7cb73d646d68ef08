"""Fork hooks of the predict function: gunicorn imports it in its master, then forks workers.

Contract: `register_fork_hooks(server, *in_child)` arranges that, at every fork, the parent
first finishes any model fetch (no lock is held across the fork; the master builds no
onnxruntime session, each worker does: see readmission.serving.server.ModelServer) and then
freezes every object made so far (`gc.freeze`, as Python's gc documentation advises before
forking workers); in the child, the server's `after_fork_in_child` and then each of
`in_child` run. Frozen objects are never written by a worker's collections, so their pages
stay shared with the master (docs/predict.md), and a collection scans only what the worker
made itself. A model holds no reference cycle, so a swapped-out frozen one is still freed
(tests/test_serving.py).

A stop is never lost in a worker's first moments: a forked worker inherits its master's
signal handlers, and a SIGTERM that arrives before the server has installed the worker's own
(Knative scaling down a pod that has just come up) would run the master's handler in the
worker and be dropped; the worker would serve on until the graceful timeout killed it. So, in
the child, a SIGTERM is remembered until the server installs its handler, then sent again.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Callable

from readmission.serving.server import ModelServer


def register_fork_hooks(server: ModelServer, *in_child: Callable[[], None]) -> None:
    def before_fork() -> None:
        server.wait_for_loader()
        gc.freeze()

    os.register_at_fork(after_in_child=_hold_early_stop)  # first: before any other child hook
    os.register_at_fork(before=before_fork, after_in_child=server.after_fork_in_child)
    for hook in in_child:
        os.register_at_fork(after_in_child=hook)


# How long a worker may take to install its own SIGTERM handler before an early stop is given
# up on (the server's graceful timeout then ends the worker, as before).
HANDLER_WAIT_SECONDS = 60.0
_early_stop = threading.Event()


def _remember_stop(_signum: int, _frame: object) -> None:
    _early_stop.set()


def _hold_early_stop() -> None:
    """In a forked child, in the thread that forked: remember a SIGTERM until the server
    replaces this handler, then send it again, to the server's handler."""
    global _early_stop
    _early_stop = threading.Event()  # the parent's may hold a lock taken before the fork
    try:
        signal.signal(signal.SIGTERM, _remember_stop)
    except ValueError:  # forked from another thread than the main one: not a server worker
        return
    threading.Thread(target=_redeliver_early_stop, name="early-stop", daemon=True).start()


def _redeliver_early_stop() -> None:
    deadline = time.monotonic() + HANDLER_WAIT_SECONDS
    while signal.getsignal(signal.SIGTERM) is _remember_stop:
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    # the flag was set, if at all, before the server's handler replaced ours
    if _early_stop.is_set():
        os.kill(os.getpid(), signal.SIGTERM)
