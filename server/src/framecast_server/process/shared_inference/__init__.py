"""One inference process for every front end: frames through shared memory, one batcher.

With ``--workers N --inference shared`` the N worker processes are front ends: gRPC, parsing,
validation, auth and metrics. None owns a backend. Each hands its frames to ONE inference
process, which owns the backend (one engine, one CUDA context) and runs ONE :class:`Batcher`
over the frames of every front end, so batches form from the whole host's load, in the same
fair order (the caller's identity crosses the hand-off), under the same limits and budget.

The modules: ``link.py`` (the shared blocks and the records on the sockets), ``proxy.py``
(the front end's side: :class:`InferenceProxy`, a batcher whose work is done elsewhere),
``service.py`` (the inference process's side: :class:`InferenceService`). The supervision
(starting, restarting and stopping the inference process) is the supervisor's, in workers.py.

The hand-off:

* **Frames.** Each front end has its own shared-memory region (``multiprocessing.shared_memory``,
  made by the supervisor, as large as the memory budget). A request's images are copied once
  into a run of free frame-sized units there (the copy the batcher would otherwise keep in
  memory anyway); the inference process submits a view of that run to its batcher. With
  TensorRT the regions are registered with CUDA at start (``cudaHostRegister``, page-locked in
  place), and the backend's host-to-device copies read each request's frames straight from
  them: no host copy per batch. The results (``n x classes`` float32) travel back on the
  socket, so a request's frames stay as they were until it is answered, and can be sent again
  if the inference process dies.
* **Control.** A Unix socket per front end carries small fixed records: hello, submit (request
  id, offset, shape, deadline, caller), cancel; and back: ready, result (timings and rows),
  error. No pickling; the records of one event-loop iteration leave in one write.
* **Statistics.** The inference process publishes its batch statistics with the queue, so any
  front end answers the model's statistics (OIP ModelStatistics) for the host.
* **Limits.** Admission is decided in the front end, at once, as the servicers expect: against
  the inference process's queue and admitted bytes, which it publishes in a shared block after
  every change, with the batcher's own reserve rule for modest callers (counted per front
  end). Two front ends can both see the last room; the loser's request then waits in the
  inference process for room (``Batcher.wait_for_room``) rather than being refused after it
  was admitted, so a stream never loses a frame to that race and the budget holds exactly.
* **Failures.** A front end that dies: the inference process withdraws its queued requests and
  drops its results; nothing else notices. The inference process dying: every front end
  turns NOT_SERVING (``on_state``), keeps what it had in flight (and admits more, within the
  limits), reconnects when the supervisor has restarted it and sends it all again.

Nothing here imports grpc or prometheus: used by workers.py and app.py.
"""

from __future__ import annotations

from .link import InferenceLink, create_link, unlink_link
from .proxy import InferenceProxy, RemoteBackend
from .service import InferenceService

__all__ = [
    "InferenceLink",
    "InferenceProxy",
    "InferenceService",
    "RemoteBackend",
    "create_link",
    "unlink_link",
]
