"""The worker process: one model's engine behind the pool's frames on stdin and stdout.

Run as ``python -m local_models.worker``; the pool speaks :mod:`local_models.protocol` frames
on the child's stdin and stdout (the real stdout; file descriptor 1 is pointed at stderr so
nothing llama.cpp prints can corrupt the protocol).

Contract:

* The first frame is :class:`~local_models.protocol.Load`: the worker answers
  :class:`~local_models.protocol.Loaded` (then serves) or
  :class:`~local_models.protocol.LoadFailed` (then exits 1); any other first frame exits 2.
* The main thread owns the :class:`~local_models.engine.Engine` (every llama.cpp call); a
  reader thread only decodes frames into a queue. Answers are written whole, one batch of
  frames at a time.
* The worker exits when its stdin closes (or a frame is broken) or on
  :class:`~local_models.protocol.Shutdown`.
"""

from __future__ import annotations

import os
import queue
import sys
import threading

import msgspec

from local_models import protocol as p
from local_models.engine import Engine, LoadError


def _read_exact(fd: int, size: int) -> bytes | None:
    """Exactly ``size`` bytes from ``fd``; None at the end of the file."""
    parts: list[bytes] = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            return None
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _read_frames(fd: int, inbox: queue.SimpleQueue[p.ToWorker | None]) -> None:
    """Decode frames from ``fd`` into ``inbox``; None marks the end (or a broken frame)."""
    try:
        while (header := _read_exact(fd, p.HEADER.size)) is not None:
            (size,) = p.HEADER.unpack(header)
            body = _read_exact(fd, size) if size <= p.MAX_FRAME else None
            if body is None:
                break
            inbox.put(p.to_worker_decoder.decode(body))
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        pass
    finally:
        inbox.put(None)


def main() -> int:
    """Serve one model on stdin/stdout; the exit status: 0 after Shutdown or the end of
    stdin, 1 when the model failed to load, 2 when the first frame was not Load."""
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed to stdout by native code goes to stderr instead
    out = os.fdopen(out_fd, "wb", buffering=0)
    lock = threading.Lock()

    def send_all(messages: list[p.FromWorker]) -> None:
        data = b"".join(p.frame(m) for m in messages)
        with lock:
            out.write(data)

    inbox: queue.SimpleQueue[p.ToWorker | None] = queue.SimpleQueue()
    threading.Thread(target=_read_frames, args=(0, inbox), daemon=True).start()
    first = inbox.get()
    if not isinstance(first, p.Load):
        return 2
    try:
        engine = Engine(first)
    except LoadError as e:
        send_all([p.LoadFailed(str(e))])
        return 1
    send_all([p.Loaded(engine.n_ctx_seq, engine.n_parallel, engine.n_gpu_layers,
                       engine.gpu_offload, engine.n_vocab, engine.n_embd)])
    engine.run(inbox, send_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
