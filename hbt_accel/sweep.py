"""Sweeps: a base recipe + axes (any config field, each a list of values) + seeds -> one training run per point.

    python recipes/sweep.py --config recipes/sweeps/data_ratio.yaml --dry_run   # every point and its command
    python recipes/sweep.py --config recipes/sweeps/data_ratio.yaml             # run what is not finished
    python recipes/sweep.py --config recipes/sweeps/data_ratio.yaml --report    # tables, curves, paired tests

A point is finished when its summary `RESULTS/<point>.json` exists (small, committed with the results, so a sweep
resumes on another machine from what is in git); a point whose run folder has checkpoints resumes from the latest;
a point that fails is reported and the sweep goes on. Execution: one point after another as a subprocess
(`executor: local`), or through submitit (`executor: submitit`: Slurm where `srun` exists, else submitit's local
executor), each point one `accelerate launch` job with the sweep's accelerate config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from hbt_accel.atomic import write_json
from hbt_accel.checkpoints import latest_checkpoint
from hbt_accel.config import HbtConfig, load_yaml, parse_config
from hbt_accel.errors import ConfigError
from hbt_accel.evaluation.grid import PER_QUERY_FILE
from hbt_accel.evaluation.schema import summary_of

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "recipes" / "train_hybrid.py"
EXECUTORS = ("local", "submitit")


@dataclass
class SweepSpec:
    """One sweep recipe (recipes/sweeps/*.yaml); every key is checked, like a training recipe's."""

    name: str
    base: str = "recipes/default.yaml"  # the training recipe every point starts from
    overrides: dict = field(default_factory=dict)  # config fields set for every point
    axes: dict = field(default_factory=dict)  # config field -> list of values; the sweep is their product
    points: list = field(default_factory=list)  # or: listed points, each a {field: value} mapping
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    output_dir: str = ""  # run folders; default runs/sweeps/<name>
    results_dir: str = ""  # per-point summaries (committed); default docs/sweeps/<name>
    executor: str = "local"  # local | submitit
    cluster: str = ""  # submitit: "" = Slurm when srun exists, else local; or "slurm", "local"
    accelerate_config: str = ""  # accelerate launch --config_file for every point; empty = accelerate's default
    submitit: dict = field(default_factory=dict)  # AutoExecutor.update_parameters(...), e.g. slurm_partition
    save_steps: int = 30  # checkpoints a killed point resumes from
    compare: list = field(default_factory=list)  # paired tests: [{field: sampling, a: hybrid, b: xy}, ...]

    @property
    def run_root(self) -> Path:
        return Path(self.output_dir or f"runs/sweeps/{self.name}").resolve()

    @property
    def results_root(self) -> Path:
        return Path(self.results_dir or f"docs/sweeps/{self.name}").resolve()


@dataclass(frozen=True)
class SweepPoint:
    settings: tuple  # ((field, value), ...) in axis order, the seed last

    @property
    def name(self) -> str:
        """A folder name from the settings, e.g. `alpha-0.25__seed-1`."""
        parts = [f"{key}-{_text(value)}" for key, value in self.settings]
        return "__".join(part.replace("/", "_").replace(" ", "") for part in parts)

    def as_dict(self) -> dict:
        return dict(self.settings)


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# =====================================================================================================================
# Reading a sweep recipe
# =====================================================================================================================
def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Parse and check a sweep recipe: unknown keys, unknown config fields, bad values fail here, in one line."""
    content = load_yaml(path)
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    for key in content:
        if key not in known:
            raise ConfigError(f"{path}: unknown key '{key}' (expected one of {', '.join(sorted(known))})")
    spec = SweepSpec(**{"name": Path(path).stem, **content})
    if not Path(spec.base).is_file() and (REPO / spec.base).is_file():
        spec.base = str(REPO / spec.base)  # recipes/... works from any folder
    if spec.executor not in EXECUTORS:
        raise ConfigError(f"{path}: executor: got {spec.executor!r}, expected one of {', '.join(EXECUTORS)}")
    if bool(spec.axes) == bool(spec.points):
        given = "both" if spec.axes else "neither"
        raise ConfigError(f"{path}: give either axes (a product) or points (a list), not {given}")
    fields = {f.name for f in dataclasses.fields(HbtConfig)}
    for key in [*spec.axes, *spec.overrides, *(k for point in spec.points for k in point)]:
        if key not in fields:
            raise ConfigError(f"{path}: '{key}' is not a training config field")
    for key, values in spec.axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axes.{key}: expected a non-empty list of values")
    if not spec.seeds or not all(isinstance(seed, int) for seed in spec.seeds):
        raise ConfigError(f"{path}: seeds: expected a non-empty list of integers")
    for point in sweep_points(spec):
        point_config(spec, point)  # every point's config must parse before anything runs
    return spec


def sweep_points(spec: SweepSpec) -> list[SweepPoint]:
    """The product of the axes (or the listed points), each with every seed, the first seed's points first."""
    if spec.axes:
        keys = list(spec.axes)
        combos = [dict(zip(keys, values)) for values in itertools.product(*spec.axes.values())]
    else:
        combos = [dict(point) for point in spec.points]
    # seed-major: a sweep stopped early has every setting once before it has any twice
    return [SweepPoint((*combo.items(), ("seed", seed))) for seed in spec.seeds for combo in combos]


def point_flags(spec: SweepSpec, point: SweepPoint) -> list[str]:
    """The training command's flags for one point: base recipe, sweep overrides, the point's settings."""
    values = {"save_steps": spec.save_steps, **spec.overrides, **point.as_dict()}
    values["output_dir"] = str(spec.run_root / point.name)
    flags = ["--config", spec.base]
    for key, value in values.items():
        flags += [f"--{key}", json.dumps(value) if isinstance(value, dict) else _text(value)]
    return flags


def point_config(spec: SweepSpec, point: SweepPoint) -> HbtConfig:
    try:
        cfg = parse_config(point_flags(spec, point), default_yaml=None)
    except ConfigError as error:
        raise ConfigError(f"sweep {spec.name}, point {point.name}: {error}") from None
    if not (cfg.eval_benchmark and cfg.final_eval):
        raise ConfigError(f"sweep {spec.name}, point {point.name}: a sweep point needs its final evaluation")
    return cfg


def point_command(spec: SweepSpec, point: SweepPoint, resume: bool) -> list[str]:
    launcher = ["accelerate", "launch"]
    if spec.accelerate_config:
        launcher += ["--config_file", spec.accelerate_config]
    flags = point_flags(spec, point) + (["--resume_from_checkpoint", "latest"] if resume else [])
    return [*launcher, str(TRAIN_SCRIPT), *flags]


# =====================================================================================================================
# Running
# =====================================================================================================================
@dataclass
class SweepStatus:
    finished: list = field(default_factory=list)  # point names skipped: their summary exists
    ran: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # point name -> the last lines of its log


def summary_path(spec: SweepSpec, point: SweepPoint) -> Path:
    return spec.results_root / f"{point.name}.json"


def run_sweep(spec: SweepSpec, dry_run: bool = False, echo=print) -> SweepStatus:
    """Run every unfinished point (resuming killed ones); collect each finished point's summary."""
    status = SweepStatus()
    todo = []
    for point in sweep_points(spec):
        if summary_path(spec, point).is_file():
            status.finished.append(point.name)
            continue
        resume = latest_checkpoint(spec.run_root / point.name) is not None
        todo.append((point, point_command(spec, point, resume)))
    echo(f"sweep {spec.name}: {len(status.finished)} finished, {len(todo)} to run")
    for point, command in todo:
        echo(f"{point.name}: {' '.join(command)}")
    if dry_run:
        return status
    runner = _run_with_submitit if spec.executor == "submitit" else _run_locally
    for point, command in todo:
        error = runner(spec, point, command)
        if error is None:
            collect_point(spec, point)
            status.ran.append(point.name)
            echo(f"{point.name}: finished")
        else:
            status.failed[point.name] = error
            echo(f"{point.name}: FAILED\n{error}")
    return status


def _point_env() -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false")


def _run_locally(spec: SweepSpec, point: SweepPoint, command: list[str]) -> str | None:
    """One point as a subprocess; its log goes to RUN/<point>.log. Returns None, or the end of the log on failure."""
    spec.run_root.mkdir(parents=True, exist_ok=True)
    log = spec.run_root / f"{point.name}.log"
    with log.open("a") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=_point_env())
    return None if result.returncode == 0 else _tail(log)


def _run_with_submitit(spec: SweepSpec, point: SweepPoint, command: list[str]) -> str | None:
    """One point as a submitit job (Slurm, or submitit's local executor where there is no Slurm)."""
    import submitit

    executor = submitit.AutoExecutor(folder=spec.run_root / "submitit" / "%j", cluster=spec.cluster or None)
    # submitit's own time limit is short (its local executor kills a job after minutes); a point gets a day unless
    # the sweep says otherwise
    executor.update_parameters(**{"name": f"{spec.name}-{point.name}", "timeout_min": 24 * 60, **spec.submitit})
    job = executor.submit(submitit.helpers.CommandFunction(command, cwd=str(REPO), env=_point_env()))
    try:
        job.result()
    except Exception as error:  # submitit's FailedJobError / UncompletedJobError carry the job's log
        return "\n".join(str(error).strip().splitlines()[-20:])
    return None


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def collect_point(spec: SweepSpec, point: SweepPoint) -> Path:
    """RESULTS/<point>.json (+ .per_query.npz) from the point's run folder: settings, final scores, scores by step."""
    run_dir = spec.run_root / point.name
    train_summary = json.loads((run_dir / "train_summary.json").read_text())
    results = json.loads((run_dir / "eval_results.json").read_text())
    summary = {
        "sweep": spec.name,
        "point": point.name,
        "settings": point.as_dict(),
        "final": {**summary_of(results), "languages": results["languages"]},
        "multi_map_per_language": results["multi_map_per_language"],
        "rank_distance_per_language": results["rank_distance_per_language"],
        "grid": results["grid"],
        "evaluations": train_summary["evaluations"],
        "steps": train_summary["steps"],
        "train_seconds": train_summary["train_seconds"],
        "device": train_summary["device"],
    }
    spec.results_root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / PER_QUERY_FILE, spec.results_root / f"{point.name}.per_query.npz")
    return write_json(summary_path(spec, point), summary)
