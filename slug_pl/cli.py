"""The ``slug-pl`` command: LightningCLI with ``fit`` (gradient pass + ranking + step search),
``validate`` and ``test`` (zero-shot evaluation, optionally with an edit), plus the commands of
:data:`EXTRA_COMMANDS` (``mine``: forget-set mining from caption shards; ``prepare``: a recipe's
evaluation data from the published CelebA, ImageNet and UnlearnCanvas files; ``compare``: SLUG and the
baselines on identical data, one table; ``generate``: a forget set drawn by a Stable Diffusion
pipeline; ``transplant``: a run's edit copied into the Stable Diffusion pipeline that embeds the CLIP;
``convert-checkpoint``: a torch pickle checkpoint's weights as safetensors, the only weights format a
classifier checkpoint is read from).

    slug-pl fit --config configs/demo.yaml
    slug-pl validate --config configs/demo.yaml --model.edit lightning_logs/version_0/edit.safetensors
    slug-pl test --config configs/demo.yaml --json -        # only JSON on stdout
    slug-pl mine --shards 'laion/{00000..00009}.tar' --name "Elon Musk" --out data/forget/elon_musk
    slug-pl prepare imagenet --root imagenet/ILSVRC2012_img_val --devkit imagenet/ILSVRC2012_devkit_t12 --out data/imagenet
    slug-pl compare --config configs/demo_compare.yaml
    slug-pl generate --pipeline models/sd15 --prompt "a photo of Mickey Mouse" --n 500 --out data/forget/mickey
    slug-pl transplant --pipeline models/sd15 --edit lightning_logs/version_0/edit.safetensors --out models/sd15-edited
    slug-pl convert-checkpoint uc_classifiers/style50.pth

Exit status: 0 done; 2 an anticipated error (bad config, missing file, ...: one line
``slug-pl <command>: error: <message>`` last on stderr, the traceback with ``--debug`` or
``SLUG_PL_DEBUG=1``; see :mod:`slug_pl.errors`); 3 ``fit`` finished without meeting the forget
target; 130 interrupted (the last line says how to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from slug_pl.atomic import write_text
from slug_pl.console import Console, InterruptHint, is_gradient_only
from slug_pl.data.datamodule import SlugDataModule
from slug_pl.errors import ANTICIPATED, EXIT_ERROR, ConfigError, did_you_mean, error_message, explain_parse_error, original_error
from slug_pl.methods import SlugModule, SlugSearch, UnlearningModule
from slug_pl.record import read_verdict
from slug_pl.step_search import ForgetTarget
from slug_pl.safety import links_under

#: Exit status of ``fit`` when the search finished without meeting the forget target.
EXIT_TARGET_NOT_MET = 3
#: Exit status of an interrupted command (128 + SIGINT, as shells report Ctrl-C).
EXIT_INTERRUPTED = 130

DESCRIPTION = "SLUG (Single Layer Unlearning Gradient): remove a concept from a CLIP-family model by editing one layer."

#: One-line help of LightningCLI's commands (shown by ``slug-pl --help`` and ``slug-pl <command> --help``).
LIGHTNING_COMMANDS = {
    "fit": "unlearn the concept(s): gradient pass, layer ranking, step search, the edit and its report",
    "validate": "zero-shot metrics on the validation sets, of the model or of the model with --model.edit",
    "test": "zero-shot metrics on the held-out test sets, of the model or of the model with --model.edit",
}


#: The first line of ``slug-pl fit|validate|test --help`` (argparse would list every option).
COMMAND_USAGE = "slug-pl {command} --config CONFIG.yaml [--config MORE.yaml] [--<section>.<key> VALUE ...]"
#: Under it: where the method's own keys are documented (the option list below is mostly the
#: trainer's).
WHERE_THE_KEYS_ARE = (
    "A config has the sections model (the method, e.g. SLUG, with its family and target), data, search "
    "(SLUG's step search: --search.* below) and trainer (Lightning's Trainer: --trainer.* below). The "
    "method's own keys: 'slug-pl fit --model.help slug_pl.methods.SlugModule' (a baseline: "
    "slug_pl.methods.GaModule, ...); a family's: '--model.family.help slug_pl.families.OpenClip' "
    "(or HfClip); a target's: '--model.target.help slug_pl.targets.StableDiffusion' (or Llava, "
    "UnlearnCanvas); the data's: '--data.help slug_pl.data.datamodule.SlugDataModule'. Every key with "
    "its value: '--print_config'. Reference: docs/configuration.md.")


@dataclass(frozen=True)
class Command:
    """A ``slug-pl`` command beside LightningCLI's: ``run(words after the command) -> exit status``."""

    summary: str
    run: Callable[[list[str]], int]


