"""Which precision a run computes in, chosen from what the device does rather than from one machine's timings.

`mixed_precision: auto` (training) and `eval_precision: auto` (evaluation and mining) ask `choose_precision`:
- a CUDA GPU with bf16 (Ampere and later): bf16; one without (V100, T4): fp16 with a gradient scaler for training;
- a CPU with native bf16 instructions (`avx512_bf16` or `amx_bf16` on x86, `bf16` on Arm) AND a probe where bf16
  matrix products of the model's shapes beat fp32 by `PROBE_MARGIN`: bf16;
- anything else: fp32. Without native bf16 a CPU emulates it: the default recipe trained 3.0x and evaluated 3.9x
  slower in bf16 than in fp32 on such a Xeon.
The margin exists because autocast adds casts and leaves non-matrix work in fp32: a matrix product barely faster in
bf16 makes a training step slower. An explicit `bf16` / `fp16` / `no` is respected; a choice the device cannot run
(fp16 on a CPU, bf16 on a GPU without it) is an error before any work.

The choice is a pure function of a `DeviceCapabilities` (tested with the inputs of each kind of machine); the
probe's result is cached per machine (CPU model, flags, torch version, threads) under $XDG_CACHE_HOME/hbt_accel.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from hbt_accel.atomic import write_atomic
from hbt_accel.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "no")
EVAL_PRECISIONS = ("auto", "bf16", "no")  # encoding needs no loss scaler: fp16 GPUs encode in fp32
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # /proc/cpuinfo: x86 "flags", Arm "Features"
PROBE_MARGIN = 1.3  # bf16 matrix products must be this much faster than fp32 for bf16 to win a whole step
CPUINFO = Path("/proc/cpuinfo")
PROBE_SHAPES = ((2048, 384, 1536), (2048, 1536, 384))  # (tokens, in, out): e5-small's feed-forward, ~6k tokens/step


@dataclass(frozen=True)
class DeviceCapabilities:
    """What the precision choice depends on. `bf16_speedup`: fp32 time / bf16 time of the probe, None = not run."""

    device: str  # "cpu" or "cuda"
    name: str  # the CPU model or the GPU's name
    cpu_flags: frozenset = frozenset()
    cuda_bf16: bool = False
    bf16_speedup: float | None = None

    @property
    def native_bf16(self) -> list[str]:
        return [flag for flag in NATIVE_BF16_FLAGS if flag in self.cpu_flags]


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "bf16", "fp16" or "no" (accelerate's names)
    reason: str  # one line for the log: what was chosen and why

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def label(self) -> str:
        """The name a report prints: "bf16", "fp16" or "fp32"."""
        return "fp32" if self.precision == "no" else self.precision


def choose_precision(requested: str, caps: DeviceCapabilities, flag: str = "mixed_precision") -> PrecisionChoice:
    """The precision to run in. Raises ConfigError for a choice the device cannot run."""
    if requested not in PRECISIONS:
        raise ConfigError(f"{flag}: got {requested!r}, expected one of {', '.join(PRECISIONS)}")
    if caps.device == "cuda":
        return _cuda_choice(requested, caps, flag)
    if requested == "fp16":
        raise ConfigError(f"{flag}: fp16 needs a CUDA GPU and this run is on {caps.name}; use auto, bf16 or no")
    if requested == "no":
        return PrecisionChoice("no", "fp32, as asked")
    fast = _cpu_bf16_is_fast(caps)
    if requested == "bf16":
        warning = "" if fast else f" (warning: {_cpu_bf16_verdict(caps)}; auto would choose fp32 here)"
        return PrecisionChoice("bf16", "bf16, as asked" + warning)
    if fast:
        return PrecisionChoice(
            "bf16", f"bf16: {', '.join(caps.native_bf16)} present, probe {caps.bf16_speedup:.1f}x fp32"
        )
    return PrecisionChoice("no", f"fp32: {_cpu_bf16_verdict(caps)}")


def _cuda_choice(requested: str, caps: DeviceCapabilities, flag: str) -> PrecisionChoice:
    if requested == "bf16" and not caps.cuda_bf16:
        raise ConfigError(f"{flag}: bf16 is not supported by {caps.name}; use auto (fp16 with a scaler) or no")
    if requested != "auto":
        return PrecisionChoice(requested, f"{'fp32' if requested == 'no' else requested}, as asked")
    if caps.cuda_bf16:
        return PrecisionChoice("bf16", f"bf16: {caps.name} computes bf16 natively")
    return PrecisionChoice("fp16", f"fp16 with a gradient scaler: {caps.name} has no bf16")


def _cpu_bf16_is_fast(caps: DeviceCapabilities) -> bool:
    return bool(caps.native_bf16) and caps.bf16_speedup is not None and caps.bf16_speedup >= PROBE_MARGIN


def _cpu_bf16_verdict(caps: DeviceCapabilities) -> str:
    if not caps.native_bf16:
        return f"this CPU has no native bf16 (no {' / '.join(NATIVE_BF16_FLAGS[:2])} flag)"
    if caps.bf16_speedup is None:
        return f"{', '.join(caps.native_bf16)} present but the speed probe did not run"
    return f"{', '.join(caps.native_bf16)} present but the probe gives bf16 {caps.bf16_speedup:.1f}x fp32"


def eval_choice(requested: str, caps: DeviceCapabilities) -> PrecisionChoice:
    """Evaluation encodes in bf16 or fp32 only (no scaler needed without a backward): fp16 GPUs encode in fp32."""
    if requested == "fp16":
        raise ConfigError("eval_precision: got 'fp16', expected auto, bf16 or no")
    choice = choose_precision(requested, caps, "eval_precision")
    if choice.precision == "fp16":
        return PrecisionChoice("no", f"fp32: {caps.name} has no bf16")
    return choice


EVAL_PRECISION_HELP = (
    "encode under bf16 autocast (scores stay fp32) or in fp32 ('no'); auto = bf16 where the device computes it "
    "natively and faster, else fp32"
)


def evaluation_precision(requested: str) -> PrecisionChoice:
    """`eval_choice` on this device, for a script that only encodes; bf16's speed is probed only when it may be
    chosen."""
    return eval_choice(requested, device_capabilities(probe=requested != "no"))


# ----------------------------------------------------------------------------------------------------------------
# The machine at hand
# ----------------------------------------------------------------------------------------------------------------
def uses_cuda() -> bool:
    """Whether this process computes on a CUDA GPU (`accelerate launch --cpu` sets ACCELERATE_USE_CPU)."""
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in {"1", "true", "yes"}
    return torch.cuda.is_available() and not forced_cpu


def cpu_description() -> tuple[str, frozenset]:
    """(CPU model name, its flags) from /proc/cpuinfo; ("unknown CPU", {}) where there is none."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return "unknown CPU", frozenset()
    name, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name") and name == "unknown CPU":
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name, frozenset(flags)


