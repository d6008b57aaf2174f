"""Stopping cleanly when asked: a cluster's preemption signal or Ctrl-C saves a checkpoint instead of losing steps.

SLURM sends SIGTERM (or the signal of `#SBATCH --signal`, submitit's default is USR2) some seconds before SIGKILL.
The handlers here only set a flag. Every rank asks "did any rank get a signal?" with one small all-reduce at each
step boundary and between the encoder batches of periodic evaluation and mining (`StopRequests.check`, which the
evaluation's batch loop calls through `evaluation.encoding.between_batches`), so all ranks stop at the same point,
save ONE complete checkpoint together, and exit with `REQUEUE_EXIT_CODE` (a signal) or `INTERRUPT_EXIT_CODE`
(Ctrl-C). The peers' known mistakes are avoided on purpose: saving on rank 0 alone deadlocks ZeRO-3 and DDP, and a
flag read only between training steps never fires during an evaluation that outlives the grace period.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "try again"; the sweep and the README's SLURM script requeue on it
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, the shell's code for Ctrl-C
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class StopRequested(Exception):  # noqa: N818 (a request, not an error)
    """Raised on every rank together once any rank has received a stop signal."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.message: str | None = None  # set on the main process once the checkpoint is saved

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT_CODE if self.signal_name == "SIGINT" else REQUEUE_EXIT_CODE

    def describe(self) -> str:
        return "interrupted (Ctrl-C)" if self.signal_name == "SIGINT" else f"stopped by {self.signal_name}"


def check_signal_names(names) -> list[str]:
    """The configured names as signal names a handler can catch; ValueError naming the bad one."""
    for name in names:
        if not hasattr(signal, name) or not name.startswith("SIG") or name.startswith("SIG_") or name in UNCATCHABLE:
            raise ValueError(name)
    return list(names)


UNCATCHABLE = ("SIGKILL", "SIGSTOP")


class StopRequests:
    """Flag-setting handlers for `signal_names` and SIGINT while the context is open; the previous handlers return on
    exit. A second Ctrl-C acts at once (the default handler is back after the first)."""

    def __init__(self, signal_names, device: torch.device | str = "cpu"):
        self.names = [*check_signal_names(signal_names), "SIGINT"]
        self.device = device
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        try:
            for name in self.names:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        except (OSError, ValueError):  # not the main thread, or a signal this platform lacks: leave none behind
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number, frame) -> None:
        self.received = self.received or signal.Signals(number).name
        if number == signal.SIGINT:
            signal.signal(number, signal.default_int_handler)  # a second Ctrl-C stops at once

    def agreed(self) -> str | None:
        """The signal any rank received, or None; every rank must call it at the same point (one all-reduce)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        code = torch.tensor([self._code(self.received)], dtype=torch.int64, device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return self._name(int(code.item()))

    def check(self) -> None:
        """Raise `StopRequested` on every rank once any rank got a signal (also a batch-loop callback)."""
        if (name := self.agreed()) is not None:
            raise StopRequested(name)

    # signals travel between ranks as 1 + their index in `names` (0 = none), so all ranks agree on one name
    def _code(self, name: str | None) -> int:
        return 0 if name is None else 1 + self.names.index(name)

    def _name(self, code: int) -> str | None:
        return None if code == 0 else self.names[code - 1]