def _mine(words: list[str]) -> int:
    from slug_pl.data import mining

    parser = argparse.ArgumentParser(prog="slug-pl mine", description=EXTRA_COMMANDS["mine"].summary)
    mining.add_arguments(parser)
    return mining.run(parser.parse_args(words))


def _prepare(words: list[str]) -> int:
    from slug_pl.data import prepare

    parser = argparse.ArgumentParser(prog="slug-pl prepare", description=EXTRA_COMMANDS["prepare"].summary)
    prepare.add_arguments(parser)
    return prepare.run(parser.parse_args(words))


def _compare(words: list[str]) -> int:
    from slug_pl.compare import main as compare_main

    return compare_main(words)


def _generate(words: list[str]) -> int:
    from slug_pl.data.generated import main as generate_main

    return generate_main(words)


def _transplant(words: list[str]) -> int:
    from slug_pl.transplant import main as transplant_main

    return transplant_main(words)


def _convert_checkpoint(words: list[str]) -> int:
    from slug_pl.convert import main as convert_main

    return convert_main(words)


#: Commands that are not LightningCLI's (each parses its own options). A new command is a
#: function ``words -> exit status`` and one entry here; ``slug-pl --help`` lists it.
EXTRA_COMMANDS: dict[str, Command] = {
    "mine": Command("mine a forget set: the pairs of caption shards whose caption names a concept", _mine),
    "prepare": Command("build a recipe's evaluation data from the published files (celeba, imagenet, "
                       "unlearncanvas)", _prepare),
    "compare": Command("run SLUG and the baselines on identical data and write one comparison table", _compare),
    "generate": Command("draw a forget set with a Stable Diffusion pipeline (webdataset shards)", _generate),
    "transplant": Command("copy a run's edit into the model that embeds the CLIP (Stable Diffusion, SDXL, LLaVA)",
                          _transplant),
    "convert-checkpoint": Command("write a torch .pth checkpoint's weights as safetensors (once, on a trusted "
                                  "machine)", _convert_checkpoint),
}


