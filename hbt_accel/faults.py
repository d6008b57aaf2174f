"""Fault injection at named points, for the reliability tests: `HBT_FAULT=point:n:action[:rank]`.

The n-th time a process passes `at(point)` (on `rank` only, if given), it gets `action`: a signal sent to itself
(SIGTERM, SIGUSR1, SIGUSR2, SIGINT) or a full disk (ENOSPC, raised as the OSError a real one gives). Points:
`train_step` (between the backward and the optimizer step), `evaluation` (the start of a periodic evaluation),
`evaluation_encode` (after each encoder batch of any evaluation) and `save_checkpoint` (after the optimizer states
are written, before the model). Without HBT_FAULT this is one
environment lookup. The tests drive real runs through these points: a signal or a full disk at an exact place,
which timing from outside cannot give.
"""

from __future__ import annotations

import errno
import os
import signal

_passes: dict[str, int] = {}


def at(point: str) -> None:
    spec = os.environ.get("HBT_FAULT")
    if not spec:
        return
    where, count, action, *rank = spec.split(":")
    if where != point or (rank and rank[0] != os.environ.get("RANK", "0")):
        return
    _passes[point] = _passes.get(point, 0) + 1
    if _passes[point] != int(count):
        return
    if action == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), getattr(signal, action))
