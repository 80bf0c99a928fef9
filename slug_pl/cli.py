"""The ``slug-pl`` command: LightningCLI with ``fit`` (gradient pass + ranking + step search),
``validate`` and ``test`` (zero-shot evaluation, optionally with an edit), ``mine`` (forget-set
mining from caption shards), ``generate`` (a forget set drawn by a Stable Diffusion pipeline) and
``transplant`` (a run's edit copied into the Stable Diffusion pipeline that embeds the CLIP).

    slug-pl fit --config configs/demo.yaml
    slug-pl validate --config configs/demo.yaml --model.edit lightning_logs/version_0/edit.safetensors
    slug-pl mine --shards 'laion/{00000..00009}.tar' --name "Elon Musk" --out data/forget/elon_musk
    slug-pl generate --pipeline models/sd15 --prompt "a photo of Mickey Mouse" --n 500 --out data/forget/mickey
    slug-pl transplant --pipeline models/sd15 --edit lightning_logs/version_0/edit.safetensors --out models/sd15-edited
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from slug_pl.data.datamodule import SlugDataModule
from slug_pl.methods import SlugSearch, UnlearningModule

#: Exit status of ``fit`` when the search finished without meeting the forget target.
EXIT_TARGET_NOT_MET = 3


class SlugCLI(LightningCLI):
    """LightningCLI with the search callback as a top-level ``search:`` section."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "test": {"model", "dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SlugSearch, "search")
        parser.add_argument("--json", type=str | None, default=None,
                            help="validate/test: also write every metric as JSON to this file ('-': stdout)")


TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one gradient-only pass
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,  # artifacts are written by the module and the search
    "log_every_n_steps": 1,
    "use_distributed_sampler": False,  # the data streams split themselves exactly by rank
}


def run_cli(args: list[str] | None = None) -> SlugCLI:
    return SlugCLI(
        UnlearningModule,
        SlugDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": False},
        args=args,
        parser_kwargs={"description": "SLUG: single layer unlearning gradient, as a Lightning suite"},
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``slug-pl``; ``argv`` None reads the command line (as LightningCLI does)."""
    words = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if words and words[0] == "mine":
        from slug_pl.data.mining import main as mine_main

        return mine_main(words[1:])
    if words and words[0] == "generate":
        from slug_pl.data.generated import main as generate_main

        return generate_main(words[1:])
    if words and words[0] == "transplant":
        from slug_pl.targets.stable_diffusion import main as transplant_main

        return transplant_main(words[1:])
    cli = run_cli(argv)
    if cli.subcommand in ("validate", "test"):
        target = cli.config[cli.subcommand].get("json")
        if target:
            _write_metrics_json(cli, target)
    if cli.subcommand == "fit":
        # read the run's summary from disk: with ddp_spawn the search ran in another process
        summary = Path(cli.trainer.log_dir or cli.trainer.default_root_dir) / "summary.json"
        if summary.is_file() and not json.loads(summary.read_text())["target"]["met"]:
            return EXIT_TARGET_NOT_MET
    return 0


def _write_metrics_json(cli: SlugCLI, target: str) -> None:
    """Every metric of the last validate/test: accuracies and, where the data module provides
    member / non-member pairs, membership inference (in %)."""
    module, datamodule = cli.model, cli.datamodule
    metrics: dict = {"stage": cli.subcommand, "concepts": datamodule.concepts,
                     "edit": module.edit, "model": module.family.describe(),
                     "metrics": getattr(module, "last_eval", {})}
    pairs = datamodule.mia_pairs() if hasattr(datamodule, "mia_pairs") and module.clip is not None else None
    if pairs is not None:
        from slug_pl.evaluation.mia import model_membership_inference

        metrics["mia"] = model_membership_inference(module.family, module.clip, pairs)
    text = json.dumps(metrics, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
    else:
        path = Path(target)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
