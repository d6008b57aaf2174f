"""Sweeps: a base recipe + axes (any config field, each a list of values) + seeds -> one training run per point.

    python recipes/sweep.py --config recipes/sweeps/data_ratio.yaml --dry_run   # every point and its command
    python recipes/sweep.py --config recipes/sweeps/data_ratio.yaml             # run what is not finished
    python recipes/sweep.py --config recipes/sweeps/data_ratio.yaml --report    # tables, curves, paired tests

Instead of one `base`, a sweep may list several `bases` (recipes/sweeps/backbones.yaml): the base is then the first
setting of every point (`base-labse__sampling-xx__seed-1`, named after the recipe's folder), and each base may bring
its own accelerate config, process count, submitit resources and overrides.

A point is finished when its summary `RESULTS/<point>.json` exists (small, committed with the results, so a sweep
resumes on another machine from what is in git); a point whose run folder has checkpoints resumes from the latest;
a point that fails is reported and the sweep goes on. Execution: one point after another as a subprocess
(`executor: local`), or through submitit (`executor: submitit`: Slurm where `srun` exists, else submitit's local
executor; `max_parallel` jobs at once), each point one `accelerate launch` job with its accelerate config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from hbt_accel.atomic import write_json
from hbt_accel.config import CHECKOUT, RECIPES_DIR, HbtConfig, load_yaml, parse_config
from hbt_accel.errors import ConfigError, DataError
from hbt_accel.evaluation.grid import PER_QUERY_FILE, RESULTS_FILE
from hbt_accel.evaluation.schema import summary_of
from hbt_accel.run_record import SUMMARY_FILE, WEIGHTS_FILE, find_checkpoints, read_summary
from hbt_accel.training.checkpoints import latest_checkpoint

TRAIN_SCRIPT = RECIPES_DIR / "train_hybrid.py"
EXECUTORS = ("local", "submitit")
POLL_SECONDS = 2  # how often a submitit sweep asks whether its jobs have finished
BASE = "base"  # the setting that names a point's base recipe when a sweep has several


@dataclass
class SweepBase:
    """One base recipe of a sweep, with what its points need to run that differs from base to base."""

    recipe: str  # a training recipe, e.g. recipes/labse/hybrid.yaml
    name: str = ""  # the point-name part; default: the recipe's folder name (labse), or its stem under recipes/
    accelerate_config: str = ""  # accelerate launch --config_file for this base; default: the sweep's
    num_processes: int = 0  # accelerate launch --num_processes (GPUs per point); 0 = what the accelerate config says
    submitit: dict = field(default_factory=dict)  # over the sweep's submitit parameters, e.g. gpus_per_node
    overrides: dict = field(default_factory=dict)  # config fields for this base's points, over the sweep's


@dataclass
class SweepSpec:
    """One sweep recipe (recipes/sweeps/*.yaml); every key is checked, like a training recipe's."""

    name: str
    base: str = "recipes/default.yaml"  # the training recipe every point starts from
    bases: list = field(default_factory=list)  # or: several, each a recipe path or a SweepBase mapping
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
    max_parallel: int = 1  # submitit: points queued or running at once (side by side on Slurm); 1 = one at a time
    save_steps: int = 30  # checkpoints a killed point resumes from
    keep_checkpoints: bool = False  # a finished point's checkpoints (~1 GB each here) are deleted; its model stays
    # paired tests: [{field: sampling, a: hybrid, b: xy}, ...]; {a: {..}, b: {..}, b_sweep: recipes/sweeps/X.yaml}
    # takes b from another sweep's committed points (what its overrides change, at the same settings and seeds);
    # without b, b is the same settings as a
    compare: list = field(default_factory=list)
    language_groups: dict = field(default_factory=dict)  # report: group name -> languages, e.g. by resource level

    @property
    def run_root(self) -> Path:
        return Path(self.output_dir or f"runs/sweeps/{self.name}").resolve()

    @property
    def results_root(self) -> Path:
        return Path(self.results_dir or f"docs/sweeps/{self.name}").resolve()

    def base_of(self, point: SweepPoint) -> SweepBase:
        """The point's base: the one named by its `base` setting, or the sweep's single `base`."""
        name = point.as_dict().get(BASE)
        if name is None:
            return SweepBase(recipe=self.base)
        return next(base for base in self.bases if base.name == name)


@dataclass(frozen=True)
class SweepPoint:
    settings: tuple  # ((field, value), ...) in axis order, the seed last

    @property
    def name(self) -> str:
        """A folder name from the settings, e.g. `alpha-0.25__seed-1`."""
        parts = [f"{key}-{setting_text(value)}" for key, value in self.settings]
        return "__".join(part.replace("/", "_").replace(" ", "") for part in parts)

    def as_dict(self) -> dict:
        return dict(self.settings)


def setting_text(value) -> str:
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
    if "base" in content and "bases" in content:
        raise ConfigError(f"{path}: give either base (one recipe) or bases (a list), not both")
    spec = SweepSpec(**{"name": Path(path).stem, **content})
    spec.base = _repo_path(spec.base)
    spec.accelerate_config = _accelerate_config(spec.accelerate_config, f"{path}: accelerate_config")
    spec.bases = _read_bases(path, spec.bases)
    if spec.executor not in EXECUTORS:
        raise ConfigError(f"{path}: executor: got {spec.executor!r}, expected one of {', '.join(EXECUTORS)}")
    if not isinstance(spec.max_parallel, int) or spec.max_parallel < 1:
        raise ConfigError(f"{path}: max_parallel: got {spec.max_parallel!r}, expected a positive integer")
    if not isinstance(spec.keep_checkpoints, bool):  # "no" would read as true and keep ~1 GB per point
        raise ConfigError(f"{path}: keep_checkpoints: got {spec.keep_checkpoints!r}, expected true or false")
    if spec.max_parallel > 1 and spec.executor != "submitit":
        raise ConfigError(f"{path}: max_parallel: {spec.max_parallel} needs executor: submitit")
    if bool(spec.axes) == bool(spec.points):
        given = "both" if spec.axes else "neither"
        raise ConfigError(f"{path}: give either axes (a product) or points (a list), not {given}")
    fields = {f.name for f in dataclasses.fields(HbtConfig)}
    base_overrides = (k for base in spec.bases for k in base.overrides)
    for key in [*spec.axes, *spec.overrides, *base_overrides, *(k for point in spec.points for k in point)]:
        if key not in fields:
            raise ConfigError(f"{path}: '{key}' is not a training config field")
    for key, values in spec.axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axes.{key}: expected a non-empty list of values")
    if not spec.seeds or not all(isinstance(seed, int) for seed in spec.seeds):
        raise ConfigError(f"{path}: seeds: expected a non-empty list of integers")
    if spec.executor == "submitit":
        _check_cluster(path, spec.cluster)
        for point in sweep_points(spec):
            _check_submitit_parameters(path, point_resources(spec, point))
    for point in sweep_points(spec):
        point_config(spec, point)  # every point's config must parse before anything runs
    spec.compare = [_b_defaults_to_a(entry) for entry in spec.compare]
    _check_compare(path, spec)
    if not isinstance(spec.language_groups, dict):
        raise ConfigError(f"{path}: language_groups: expected a mapping of group name -> list of language codes")
    for name, languages in spec.language_groups.items():
        if not isinstance(languages, list) or not languages:
            raise ConfigError(f"{path}: language_groups.{name}: expected a non-empty list of language codes")
    return spec


def _check_compare(path, spec: SweepSpec) -> None:
    """Every comparison names settings the sweep has (b: the other sweep's, with `b_sweep`): a typo would otherwise
    compare nothing, silently."""
    for index, entry in enumerate(spec.compare):
        where = f"{path}: compare[{index}]"
        two_values = isinstance(entry, dict) and set(entry) == {"field", "a", "b"}
        two_points = (
            isinstance(entry, dict)
            and set(entry) - {"b_sweep"} == {"a", "b"}
            and all(isinstance(entry[side], dict) for side in ("a", "b"))
        )
        if not (two_values or two_points):
            raise ConfigError(
                f"{where}: expected {{field, a, b}} (two values of a setting) or {{a: {{..}}, b: {{..}}}} (two "
                "points; b_sweep: optional, another sweep recipe whose points b comes from, at a's settings if b "
                "is left out)"
            )
        for side in ("a", "b"):
            holder = compared_sweep(entry, side, spec, where)
            settings = [{k: v for k, v in point.settings if k != "seed"} for point in sweep_points(holder)]
            if not any(compared_side(entry, s, _sides(entry, side))[0] == side for s in settings):
                wanted = (
                    f"{entry[side]} (every setting but seed and base)"
                    if two_points
                    else f"{entry['field']}: {entry[side]}"
                )
                raise ConfigError(f"{where}: {side}: no point of the sweep {holder.name} has {wanted}")


def _b_defaults_to_a(entry):
    """{a: {..}, b_sweep: X}: the same settings in sweep X."""
    if isinstance(entry, dict) and "b_sweep" in entry and "b" not in entry:
        return {**entry, "b": entry.get("a")}
    return entry


def _sides(comparison: dict, side: str) -> tuple:
    return (side,) if "b_sweep" in comparison else ("a", "b")


def compared_sweep(comparison: dict, side: str, spec: SweepSpec, where: str = "compare") -> SweepSpec:
    """The sweep whose points are the comparison's `side`: this one, or for b the `b_sweep` recipe."""
    if side == "a" or "b_sweep" not in comparison:
        return spec
    recipe = _repo_path(str(comparison["b_sweep"]))
    if not Path(recipe).is_file():
        raise ConfigError(f"{where}: b_sweep: file not found: {comparison['b_sweep']} (expected a sweep recipe)")
    return load_sweep(recipe)


def compared_side(comparison: dict, settings: dict, sides: tuple = ("a", "b")) -> tuple[str | None, tuple]:
    """(the side of a `compare` entry a point is on: "a", "b" or None; what the two sides are paired at). `sides`:
    the ones the point can be on (with `b_sweep`, a point of this sweep is never b, nor one of the other a).

    {field, a, b}: the point's value of the field; paired at its other settings. {a: {..}, b: {..}}: the point's
    settings but seed and base; paired at the base (a sweep over several bases compares within each). Values compare
    as JSON, as in the point names: 1, 1.0 and true differ."""
    settings = {k: v for k, v in settings.items() if k != "seed"}
    if "field" in comparison:
        key = comparison["field"]
        own, at = settings.get(key), {k: v for k, v in settings.items() if k != key}
        targets = {side: comparison[side] for side in sides} if key in settings else {}
    else:
        own, at = {k: v for k, v in settings.items() if k != BASE}, {k: v for k, v in settings.items() if k == BASE}
        targets = {side: comparison[side] for side in sides}
    side = next((s for s, target in targets.items() if _as_json(own) == _as_json(target)), None)
    return side, tuple((k, json.dumps(v)) for k, v in at.items())


def _as_json(value) -> str:
    return json.dumps(value, sort_keys=True)


def _repo_path(path: str) -> str:
    """recipes/... (shipped in the package) and accelerate_configs/... (the checkout's) work from any folder."""
    if not path or Path(path).is_file():
        return path
    shipped = RECIPES_DIR / path.removeprefix("recipes/") if path.startswith("recipes/") else CHECKOUT / path
    return str(shipped) if shipped.is_file() else path


def _accelerate_config(path: str, where: str) -> str:
    if path and not Path(_repo_path(path)).is_file():
        raise ConfigError(f"{where}: file not found: {path}")
    return _repo_path(path)


def _read_bases(path, entries: list) -> list[SweepBase]:
    """`bases:` entries (a recipe path, or a mapping of SweepBase fields) -> SweepBase, checked, names unique."""
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: bases: expected a list of recipes")
    known = [f.name for f in dataclasses.fields(SweepBase)]
    bases = []
    for index, entry in enumerate(entries):
        where = f"{path}: bases[{index}]"
        entry = {"recipe": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "recipe" not in entry:
            raise ConfigError(f"{where}: expected a recipe path or a mapping with a recipe")
        for key in entry:
            if key not in known:
                raise ConfigError(f"{where}: unknown key '{key}' (expected one of {', '.join(known)})")
        base = SweepBase(**entry)
        for key in ("submitit", "overrides"):
            if not isinstance(getattr(base, key), dict):
                raise ConfigError(f"{where}: {key}: expected a mapping, got {getattr(base, key)!r}")
        recipe = Path(base.recipe)
        base.name = base.name or (recipe.stem if recipe.parent.name in ("", "recipes") else recipe.parent.name)
        base.recipe = _repo_path(base.recipe)
        base.accelerate_config = _accelerate_config(base.accelerate_config, f"{where}: accelerate_config")
        if not isinstance(base.num_processes, int) or base.num_processes < 0:
            expected = "0 (as the accelerate config says) or a process count"
            raise ConfigError(f"{where}: num_processes: got {base.num_processes!r}, expected {expected}")
        gpus = base.submitit.get("gpus_per_node")
        if base.num_processes and gpus and base.submitit.get("nodes", 1) == 1 and gpus != base.num_processes:
            raise ConfigError(
                f"{where}: num_processes {base.num_processes} but submitit gpus_per_node {gpus!r}: one process per GPU"
            )
        if base.name in [b.name for b in bases]:
            raise ConfigError(f"{where}: a second base named '{base.name}'; give each a distinct name")
        bases.append(base)
    return bases


def _check_cluster(path, cluster: str) -> None:
    from submitit.core import plugins

    known = sorted(plugins.get_executors())
    if cluster and cluster not in known:
        expected = f"'' (Slurm where srun exists, else local) or one of {', '.join(known)}"
        raise ConfigError(f"{path}: cluster: got {cluster!r}, expected {expected}")


def _check_submitit_parameters(path, parameters: dict) -> None:
    """Unknown or mistyped submitit parameters fail at load (and in a dry run), not at the first submission."""
    import submitit

    with tempfile.TemporaryDirectory() as folder:
        try:  # the debug executor checks every cluster's parameter names without needing that cluster
            submitit.AutoExecutor(folder=folder, cluster="debug").update_parameters(**parameters)
        except (NameError, AssertionError, TypeError) as error:
            raise ConfigError(f"{path}: submitit: {str(error).strip().splitlines()[0]}") from None


def sweep_points(spec: SweepSpec) -> list[SweepPoint]:
    """The bases times the product of the axes (or the listed points), each with every seed, the first seed's
    points first."""
    if spec.axes:
        keys = list(spec.axes)
        combos = [dict(zip(keys, values)) for values in itertools.product(*spec.axes.values())]
    else:
        combos = [dict(point) for point in spec.points]
    if spec.bases:
        combos = [{BASE: base.name, **combo} for base in spec.bases for combo in combos]
    # seed-major: a sweep stopped early has every setting once before it has any twice
    return [SweepPoint((*combo.items(), ("seed", seed))) for seed in spec.seeds for combo in combos]


def point_flags(spec: SweepSpec, point: SweepPoint) -> list[str]:
    """The training command's flags for one point: base recipe, sweep overrides, the base's, the point's settings."""
    base = spec.base_of(point)
    settings = {key: value for key, value in point.as_dict().items() if key != BASE}
    values = {"save_steps": spec.save_steps, **spec.overrides, **base.overrides, **settings}
    values["output_dir"] = str(spec.run_root / point.name)
    flags = ["--config", base.recipe]
    for key, value in values.items():
        flags += [f"--{key}", json.dumps(value) if isinstance(value, dict) else setting_text(value)]
    return flags


def point_config(spec: SweepSpec, point: SweepPoint) -> HbtConfig:
    try:
        cfg = parse_config(point_flags(spec, point), default_yaml=None)
    except ConfigError as error:
        raise ConfigError(f"sweep {spec.name}, point {point.name}: {error}") from None
    if not (cfg.eval_benchmark and cfg.final_eval):
        raise ConfigError(f"sweep {spec.name}, point {point.name}: a sweep point needs its final evaluation")
    return cfg


def point_command(spec: SweepSpec, point: SweepPoint, going_on: list[str] | tuple = ()) -> list[str]:
    """`accelerate launch [--config_file C] [--num_processes N] recipes/train_hybrid.py --config RECIPE ...`, then
    `going_on` (`unfinished_run_flags`) for a point that started before."""
    base = spec.base_of(point)
    launcher = ["accelerate", "launch"]
    if base.accelerate_config or spec.accelerate_config:
        launcher += ["--config_file", base.accelerate_config or spec.accelerate_config]
    if base.num_processes:
        launcher += ["--num_processes", str(base.num_processes)]
    return [*launcher, str(TRAIN_SCRIPT), *point_flags(spec, point), *going_on]


def unfinished_run_flags(run_dir: Path, resume: str = "latest") -> list[str]:
    """How a point that started and did not finish goes on: from its newest complete checkpoint; or, with none to
    resume from, trained again over what it left, which training would otherwise refuse to touch (a point killed in
    its final evaluation has saved its final model, and the last step keeps no checkpoint)."""
    if latest_checkpoint(run_dir) is not None:
        return ["--resume_from_checkpoint", resume]
    leftovers = (run_dir / WEIGHTS_FILE).is_file() or find_checkpoints(run_dir)
    if leftovers and not (run_dir / SUMMARY_FILE).is_file():
        return ["--overwrite_output_dir", "true"]
    # a requeued point keeps `auto`: a checkpoint its stopped run finishes saving before the job starts still counts
    return ["--resume_from_checkpoint", resume] if resume == "auto" else []


def point_resources(spec: SweepSpec, point: SweepPoint) -> dict:
    """The point's `AutoExecutor.update_parameters(...)`: job name, a day's time limit unless said otherwise
    (submitit's own default is minutes), the sweep's submitit parameters, then its base's."""
    return {
        "name": f"{spec.name}-{point.name}",
        "timeout_min": 24 * 60,
        **spec.submitit,
        **spec.base_of(point).submitit,
    }


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


def read_point_summary(path: Path) -> dict:
    """A finished point's summary; a damaged one (a killed copy, a bad merge) is a one-line error naming it."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = getattr(error, "msg", "not UTF-8 text")
        raise DataError(f"{path}: damaged point summary ({reason}); delete it to run that point again") from None
    if not isinstance(summary, dict):
        raise DataError(f"{path}: damaged point summary (not a JSON object); delete it to run that point again")
    return summary


def _check_summaries(spec: SweepSpec) -> None:
    for point in sweep_points(spec):
        if summary_path(spec, point).is_file():
            read_point_summary(summary_path(spec, point))


def run_sweep(spec: SweepSpec, dry_run: bool = False, echo=print) -> SweepStatus:
    """Run every unfinished point (resuming killed ones); collect each finished point's summary. A dry run lists
    every point with its command, the finished ones marked."""
    _check_summaries(spec)  # before anything runs: a damaged summary would otherwise count as finished
    status = SweepStatus()
    todo, plan = [], []
    for point in sweep_points(spec):
        if summary_path(spec, point).is_file():
            status.finished.append(point.name)
        elif ran_to_the_end(spec.run_root / point.name):  # its collection failed or was killed: collect, not rerun
            if not dry_run:
                collect_point(spec, point)
            status.finished.append(point.name)
        else:
            todo.append((point, point_command(spec, point, unfinished_run_flags(spec.run_root / point.name))))
            plan.append((False, _point_line(spec, point, todo[-1][1], "")))
            continue
        plan.append((True, _point_line(spec, point, point_command(spec, point), " (finished, skipped)")))
    echo(f"sweep {spec.name}: {len(status.finished)} finished, {len(todo)} to run")
    if todo and spec.executor == "submitit":
        cluster = spec.cluster or "slurm where srun exists, else local"
        echo(f"each point one submitit job, cluster: {cluster}, up to {spec.max_parallel} at once")
    for finished, line in plan:
        if dry_run or not finished:
            echo(line)
    if dry_run:
        return status
    for point, error in _execute(spec, todo):
        if error is None:
            collect_point(spec, point)
            status.ran.append(point.name)
            echo(f"{point.name}: finished")
        else:
            status.failed[point.name] = error
            echo(f"{point.name}: FAILED\n{error}")
    return status


def _point_line(spec: SweepSpec, point: SweepPoint, command: list[str], mark: str) -> str:
    line = f"{point.name}{mark}: {shlex.join(command)}"
    if spec.executor == "submitit":
        line += "\n    submitit: " + ", ".join(f"{k}={v}" for k, v in point_resources(spec, point).items())
    return line


def _point_env() -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false")


def _run_locally(spec: SweepSpec, point: SweepPoint, command: list[str]) -> str | None:
    """One point as a subprocess; its log goes to RUN/<point>.log. Returns None, or the end of the log on failure."""
    spec.run_root.mkdir(parents=True, exist_ok=True)
    log = spec.run_root / f"{point.name}.log"
    with log.open("a") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=CHECKOUT, env=_point_env())
    return None if result.returncode == 0 else _tail(log)


def _execute(spec: SweepSpec, todo: list[tuple[SweepPoint, list[str]]]):
    """Yield (point, None or the end of its log) as each point finishes: locally one after another; through submitit
    with up to `max_parallel` jobs queued or running at once, the next submitted as one finishes."""
    if spec.executor != "submitit":
        for point, command in todo:
            yield point, _run_locally(spec, point, command)
        return
    waiting, running = list(todo), []
    while waiting or running:
        while waiting and len(running) < spec.max_parallel:
            point, command = waiting.pop(0)
            running.append((point, _submit(spec, point, command)))
        states = [(point, job, job.done()) for point, job in running]
        running = [(point, job) for point, job, done in states if not done]
        if len(running) == len(states):
            time.sleep(POLL_SECONDS)
        for point, job, done in states:
            if done:
                yield point, _job_error(job)


def _submit(spec: SweepSpec, point: SweepPoint, command: list[str]):
    """One point as a submitit job (Slurm, or submitit's local executor where there is no Slurm)."""
    executor = submitit.AutoExecutor(folder=spec.run_root / "submitit" / "%j", cluster=spec.cluster or None)
    executor.update_parameters(**point_resources(spec, point))
    log = spec.run_root / f"{point.name}.log"
    return executor.submit(RequeueablePoint(command, str(CHECKOUT), _point_env(), str(log)))


class RequeueablePoint(submitit.helpers.Checkpointable):
    """A sweep point as a submitit job that submitit requeues when Slurm preempts it or its time runs out. On Slurm's
    signal (USR2 by default) submitit calls `checkpoint`, which first asks the training ranks to stop (SIGTERM to the
    launcher's descendants: training saves a checkpoint, hbt_accel.distributed) and waits up to `GRACE_SECONDS`,
    then resubmits the command with `--resume_from_checkpoint auto`, so the point goes on by itself. The command's
    output goes to the point's log file, never to a pipe that submitit's exit would close under it."""

    GRACE_SECONDS = 90

    def __init__(self, command: list[str], cwd: str, env: dict, log: str = ""):
        self.command, self.cwd, self.env, self.log = command, cwd, env, log
        self._process = None

    def __getstate__(self) -> dict:  # what submitit pickles: never the running process
        return {**self.__dict__, "_process": None}

    def __call__(self) -> str:
        with open(self.log or os.devnull, "a") as output:
            self._process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=output,
                                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            code = self._process.wait()
        if code != 0:
            tail = _tail(Path(self.log)) if self.log else ""
            raise RuntimeError(f"exit code {code}: {shlex.join(self.command)}; log: {self.log}\n{tail}")
        return self.log

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        if self._process is not None and self._process.poll() is None:
            for process in _training_processes(self._process.pid):
                process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=self.GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass  # Slurm's kill comes next; the newest complete checkpoint is what resumes
        command = _without_going_on(self.command)
        command += unfinished_run_flags(Path(command[command.index("--output_dir") + 1]), resume="auto")
        return submitit.helpers.DelayedSubmission(RequeueablePoint(command, self.cwd, self.env, self.log))


def _without_going_on(command: list[str]) -> list[str]:
    """The point's own command, without the flags an earlier attempt added to go on from where it stopped."""
    kept = list(command)
    for flag in ("--resume_from_checkpoint", "--overwrite_output_dir"):
        if flag in kept:
            del kept[kept.index(flag) : kept.index(flag) + 2]
    return kept


def _training_processes(pid: int) -> list:
    """The processes to ask to stop: the launcher's descendants (the training ranks, which save on SIGTERM), or the
    command itself when it launches nothing. Not the launcher: accelerate's kills its child 5 s after a SIGTERM,
    torchrun 30 s after, too soon for a checkpoint; a launcher whose ranks exit on their own just returns."""
    import psutil

    try:
        command = psutil.Process(pid)
        return command.children(recursive=True) or [command]
    except psutil.NoSuchProcess:
        return []


def _job_error(job) -> str | None:
    try:
        job.result()
    except Exception as error:  # submitit's FailedJobError / UncompletedJobError carry the job's log
        return "\n".join(str(error).strip().splitlines()[-20:])
    return None


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def ran_to_the_end(run_dir: Path) -> bool:
    """The run wrote what `collect_point` reads; training writes its summary after the evaluation files."""
    return all((run_dir / name).is_file() for name in (RESULTS_FILE, PER_QUERY_FILE, SUMMARY_FILE))


def collect_point(spec: SweepSpec, point: SweepPoint) -> Path:
    """RESULTS/<point>.json (+ .per_query.npz) from the point's run folder: settings, final scores, scores by step.
    Then the point's checkpoints go, unless the sweep keeps them: they only serve a resume, and a 36-point sweep of
    the default recipe would otherwise leave ~70 GB behind."""
    run_dir = spec.run_root / point.name
    train_summary = read_summary(run_dir)
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    spec.results_root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / PER_QUERY_FILE, spec.results_root / f"{point.name}.per_query.npz")
    summary = write_json(summary_path(spec, point), point_summary(spec, point, train_summary, results))
    if not spec.keep_checkpoints:
        for checkpoint in find_checkpoints(run_dir):
            shutil.rmtree(checkpoint)
    return summary


def _loss_point(history_entry: dict) -> dict:
    """A logged step's loss, with the number of steps it averages (runs before the windowed loss logged one step)."""
    kept = ("step", "loss", "steps_in_loss")
    return {key: history_entry[key] for key in kept if key in history_entry}


def point_summary(spec: SweepSpec, point: SweepPoint, train_summary: dict, results: dict) -> dict:
    """A point's committed summary from its train_summary.json and eval_results.json contents."""
    return {
        "sweep": spec.name,
        "point": point.name,
        "settings": point.as_dict(),
        "final": {**summary_of(results), "languages": results["languages"]},
        "multi_map_per_language": results["multi_map_per_language"],
        "rank_distance_per_language": results["rank_distance_per_language"],
        "grid": results["grid"],
        "evaluations": train_summary["evaluations"],
        "loss_curve": [_loss_point(entry) for entry in train_summary.get("history", [])],
        "steps": train_summary["steps"],
        "train_seconds": train_summary["train_seconds"],
        "device": train_summary["device"],
        "precision": train_summary.get("precision", {}),  # absent from summaries of runs before it was recorded
        "parameters": train_summary.get("parameters", {}),  # absent from summaries of runs before it was recorded
        "code": train_summary.get("code", ""),  # version and commit (runs since 2026-12-04; older: git log the file)
        # what each corpus trained on after train_languages / train_id_fraction / train_pairs (newer runs only)
        "trained_on": [
            {"name": c["name"], **c["trained_on"]} for c in train_summary.get("corpora", []) if "trained_on" in c
        ],
    }
