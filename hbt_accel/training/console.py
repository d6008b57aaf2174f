"""What a training run shows while it runs: a rich console and progress bar on the main process only."""

from __future__ import annotations


def make_console(accelerator):
    from rich.console import Console

    # soft_wrap: a log line holding a long path stays one line (a log file has no width; rich would fold at 80)
    return Console(quiet=not accelerator.is_main_process, soft_wrap=True)


class TrainingProgressBar:
    """A rich progress bar on the main process: loss, lr, samples/s and how many X-X / X-Y batches so far."""

    def __init__(self, accelerator, total: int, completed: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            disable=not accelerator.is_main_process,
        )
        self.task = self.progress.add_task("train", total=total, completed=completed, info="")
        self.progress.start()

    def update(self, step: int, loss: float, lr: float, throughput: float, counts: dict, log_line: bool) -> None:
        info = f"loss {loss:.4f} lr {lr:.2e} {throughput:.1f} samples/s X-X {counts['X-X']} X-Y {counts['X-Y']}"
        self.progress.update(self.task, completed=step, info=info)
        if log_line and not self.progress.console.is_terminal and not self.progress.disable:
            self.progress.console.print(f"step {step}: {info}")  # a bar is invisible in a log file

    def close(self) -> None:
        self.progress.stop()
