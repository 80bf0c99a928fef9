"""Where benchmark results go: ``benchmarks/results/<name>``, written atomically (a rerun
replaces the file in one step; a crash never leaves half a file)."""

from __future__ import annotations

import json
from pathlib import Path

from slug_pl.atomic import atomic_output

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, content: dict | str, folder: Path = RESULTS) -> Path:
    """Write ``content`` (a dict as indented JSON, or text) to ``folder/name`` (by default
    ``benchmarks/results/name``)."""
    path = Path(folder) / name
    text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(text)
    print(f"written {path}")
    return path


def write_table_results(stem: str, command: str, seconds: float, payload: dict, markdown: list[str]) -> None:
    """A demo-world benchmark's record: ``<stem>.json`` (the command, when, torch version, wall
    seconds and ``payload``) and ``<stem>.md`` (the ``markdown`` lines, also printed)."""
    import time

    import torch

    write_result(f"{stem}.json", {"command": command, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "torch": torch.__version__, "seconds": seconds} | payload)
    text = "\n".join(markdown) + "\n"
    write_result(f"{stem}.md", text)
    print(text)
