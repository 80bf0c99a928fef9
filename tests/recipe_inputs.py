"""Stand-ins of the data files the recipes start from, written where docs/recipes.md puts them
(relative to a working folder), in their publishers' layouts and small: LAION caption shards as
img2dataset writes them, CelebA's image folder with its identity and name files, ImageNet's flat
validation folder with Kaggle's solution file, the UnlearnCanvas image tree, and the models as
``hf download`` leaves them (the hub stand-ins of :mod:`slug_pl.testing.standins`, copied).

Images are random noise: the recipes' tests prove that the commands and configs run from the
published files to a used result, not that a random model forgets anything."""

from __future__ import annotations

import csv
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from slug_pl.testing import standins as si

#: The person the recipes forget.
PERSON = "Elon Musk"
#: CelebA identities of the stand-in (the person and others), images per identity.
CELEBA_OTHERS = 8
CELEBA_IMAGES = 6
#: ImageNet classes of the stand-in (wnids) and images per class.
IMAGENET_WNIDS = ("n01440764", "n01443537", "n02099601", "n04557648")
IMAGENET_IMAGES = 2
#: LAION shards (as many as the recipe mines), pairs per shard, and the shards whose first
#: captions name the person (not the first: it is the retain shard).
LAION_SHARDS = 10
LAION_PAIRS = 24
LAION_PERSON = {1: 8, 2: 6}
#: UnlearnCanvas cells of the stand-in (the benchmark's names) and images per cell.
CANVAS_STYLES = ("Van_Gogh", "Monet")
CANVAS_OBJECTS = ("Dogs",)
CANVAS_IMAGES = 20

#: Where docs/recipes.md downloads each model (``hf download ... --local-dir``).
MODEL_FOLDERS = {
    si.OPEN_CLIP_B32: "models/clip-vit-b32-laion2b", si.SD15: "models/sd15", si.CLIP_L14: "models/clip-vit-l14",
    si.SD21: "models/sd21", si.CLIP_H14: "models/clip-vit-h14", si.SDXL: "models/sdxl",
    si.CLIP_BIGG14: "models/clip-vit-bigg14", si.LLAVA15: "models/llava-1.5-7b",
    si.CLIP_L14_336: "models/clip-vit-l14-336", si.UNLEARNCANVAS: "models/unlearncanvas",
}


def _jpeg(rng: np.random.Generator, size: int = 24) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def download(standin, work: Path, repo_id: str) -> Path:
    """``hf download repo_id --local-dir <the recipe's folder>``: the stand-in copied there."""
    built = standin(repo_id)
    source = built.path.parent if repo_id == si.OPEN_CLIP_B32 else built.path
    if repo_id == si.UNLEARNCANVAS:
        source = built.path.parent.parent  # the release folder: diffuser/, cls_model/
    target = work / MODEL_FOLDERS[repo_id]
    if not target.exists():
        shutil.copytree(source, target)
    return target


def laion(work: Path, seed: int = 0) -> Path:
    """``data/laion/00000.tar`` ... ``00009.tar``: img2dataset's output (``<key>.jpg``, ``<key>.txt``,
    ``<key>.json``); a few captions of :data:`LAION_PERSON`'s shards name the person."""
    rng = np.random.default_rng(seed)
    folder = work / "data" / "laion"
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(LAION_SHARDS):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(LAION_PAIRS):
                key = f"{shard:05d}{i:04d}"
                caption = (f"{PERSON} speaks at a conference, photo {i}" if i < LAION_PERSON.get(shard, 0)
                           else f"a photo of a street, number {i}")
                for ext, data in (("jpg", _jpeg(rng)), ("txt", caption.encode()),
                                  ("json", b'{"status": "success"}')):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def celeba(work: Path, seed: int = 1) -> Path:
    """``celeba/img_align_celeba/*.jpg``, ``celeba/identity_CelebA.txt`` (image -> numeric id, as
    CelebA ships it) and ``celeba/identity_names.txt`` (id -> name, the list a user supplies)."""
    rng = np.random.default_rng(seed)
    root = work / "celeba"
    names = [PERSON] + [f"Person {chr(ord('A') + i)}" for i in range(CELEBA_OTHERS)]
    lines, n = [], 0
    for ident in range(len(names)):
        for _ in range(CELEBA_IMAGES):
            n += 1
            _save(root / "img_align_celeba" / f"{n:06d}.jpg", _jpeg(rng))
            lines.append(f"{n:06d}.jpg {1000 + ident}")
    (root / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    (root / "identity_names.txt").write_text("".join(f"{1000 + i} {name}\n" for i, name in enumerate(names)))
    return root


def imagenet(work: Path, seed: int = 2) -> Path:
    """``imagenet/ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_*.JPEG`` (flat, as Kaggle's copy) and
    ``imagenet/LOC_val_solution.csv``."""
    rng = np.random.default_rng(seed)
    root = work / "imagenet"
    rows, n = [], 0
    for wnid in IMAGENET_WNIDS:
        for _ in range(IMAGENET_IMAGES):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}"
            _save(root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / f"{name}.JPEG", _jpeg(rng))
            rows.append({"ImageId": name, "PredictionString": f"{wnid} 1 2 3 4"})
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["ImageId", "PredictionString"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def unlearncanvas(work: Path, seed: int = 3) -> Path:
    """``data/UnlearnCanvas/<Style>/<Object>/<n>.jpg``: the benchmark's image tree."""
    rng = np.random.default_rng(seed)
    root = work / "data" / "UnlearnCanvas"
    for style in CANVAS_STYLES:
        for obj in CANVAS_OBJECTS:
            for n in range(1, CANVAS_IMAGES + 1):
                _save(root / style / obj / f"{n}.jpg", _jpeg(rng))
    return root