def device_capabilities(probe: bool = True) -> DeviceCapabilities:
    """This process's device; on a CPU with native bf16 flags the probe runs (or is read from the cache)."""
    if uses_cuda():
        index = torch.cuda.current_device()
        # including_emulation=False: torch otherwise says True on a V100 / T4, which only emulate bf16 (slowly)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return DeviceCapabilities("cuda", torch.cuda.get_device_name(index), cuda_bf16=native)
    name, flags = cpu_description()
    caps = DeviceCapabilities("cpu", name, flags)
    if probe and caps.native_bf16:
        caps = DeviceCapabilities("cpu", name, flags, bf16_speedup=cached_bf16_speedup(name, flags))
    return caps


def measure_bf16_speedup(repeats: int = 3) -> float:
    """fp32 time / bf16 time of the matrix products of `PROBE_SHAPES` (~0.1-0.5 s on 2 cores)."""

    def best_seconds(dtype: torch.dtype) -> float:
        operands = [(torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)) for n, k, m in PROBE_SHAPES]
        for a, b in operands:  # warm-up: kernels chosen, pages touched
            a @ b
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for a, b in operands:
                a @ b
            best = min(best, time.perf_counter() - started)
        return best

    generator_state = torch.random.get_rng_state()  # the probe must not move a run's seeded random stream
    try:
        return best_seconds(torch.float32) / best_seconds(torch.bfloat16)
    finally:
        torch.random.set_rng_state(generator_state)


def probe_cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "hbt_accel" / "bf16_probe.json"


def cached_bf16_speedup(name: str, flags: frozenset) -> float:
    """The probe's result for this machine, measured once and kept (a cache that cannot be read is measured again)."""
    key = f"{name} | {','.join(sorted(f for f in flags if f in NATIVE_BF16_FLAGS))} | torch {torch.__version__} | "
    key += f"{torch.get_num_threads()} threads"
    path = probe_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{path}.lock")
        lock.acquire(timeout=60)  # the processes of one machine measure once and read the same answer
    except (OSError, Timeout):  # a read-only or stuck cache folder: measure here, keep nothing
        return round(measure_bf16_speedup(), 3)
    try:
        cache = _read_cache(path)
        if not isinstance(cache.get(key), (int, float)):
            cache[key] = round(measure_bf16_speedup(), 3)
            write_atomic(path, json.dumps(cache, indent=1))
        return float(cache[key])
    finally:
        lock.release()


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def machine_description() -> dict:
    """What a benchmark records beside its timings: the CPU, its native-bf16 flags, the GPU if any, and what
    `auto` chooses here for training and evaluation (with the reason)."""
    caps = device_capabilities()
    cpu, flags = cpu_description()
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cpu_bf16_flags": sorted(flag for flag in flags if flag in NATIVE_BF16_FLAGS),
        "gpu": caps.name if caps.device == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "bf16_probe_speedup": caps.bf16_speedup,
        "auto_training": choose_precision("auto", caps).reason,
        "auto_evaluation": eval_choice("auto", caps).reason,
    }
