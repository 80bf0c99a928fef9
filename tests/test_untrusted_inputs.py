"""Downloaded files are data: hostile ones, each built here, are refused before they run code,
leave their folder or cost memory, with a one-line error naming the file and the entry (or, under
the skip policy, are left out and listed). Every test that could run code plants a marker file
that must not appear; every test that could read or write elsewhere checks that place."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from slug_pl.cli import main


def png(colour=(200, 30, 30), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes], compress: bool = False) -> Path:
    """A tar at ``path`` holding ``members`` (name -> bytes) in order, exactly as named."""
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def last_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no error printed"
    return lines[-1]


# ------------------------------------------------------------------ 1. a judge's classifier.json


def test_a_classifier_folder_cannot_name_code_to_call(tmp_path):
    from slug_pl.evaluation.generation import CLASSIFIER_JSON, CLASSIFIER_WEIGHTS, ClassifierJudge

    marker = tmp_path / "ran"
    folder = tmp_path / "judge"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, str(folder / CLASSIFIER_WEIGHTS))
    spec = {"format": "slug_pl-classifier/1", "class_path": "os.system",
            "init_args": {"command": f"touch {marker}"}, "classnames": ["a"], "image_size": [8, 8],
            "mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / CLASSIFIER_JSON).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"classifier.json: 'os.system' is not a slug_pl classifier class"):
        ClassifierJudge.load(folder)
    # a library architecture cannot smuggle a pickle or a download in through its arguments
    for kwargs, refused in (({"checkpoint_path": str(tmp_path / "evil.pth")}, "checkpoint_path"),
                            ({"pretrained_cfg_overlay": {"file": "x"}}, "pretrained_cfg_overlay")):
        (folder / CLASSIFIER_JSON).write_text(json.dumps(
            {**spec, "arch": {"library": "timm", "name": "test_vit", "kwargs": kwargs}}))
        with pytest.raises(ValueError, match=f"classifier.json: arch kwargs '{refused}' is not an argument"):
            ClassifierJudge.load(folder)
    (folder / CLASSIFIER_JSON).write_text(json.dumps(
        {**spec, "arch": {"library": "timm", "name": "hf-hub:someone/model"}}))
    with pytest.raises(ValueError, match="'hf-hub:someone/model' is not a timm architecture"):
        ClassifierJudge.load(folder)
    assert not marker.exists()


def test_a_classifier_folder_reads_no_weights_through_a_link_out(tmp_path):
    from builders_downstream import TinyClassifier

    from slug_pl.evaluation.generation import CLASSIFIER_WEIGHTS, ClassifierJudge, save_classifier

    folder = save_classifier(tmp_path / "judge", TinyClassifier(2), "builders_downstream.TinyClassifier",
                             {"num_classes": 2}, ["a", "b"], image_size=(8, 8))
    outside = tmp_path / "elsewhere.safetensors"
    (folder / CLASSIFIER_WEIGHTS).rename(outside)
    (folder / CLASSIFIER_WEIGHTS).symlink_to(outside)
    with pytest.raises(ValueError, match=r"checkpoint file 'classifier.safetensors' resolves to .*outside"):
        ClassifierJudge.load(folder)


# --------------------------------------------------------------- 2. an UnlearnCanvas classifier JSON


def test_an_unlearncanvas_classifier_json_cannot_call_torch_hub(tmp_path):
    from slug_pl.evaluation.unlearncanvas import load_task_classifier

    marker = tmp_path / "hubconf_ran"
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "def model(num_classes=2):\n    import torch\n    return torch.nn.Linear(1, num_classes)\n")
    save_file({"weight": torch.zeros(2, 1), "bias": torch.zeros(2)}, str(tmp_path / "style.safetensors"))
    record = {"task": "style", "classnames": ["A", "B"], "weights": "style.safetensors", "image_size": 8,
              "arch": {"library": "python", "name": "torch.hub.load",
                       "kwargs": {"repo_or_dir": str(hub), "model": "model", "source": "local"}}}
    (tmp_path / "style.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"style.json: 'torch.hub.load' is not a slug_pl classifier class"):
        load_task_classifier(tmp_path / "style.json")
    # the weights entry names a file inside the JSON's folder, nothing else
    (tmp_path / "up.json").write_text(json.dumps({**record, "arch": {"library": "torchvision", "name": "resnet18"},
                                                  "weights": "../secret.safetensors"}))
    with pytest.raises(ValueError, match=r"up.json: weights '../secret.safetensors' climbs out"):
        load_task_classifier(tmp_path / "up.json")
    assert not marker.exists() and "hubconf" not in sys.modules
