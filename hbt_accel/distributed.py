"""What the processes of a run share: gathers (with and without gradient), the CPU-safe Accelerator factory, CPU
threads and memory, and stop requests every rank agrees on.

Each launch rule guards against a launch that otherwise fails silently on a CPU machine: a wrong world size, or
DeepSpeed quietly off (docs/design.md, "Distributed on a CPU").

Stop requests (preemption): a cluster's preemption signal or Ctrl-C saves a checkpoint instead of losing steps.
SLURM sends SIGTERM (or the signal of `#SBATCH --signal`, submitit's default is USR2) some seconds before SIGKILL.
The handlers here only set a flag. Every rank asks "did any rank get a signal?" with one small all-reduce at each
step boundary and between the encoder batches of periodic evaluation and mining (`StopRequests.check`, which the
evaluation's batch loop calls through `evaluation.encoding.between_batches`), so all ranks stop at the same point,
save ONE complete checkpoint together, and exit with `REQUEUE_EXIT_CODE` (a signal) or `INTERRUPT_EXIT_CODE`
(Ctrl-C). The peers' known mistakes are avoided on purpose: saving on rank 0 alone deadlocks ZeRO-3 and DDP, and a
flag read only between training steps never fires during an evaluation that outlives the grace period.
"""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

# torch 2.13 marks the autograd-aware all_gather deprecated but it is the one that works over gloo here
# (cpu-distributed notes); the warning would fire on every training step.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