def top_level_help() -> str:
    commands = {**LIGHTNING_COMMANDS, **{name: c.summary for name, c in EXTRA_COMMANDS.items()}}
    width = max(map(len, commands))
    lines = [f"usage: slug-pl [--debug] {{{','.join(commands)}}} [options]", "", DESCRIPTION, "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in commands.items()]
    lines += ["", "'slug-pl <command> --help' lists a command's options.",
              "--debug (or SLUG_PL_DEBUG=1): print the full traceback of an error."]
    return "\n".join(lines)


class SlugArgumentParser(LightningArgumentParser):
    """Reports a parse error as :class:`ConfigError` (one line naming the key) instead of printing
    the whole usage and exiting; nested class parsers keep jsonargparse's own handling."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # a parser jsonargparse nests for a class: it handles the error
            super().error(message, ex)
        raise ConfigError(explain_parse_error(message, ex, self)) from ex


class SlugCLI(LightningCLI):
    """LightningCLI with the search callback as a top-level ``search:`` section, errors of class
    constructors unwrapped, checks before any work, and one metrics table per validate/test."""

    def __init__(self, *args, console: Console | None = None, **kwargs):
        self.console = console  # the command's output settings (before_fit narrows its filters)
        self.run_dir: Path | None = None  # fit's run folder, where the run's record says its verdict
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "test": {"model", "dataloaders", "datamodule"},
        }

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # LightningCLI's, less the trainer options that do nothing here or break the exact pass
        parser.add_class_arguments(self.trainer_class, "trainer", fail_untyped=False, instantiate=False,
                                   sub_configs=True, skip=set(HIDDEN_TRAINER_OPTIONS))
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items()
                             if k != "callbacks" and k not in HIDDEN_TRAINER_OPTIONS})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=True)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=True)

    def instantiate_trainer(self, **kwargs):
        fixed = {k: v for k, v in self.trainer_defaults.items() if k in HIDDEN_TRAINER_OPTIONS}
        return super().instantiate_trainer(**(fixed | kwargs))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the forget target, one section for every method: the model of each method receives it
        parser.add_class_arguments(ForgetTarget, "forget_target", fail_untyped=False)
        parser.link_arguments("forget_target", "model.init_args.forget_target", apply_on="parse")
        parser.add_lightning_class_args(SlugSearch, "search")
        parser.add_argument("--json", type=str | None, default=None,
                            help="validate/test: also write every metric as JSON to this new file "
                                 "('-': to stdout, which then holds only the JSON)")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ANTICIPATED as err:  # jsonargparse wraps what a class's __init__ raised
            cause = original_error(err)
            if cause is None:
                raise ConfigError(explain_parse_error(str(err), err.__cause__, self.parser)) from err
            if cause is not err:
                raise cause from cause.__cause__
            raise

    # -- checks before any work ----------------------------------------------------------------
    def _refuse_model_without_method(self) -> None:
        """A ``model:`` section without ``class_path`` (the format before methods had classes)
        builds the shared base, which can evaluate (validate / test) but has no method to fit:
        say what to write instead."""
        if type(self.model) is UnlearningModule:
            raise ConfigError(
                "the model section names no method: give its class_path and put its arguments under "
                "init_args, e.g. 'model: {class_path: slug_pl.methods.SlugModule, init_args: {family: ...}}' "
                "(SLUG; the baselines are slug_pl.methods.GaModule, FtModule, GaftModule, SalunModule, SsdModule)")

    def before_fit(self) -> None:
        self._refuse_model_without_method()
        # the search: section is SLUG's step search; another method (a baseline) runs without it
        # and takes its forget target from its own model arguments
        if not isinstance(self.model, SlugModule):
            self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, SlugSearch)]
        self._refuse_used_run_dir()
        # before the logger writes a file; several processes read the sets once they run, sharing the work
        self.datamodule.check("fit", self.model.pass_sets(), processes=self.trainer.world_size)
        module, limit = self.model, self.trainer.limit_train_batches
        gradient_only = is_gradient_only(module)
        if gradient_only and module.pass_sets() and not (isinstance(limit, float) and limit == 1.0):
            raise ValueError(
                f"trainer.limit_train_batches is {limit:g}: the gradient pass "
                f"needs every batch of the forget and retain sets; leave it unset"
            )
        if self.console is not None:
            if gradient_only:
                self.console.gradient_only()
            if not module.pass_sets():
                self.console.pass_skipped()
        self._claim_run_dir()

    def before_validate(self) -> None:
        self.datamodule.check("validate")
        self._claim_run_dir()

    def before_test(self) -> None:
        self.datamodule.check("test")
        self._claim_run_dir()

    def _refuse_used_run_dir(self) -> None:
        """A fit never writes into a folder of an earlier run, nor through a symbolic link (checked
        before the logger writes its first event file): with a logger, any file or link in its
        ``version_N`` folder (a dangling link too: Lightning would write its ``hparams.yaml``
        through it), or that folder being a link, is refused."""
        trainer = self.trainer
        run = self.run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        versioned = trainer.logger is not None  # else the run writes into default_root_dir itself
        if versioned and run.is_symlink():
            raise FileExistsError(f"the run folder {run} is a symbolic link (to {run.resolve()}); slug_pl "
                                  f"writes no run through a link. Remove it, or leave the logger's version unset")
        earlier = []
        if versioned and run.is_dir():
            files = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
            earlier = sorted(files | {p.relative_to(run).as_posix() for p in links_under(run)})
        if earlier or (run / "config.yaml").exists():
            earlier = earlier or ["config.yaml"]
            shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
            raise FileExistsError(
                f"the run folder {run} holds an earlier run ({shown}); slug_pl never writes into it. Leave "
                f"the logger's version unset (each fit gets a new version_N) or choose another "
                f"trainer.default_root_dir"
            )

    def _claim_run_dir(self) -> None:
        """Claim the run folder for this run alone, after every check and before anything is
        written: its ``config.yaml`` is created exclusively (empty; Lightning's config saving
        fills it). Two runs started in one folder at the same moment take the same ``version_N``
        (the logger picks the next free number) and both pass :meth:`_refuse_used_run_dir`; only
        one can create the file, and the other stops here, having written nothing.

        Global rank 0 only (read from the launcher's environment: processes a DDP launcher starts
        run this command too); a remote ``log_dir`` is not claimed."""
        savers = [c for c in self.trainer.callbacks if isinstance(c, SaveConfigCallback)]
        if rank_zero_only.rank != 0 or not savers or not savers[0].save_to_log_dir:
            return
        run = self.trainer.log_dir or self.trainer.default_root_dir
        if not isinstance(get_filesystem(run), LocalFileSystem):
            return
        path = Path(run) / savers[0].config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x"):
                pass
        except FileExistsError:
            raise FileExistsError(
                f"the run folder {run} already has a {path.name}: another run took this folder (one started "
                f"in the same folder at the same moment chooses the same version_N); this run stopped before "
                f"writing anything. Run it again (it takes the next version_N), or give runs that start "
                f"together their own trainer.default_root_dir"
            ) from None

    def before_instantiate_classes(self) -> None:
        # before the model, the data or the trainer is built: the output file of --json
        if self.subcommand in ("validate", "test"):
            self._refuse_existing_json()

    def _refuse_existing_json(self) -> None:
        target = self.config[self.subcommand].get("json")
        if not target or target == "-":
            return
        path = Path(target)
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"--json: {path} already exists and slug_pl never overwrites a file; give a new "
                                  f"file name, or '-' to print the JSON on stdout")
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise PermissionError(f"--json: cannot create {path} ({parent} is not a writable folder); give a file "
                                  f"in a folder you can write, or '-' for stdout")

    # -- validate / test: one table of the metrics, printed by main() ----------------------------
    def validate(self, **kwargs) -> None:
        self.trainer.validate(**(kwargs | {"verbose": False}))  # Lightning's table lists each metric per loader

    def test(self, **kwargs) -> None:
        self.trainer.test(**(kwargs | {"verbose": False}))


TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one gradient-only pass
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,  # artifacts are written by the module and the search
    "log_every_n_steps": 1,
    "use_distributed_sampler": False,  # the data streams split themselves exactly by rank
}
#: ... and those of the command line only.
CLI_TRAINER_DEFAULTS = {
    "enable_model_summary": False,  # a table of the model's modules says nothing about unlearning
}

#: Trainer arguments that are not options of slug-pl: those of TRAINER_DEFAULTS among them are
#: fixed (another value breaks the exact pass or writes checkpoints nobody reads), the others do
#: nothing here (fit runs no validation loop and no predict; no model registry).
HIDDEN_TRAINER_OPTIONS = (
    "num_sanity_val_steps", "enable_checkpointing", "use_distributed_sampler", "val_check_interval",
    "check_val_every_n_epoch", "limit_predict_batches", "overfit_batches", "reload_dataloaders_every_n_epochs",
    "fast_dev_run", "barebones", "model_registry",
)


class SaveConfigIntoClaim(SaveConfigCallback):
    """Lightning's config saving, which fills the empty ``config.yaml`` that
    :meth:`SlugCLI._claim_run_dir` created for this run instead of refusing it as an earlier run's
    (any other existing file is still refused). Every rank takes the same decision (rank 0's)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and not self.overwrite:
            path = os.path.join(trainer.log_dir, self.config_filename)  # log_dir: broadcast from rank 0
            fs = get_filesystem(path)
            claimed = trainer.is_global_zero and fs.isfile(path) and fs.size(path) == 0
            if trainer.strategy.broadcast(claimed):
                self.overwrite = True
        super().setup(trainer, pl_module, stage)


def run_cli(args: list[str] | None = None, callbacks: Sequence[Callback] = (), console: Console | None = None) -> SlugCLI:
    """Parse ``args``, build model, data and trainer, and run the command (LightningCLI)."""
    return SlugCLI(
        UnlearningModule,
        SlugDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={**TRAINER_DEFAULTS, **CLI_TRAINER_DEFAULTS, "callbacks": list(callbacks)},
        seed_everything_default=0,
        save_config_callback=SaveConfigIntoClaim,
        save_config_kwargs={"overwrite": False},
        args=args,
        console=console,
        parser_class=SlugArgumentParser,
        auto_configure_optimizers=False,  # no method takes LightningCLI's optimizer / scheduler
        parser_kwargs={"prog": "slug-pl", "description": DESCRIPTION,
                       **{name: {"usage": COMMAND_USAGE.format(command=name),
                                 "description": f"slug-pl {name}: {summary}.\n\n{WHERE_THE_KEYS_ARE}"}
                          for name, summary in LIGHTNING_COMMANDS.items()}},
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``slug-pl``; ``argv`` None reads the command line. Returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words or os.environ.get("SLUG_PL_DEBUG", "") not in ("", "0")
    words = [w for w in words if w != "--debug"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = words[0] if words else None
    if command in (None, "-h", "--help"):
        if command:
            print(top_level_help())
            return 0
        print(f"{top_level_help()}\nslug-pl: error: give a command", file=sys.stderr)
        return EXIT_ERROR
    known = [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]
    if command not in known:
        print(f"slug-pl: error: unknown command {command!r}{did_you_mean(command, known)}; "
              f"the commands are {', '.join(known)}", file=sys.stderr)
        return EXIT_ERROR
    prog = f"slug-pl {command}"
    hint = InterruptHint()
    try:
        with Console(prog, debug) as console:
            if command in EXTRA_COMMANDS:
                return EXTRA_COMMANDS[command].run(words[1:])
            return _run_lightning(command, words, hint, console)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        if hint.hint:  # Lightning exits with status 1 after Ctrl-C
            print(f"{prog}: {hint.hint}", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise
    except ANTICIPATED as err:
        if debug:
            raise
        print(f"{prog}: error: {error_message(err)}", file=sys.stderr)
        return EXIT_ERROR


def _run_lightning(command: str, words: list[str], hint: InterruptHint, console: Console) -> int:
    evaluates = command in ("validate", "test")
    prints = any(w in ("-h", "--help") or w.startswith("--print_config") for w in words)
    stdout = sys.stdout
    # validate/test: stdout carries only their result (the table, or the JSON with --json -)
    with contextlib.redirect_stdout(sys.stderr) if evaluates and not prints else contextlib.nullcontext():
        cli = run_cli(words, callbacks=[hint], console=console)
        if evaluates and cli.trainer.is_global_zero:
            target = cli.config[cli.subcommand].get("json")
            record = _metrics_record(cli, with_mia=bool(target))
            if target and target != "-":
                write_text(target, json.dumps(record, indent=2) + "\n")
            stdout.write(json.dumps(record, indent=2) + "\n" if target == "-" else _metrics_table(record))
            stdout.flush()
    if command == "fit" and read_verdict(cli.run_dir) is False:  # the record the run wrote says so
        return EXIT_TARGET_NOT_MET
    return 0


def _metrics_record(cli: SlugCLI, with_mia: bool) -> dict:
    """Every metric of the last validate/test: accuracies (fractions) and, ``with_mia`` where the
    data module provides member / non-member pairs, membership inference (in %)."""
    module, datamodule = cli.model, cli.datamodule
    record: dict = {"stage": cli.subcommand, "concepts": datamodule.concepts,
                    "edit": module.edit, "model": module.family.describe(),
                    "metrics": getattr(module, "last_eval", {})}
    pairs = datamodule.mia_pairs() if with_mia and module.clip is not None else None
    if pairs is not None:
        from slug_pl.evaluation.mia import model_membership_inference

        record["mia"] = model_membership_inference(module.family, module.clip, pairs)
    return record


def _metrics_table(record: dict) -> str:
    """The record as a small table: one row per set, top-1 and top-5 in %."""
    metrics = record["metrics"]
    edit = record["edit"] or "none"
    lines = [f"{record['stage']}: {', '.join(record['concepts'])} (edit: {edit})", f"{'':9}{'top-1':>8}{'top-5':>8}"]
    for name in ("forget", "retain", "utility"):
        cells = [metrics.get(f"{name}_top{k}") for k in (1, 5)]
        if any(c is not None for c in cells):
            lines.append(f"{name:9}" + "".join(f"{100 * c:7.1f}%" if c is not None else f"{'-':>8}" for c in cells))
    if "mia" in record:
        mia = record["mia"]
        lines.append(f"membership inference: {mia['mean']:.1f} ± {mia['std']:.1f} % ({mia['n']} pairs per side; 50 % = chance)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
