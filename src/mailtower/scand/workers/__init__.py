"""scand as several processes: a supervisor and worker processes sharing one SMTP socket.

Python runs one thread at a time per process, so one scand process uses one core however many
scan threads it has. The supervisor binds the filter port once and starts
``limits.scan_workers`` workers (0: one per CPU), fresh interpreters (``python -m
mailtower.scand --worker …``) that inherit the listening socket: the kernel hands each new
connection to whichever worker accepts it first. Each worker has its own event loop, pipeline
and scan threads (its share of ``limits.scan_concurrency``) and answers the relay exactly as a
single scand does (server.py): 250 only after re-injection or a durable quarantine copy.

The supervisor

- restarts a worker that dies (with a growing delay if it keeps dying);
- forwards SIGHUP (reload) to every worker, and SIGTERM/SIGINT as a graceful stop: each
  worker answers 451 to new messages and finishes those in flight, then exits;
- serves /health (engines, every worker, the oldest rule bundle any worker runs) and /metrics
  (the workers' metrics summed, with prometheus_client's multiprocess mode);
- flushes the shared event spool to SQL.

Workers ask the kernel to kill them when the supervisor dies (PR_SET_PDEATHSIG), so a
``kill -9`` of scand leaves no worker behind holding the port; what they had in flight was not
answered 250, so the relay still has it (nothing is lost).

The modules (the supervisor and the worker never import each other)::

    supervisor.py   the parent: starts and restarts workers, fans out reloads, /health, /metrics
    worker.py       what runs in each worker process; and scand as one process (serve_single)
    protocol.py     what both sides agree on: worker count and share, --worker, status lines

Usage (what ``mailtower-scand`` does)::

    count = workers.worker_count(settings, args.workers)
    if count == 1:
        asyncio.run(workers.serve_single(path, settings, host_address=…, listen=…))
    else:
        workers.supervise(path, settings, host_address=…, listen=…, workers=count, log_level=…)
    # in each worker process (--worker, set by the supervisor):
    workers.worker_main(path, host_address, spec)
"""

from __future__ import annotations

from mailtower.scand.workers.protocol import (
    MULTIPROC_ENV,
    WorkerSpec,
    worker_concurrency,
    worker_count,
)
from mailtower.scand.workers.supervisor import Supervisor, listen_socket, supervise
from mailtower.scand.workers.worker import (
    die_with_parent,
    reload,
    serve_single,
    serve_worker,
    worker_main,
)

__all__ = [
    "MULTIPROC_ENV",
    "Supervisor",
    "WorkerSpec",
    "die_with_parent",
    "listen_socket",
    "reload",
    "serve_single",
    "serve_worker",
    "supervise",
    "worker_concurrency",
    "worker_count",
    "worker_main",
]
