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
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

from readmission.serving.server import ModelServer


def register_fork_hooks(server: ModelServer, *in_child: Callable[[], None]) -> None:
    def before_fork() -> None:
        server.wait_for_loader()
        gc.freeze()

    os.register_at_fork(before=before_fork, after_in_child=server.after_fork_in_child)
    for hook in in_child:
        os.register_at_fork(after_in_child=hook)
