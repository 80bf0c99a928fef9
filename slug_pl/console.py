"""What ``slug-pl`` prints: real warnings as one line each, no Lightning notices that do not apply
to a gradient pass, and a resume hint when a run is interrupted.

Everything here is scoped to one command (:class:`Console` undoes its filters on exit), so
importing slug_pl as a library changes no warning or logging setting.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from slug_pl.errors import one_line

#: Lightning warnings that never apply to a slug_pl run (regexes matched at the message start).
NOT_APPLICABLE_WARNINGS = (
    # fit has no validation loop on purpose: the search evaluates (SlugDataModule.val_dataloader)
    r"Total length of `\w+` across ranks is zero",
    # the pair streams split themselves exactly by rank and data-loader worker (slug_pl.data.pairs)
    r"Your `IterableDataset` has `__len__` defined",
    # raised inside Lightning; nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # jsonargparse deprecations hit by Lightning's own calls (shown where pytest or -W shows them)
    r"\s*By default only one JsonargparseDeprecationWarning",
    r"[\s\S]*was\s+deprecated\s+in\s+v4\.\d+\.\d+\s+and\s+will\s+be\s+removed\s+in\s+v5\.0\.0",
    # slug-pl hands LightningCLI its own command line on purpose
    r"LightningCLI's args parameter is intended to run from within Python",
)

#: ... and those that do not apply to a gradient-only method (no optimizer step: SLUG's pass),
#: which runs without an optimizer and, by default, in eval mode (``model.eval_mode``).
GRADIENT_ONLY_WARNINGS = (
    r"`LightningModule.configure_optimizers` returned `None`",
    r"Found \d+ module\(s\) in eval mode at the start of training",
)

#: Lightning notices (info log lines) that are noise in a slug_pl run.
QUIET_NOTICES = (
    r"💡 Tip: For seamless cloud logging",
    r"`Trainer.fit` stopped: `max_epochs=\d+` reached",
)

#: The notice of a fit without training batches: expected when a method skips its pass
#: (``model.gradients_from``); a pass that should run keeps it.
NO_BATCHES_NOTICE = r"`Trainer.fit` stopped: No training batches"

_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _NoticeFilter(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


class Console:
    """The output settings of one command: ``with Console("slug-pl fit", debug): ...``.

    Inside, warnings print as ``<prog>: warning: <message>`` (Python's format with file and line
    under ``debug``), the Lightning warnings and notices above are dropped, and
    :meth:`gradient_only` / :meth:`pass_skipped` drop those that do not apply to this run's method.
    """

    def __init__(self, prog: str, debug: bool = False):
        self.prog, self.debug = prog, debug
        self._filter = _NoticeFilter(QUIET_NOTICES)
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> Console:
        self._warnings.__enter__()
        for pattern in NOT_APPLICABLE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        if not self.debug:
            warnings.showwarning = self._show_warning
        logging.getLogger(_RANK_ZERO_LOGGER).addFilter(self._filter)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(_RANK_ZERO_LOGGER).removeFilter(self._filter)
        self._warnings.__exit__(*exc)

    def __getstate__(self) -> dict:
        # pickled along with the CLI under ddp_spawn: a copy carries the settings, not this
        # process's saved warning state (which holds the warnings module itself)
        return {k: v for k, v in self.__dict__.items() if k != "_warnings"}

    def gradient_only(self) -> None:
        """Drop the warnings that do not apply to a method without an optimizer step."""
        for pattern in GRADIENT_ONLY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)

    def pass_skipped(self) -> None:
        """Drop the 'no training batches' notice: the method skips its pass on purpose."""
        self._filter.patterns.append(re.compile(NO_BATCHES_NOTICE))

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        kind = "" if category is UserWarning or category.__name__ == "PossibleUserWarning" else f" ({category.__name__})"
        print(f"{self.prog}: warning{kind}: {one_line(message)}", file=file or sys.stderr)


def is_gradient_only(module: LightningModule) -> bool:
    """Whether ``module``'s fit computes gradients without an optimizer step (SLUG's pass)."""
    return not module.automatic_optimization and module.configure_optimizers() is None


def interrupt_hint(run_dir: Path) -> str:
    """What an interrupted ``fit`` left in ``run_dir`` and how to go on from it."""
    config = run_dir / "config.yaml"
    partial = sorted((run_dir / "gradients" / "partial").glob("rank*-batch*.pt"))
    gradients = all((run_dir / "gradients" / f"{s}.safetensors").is_file() for s in ("forget", "retain"))
    if gradients:
        ranking = ", ranking.csv is written" if any(run_dir.glob("ranking*.csv")) else ""
        return (f"interrupted after the gradient pass (the gradients are saved{ranking}); re-run the "
                f"search in seconds: slug-pl fit --config {config} --model.gradients_from {run_dir / 'gradients'}")
    if partial:
        return (f"interrupted; the gradient pass saved its state in {partial[-1].parent}: resume with "
                f"slug-pl fit --config {config} --model.resume_from {run_dir}")
    return ("interrupted before the gradient pass saved any state; with --model.checkpoint_every N the "
            "pass saves its state every N batches and an interrupted pass resumes (--model.resume_from)")


class InterruptHint(Callback):
    """Remembers, when a ``fit`` is interrupted (Ctrl-C), how to resume it (:attr:`hint`)."""

    def __init__(self):
        self.hint: str | None = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit" and trainer.is_global_zero:
            # the run directory the module resolved in setup (trainer.log_dir is collective under DDP)
            run_dir = getattr(pl_module, "run_dir", None) or trainer.default_root_dir
            self.hint = interrupt_hint(Path(run_dir))
