"""One ``slug-pl fit`` on the demo config, as the demo-world benchmarks run it."""

from __future__ import annotations

import json
from pathlib import Path

from slug_pl.cli import main as slug_main

REPO = Path(__file__).resolve().parent.parent


def demo_root(cache: str | Path, seed: int) -> Path:
    """The demo cache of one world seed below ``cache`` (seed 0 is the demo's own ``demo``)."""
    return Path(cache) / ("demo" if seed == 0 else f"demo-seed{seed}")


def fit_demo(root: Path, seed: int, concepts: list[str], out_dir: str | Path, *overrides: str) -> tuple[int, Path]:
    """Run ``slug-pl fit --config configs/demo.yaml`` on world ``seed`` cached at ``root``,
    forgetting ``concepts``, with extra CLI ``overrides``; returns the exit code and the run folder
    (``out_dir/lightning_logs/version_0``)."""
    code = slug_main(["fit", "--config", str(REPO / "configs" / "demo.yaml"),
                      "--data.init_args.root", str(root), "--data.init_args.seed", str(seed),
                      "--data.init_args.concepts", json.dumps(concepts),
                      "--model.family.init_args.pretrained", str(root / "model" / "slug-demo-vit.safetensors"),
                      "--trainer.default_root_dir", str(out_dir), "--trainer.enable_progress_bar", "false",
                      *overrides])
    return code, Path(out_dir) / "lightning_logs" / "version_0"