def _world_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def all_ranks_agree(accelerator, ok: bool) -> bool:
    """True when `ok` holds on every rank (one all-reduce); every rank must call it at the same point."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (N, ...) from every rank along dim 0 -> (W*N, ...), rank order.

    Gradients flow back to every rank's local tensor: the backward sums, over ranks, the gradient each
    rank's loss sends to this rank's slice. Every rank must pass the same shape. Identity when
    torch.distributed is not initialised or the world size is 1.
    """
    if _world_size() == 1:
        return t
    # The functional all_gather keeps the local slice in the graph; gathering detached copies and
    # re-inserting nothing would give a right loss value with wrong gradients.
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()), dim=0)


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (N, ...) from every rank along dim 0 -> (W*N, ...), detached (no gradient)."""
    if _world_size() == 1:
        return t.detach()
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


# =====================================================================================================================
# CPU threads
# =====================================================================================================================
def choose_cpu_threads(
    env: dict[str, str], launcher_env: dict[str, str] | None, launcher_args: list[str] | None, cores: int
) -> tuple[int | None, str]:
    """(threads to set or None = leave torch's choice, why) for one process.

    `accelerate launch` exports OMP_NUM_THREADS=1 to every process it starts unless told otherwise (it only spreads
    the cores with `--cpu`), so a launched CPU run would use one core. Here a launched process takes cores / (its
    machine's processes) unless the user chose: OMP_NUM_THREADS in the launcher's own environment, or
    `--num_cpu_threads_per_process` on its command line. `launcher_env`/`launcher_args` None = unknown: respected.
    """
    local_processes = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in env
    if not launched_by_accelerate:
        return None, "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in env else "torch's default: all cores"
    if launcher_env is None or launcher_args is None:
        return None, "OMP_NUM_THREADS as launched (the launcher's settings could not be read)"
    if "OMP_NUM_THREADS" in launcher_env:
        return None, "OMP_NUM_THREADS set by the user"
    if any(arg.startswith("--num_cpu_threads_per_process") for arg in launcher_args):
        return None, "--num_cpu_threads_per_process"
    return max(1, cores // local_processes), f"{cores} cores / {local_processes} process(es) on this machine"


ONEDNN_KERNEL_CACHE = 64  # kernels oneDNN keeps (its default, 1,024, grew a training process by ~60 MB a step)


def bound_onednn_kernel_cache() -> None:
    """Cap oneDNN's per-shape kernel cache unless the user set ONEDNN_PRIMITIVE_CACHE_CAPACITY. Each cached kernel
    keeps its reordered weights; with a new packed shape per step (bf16 on CPU) the default cache held GBs after a
    hundred steps. Measured (default recipe, 40 steps, bf16, Intel Xeon with AMX): 5.9 GB and growing by default,
    a flat ~4.0 GB with 64 kernels and packed rows filled to 128 tokens, at the same speed. Must run before the
    process's first oneDNN kernel is built (it is read once, when the cache is created)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_KERNEL_CACHE))


def configure_cpu_threads() -> str:
    """Set torch's intra-op threads for this process (see `choose_cpu_threads`); returns a line for the log."""
    launcher = Path(f"/proc/{os.getppid()}")
    try:
        launcher_env = dict(
            entry.split("=", 1) for entry in launcher.joinpath("environ").read_text().split("\0") if "=" in entry
        )
        launcher_args = launcher.joinpath("cmdline").read_text().split("\0")
    except OSError:  # not Linux, or another user's process
        launcher_env = launcher_args = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads, why = choose_cpu_threads(dict(os.environ), launcher_env, launcher_args, cores)
    if threads is not None:
        torch.set_num_threads(threads)
    return f"{torch.get_num_threads()} CPU threads per process ({why})"


# =====================================================================================================================
# Process memory
# =====================================================================================================================
def process_memory_mb() -> dict:
    """This process's resident memory now (`rss`) and its peak so far (`peak`, VmHWM), in MB, from /proc (Linux);
    {} elsewhere. Not ru_maxrss for the peak: Linux carries that across exec, so a child would report at least its
    parent's peak."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in lines if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss": fields.get("VmRSS", 0.0), "peak": fields.get("VmHWM", 0.0)}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "y", "on"}


def accelerator_state_is_set() -> bool:
    """Whether an Accelerator in this process has fixed accelerate's process-wide settings."""
    from accelerate.state import AcceleratorState

    return bool(AcceleratorState._shared_state)


def forget_accelerator_state() -> None:
    """Clear accelerate's process-wide settings (precision, DeepSpeed plugin, gradient accumulation), which refuse to
    change once set, so that the next Accelerator in this process may choose others; every Accelerator made before
    becomes unusable. The device and process group (`PartialState`) stay. (The reset is accelerate's private one, the
    one its own test cases call between tests; it has no public equivalent.)"""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def make_accelerator(**kwargs):
    """Build an `accelerate.Accelerator` with the CPU launch rules applied, then check the world size.

    - When launched (LOCAL_RANK set) under DeepSpeed, or under DDP with ACCELERATE_USE_CPU=1 or without
      CUDA, add `InitProcessGroupKwargs(backend="gloo")` (else DeepSpeed on CPU reports 1 process per rank).
    - Raise `RuntimeError` when `accelerator.num_processes` differs from $WORLD_SIZE (e.g. `--multi_gpu`
      on CPU without ACCELERATE_USE_CPU=1 starts processes that each think they are alone), or when
      DeepSpeed was requested but is off (ACCELERATE_USE_CPU=1 silently disables it).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    launched = "LOCAL_RANK" in os.environ
    wants_deepspeed = _flag("ACCELERATE_USE_DEEPSPEED") or kwargs.get("deepspeed_plugin") is not None
    cpu_ddp = _flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    if launched and cpu_ddp and not wants_deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # `--multi_gpu` on a machine without CUDA: without this the processes see each other (gloo) but the model
        # is never wrapped in DDP (distributed_type NO), so gradients are silently not averaged.
        os.environ["ACCELERATE_USE_CPU"] = "1"
    handlers = list(kwargs.pop("kwargs_handlers", None) or [])
    has_pg_kwargs = any(isinstance(h, InitProcessGroupKwargs) for h in handlers)
    if launched and (wants_deepspeed or cpu_ddp) and not has_pg_kwargs:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(kwargs_handlers=handlers, **kwargs)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but accelerator.num_processes={accelerator.num_processes}: on CPU launch DDP as "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` (--cpu starts one process)"
        )
    if world_size > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but accelerator.distributed_type=NO: gradients would not be averaged; on CPU "
            "launch with ACCELERATE_USE_CPU=1 and --multi_gpu"
        )
    if wants_deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise RuntimeError(
            f"DeepSpeed was requested but accelerator.distributed_type={accelerator.distributed_type}: "
            "unset ACCELERATE_USE_CPU, which silently turns DeepSpeed off"
        )
    return accelerator


# ====================================================================================================================
# Stop requests: preemption signals and Ctrl-C
# ====================================================================================================================
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
