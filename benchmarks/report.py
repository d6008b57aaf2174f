"""docs/results.md is shared by several benchmark scripts: each owns one marked section and rewrites only that one."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hbt_accel.atomic import write_atomic
from hbt_accel.errors import ConfigError, DataError

TITLE = "# Results: hybrid batch training of multilingual-e5-small on MLQA-R, zero-shot on XQuAD-R"
ORDER = (
    "reproduction",
    "tuning",
    "train_speed",
    "precision_auto",
    "eval_speed",
    "translation_check",
    "lir_probe",
    "weight_averaging",
    "beyond_paper",
)  # where a section goes when the file does not have it yet


def invocation() -> str:
    """How the running benchmark was called (`python benchmarks/<script>.py <arguments>`): a section's first line."""
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def machine_line() -> str:
    """The machine a benchmark's figures come from, for its section: CPU, bf16 flags, threads, GPU, what auto chose."""
    from hbt_accel.models.precision import machine_description

    machine = machine_description()
    flags = ", ".join(machine["cpu_bf16_flags"]) or "no native bf16"
    return (
        f"{machine['cpu']} ({flags}), {machine['torch_threads']} threads, GPU {machine['gpu'] or 'none'}; "
        f"mixed_precision auto here: {machine['auto_training']}"
    )


def run_benchmark(main) -> None:
    """Run a benchmark's `main()`; a bad flag, run folder or data file ends as one line on stderr (exit code 2), as
    the recipes' errors do, instead of a traceback."""
    try:
        main()
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def write_section(path: Path, name: str, body: str) -> None:
    """Replace section `name` of the markdown file at `path` (created if missing) with `body`; atomic."""
    start, end = (
        f"<!-- section:{name} (written by benchmarks/; edits are overwritten) -->",
        f"<!-- /section:{name} -->",
    )
    text = path.read_text() if path.is_file() else TITLE + "\n"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        later = [f"<!-- section:{other} " for other in ORDER[ORDER.index(name) + 1 :]]
        positions = [text.index(marker) for marker in later if marker in text]
        at = min(positions, default=len(text))
        text = text[:at].rstrip("\n") + "\n\n" + block + "\n\n" + text[at:].lstrip("\n")
    write_atomic(path, text.rstrip("\n") + "\n")


def publish(docs_dir: str, name: str, body: list[str]) -> None:
    """Print a section, and write it into DOCS_DIR/results.md unless docs_dir is '' (print only)."""
    print("\n".join(body))
    if docs_dir:
        write_section(Path(docs_dir) / "results.md", name, "\n".join(body))
