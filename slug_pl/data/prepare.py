"""``slug-pl prepare``: a recipe's evaluation data, built from the files their publishers distribute.

Each subcommand reads the official layout, writes a new folder (nothing is overwritten; an
interrupted run leaves nothing behind) and prints the config lines that use it::

    slug-pl prepare celeba --images celeba/img_align_celeba --identities celeba/identity_CelebA.txt \\
        --names celeba/identity_names.txt --include "Elon Musk" --others 100 --val 10 --test 10 --out data/celeba
    slug-pl prepare imagenet --root imagenet/ILSVRC2012_img_val --devkit imagenet/ILSVRC2012_devkit_t12 \\
        --out data/imagenet
    slug-pl prepare unlearncanvas --classifiers models/unlearncanvas/cls_model --root data/UnlearnCanvas \\
        --out data/unlearncanvas

- ``celeba``: the identities to forget plus ``--others`` more, each with disjoint validation and
  test images (:func:`slug_pl.data.build_labelled.celeba_splits`), as labelled shards
  (``val-*.tar``, ``test-*.tar``) with their class list ``celeba_names.txt``, and as one mapping file
  per split (``val_identities.txt``, ``test_identities.txt``: ``<image file> <name>`` per line) for
  the identity-set layout read straight from the image folder.
- ``imagenet``: the validation images as labelled shards (``val-*.tar``) with the class list of the
  classes that have images, in open_clip's order (``imagenet_classes.txt``: all 1,000 for the
  official set) and open_clip's 80 prompt templates (``imagenet_templates.txt``).
- ``unlearncanvas``: the benchmark's style and object classifiers, converted from their torch
  pickles to safetensors (read with ``weights_only=True``) and described by the JSONs the target
  reads (``style.json``, ``object.json``), and ``styles.txt``, the styles of the run (by default the
  50 of the published experiments, each checked to be a folder of the data).

The forget sets come from ``slug-pl mine`` (LAION pairs) or ``slug-pl generate``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from slug_pl.data.build_labelled import celeba_splits, imagenet_val_images, new_output_dir, write_labelled_shards
from slug_pl.data.layouts import imagenet_classnames, imagenet_templates
from slug_pl.data.shard_writer import brace_pattern

#: The files ``prepare celeba`` writes besides the shards.
CELEBA_CLASSNAMES = "celeba_names.txt"
CELEBA_MAPPINGS = {"val": "val_identities.txt", "test": "test_identities.txt"}
#: The files ``prepare imagenet`` writes besides the shards.
IMAGENET_CLASSNAMES = "imagenet_classes.txt"
IMAGENET_TEMPLATES = "imagenet_templates.txt"
#: The benchmark's classifier checkpoints in its release folder ``cls_model/``, by task.
UC_CHECKPOINTS = {"style": "style50.pth", "object": "style50_cls.pth"}
#: How the benchmark's ``accuracy.py`` builds and feeds its classifiers: timm's ViT-L/16 with a new
#: head, 224-pixel images normalized with mean = std = 0.5.
UC_ARCH = "vit_large_patch16_224"
UC_NORMALIZATION = [0.5, 0.5, 0.5]
UC_STYLES_FILE = "styles.txt"


# -- CelebA ---------------------------------------------------------------------------------------


def prepare_celeba(images: str, identities: str, names: str | None, include: Sequence[str], others: int,
                   val: int, test: int, out: str, seed: int = 0, others_from: str | None = None,
                   shard_size: int = 1000) -> list[str]:
    """Write the CelebA concept sets into the new folder ``out``; return the config lines."""
    splits = celeba_splits(images, identities, names, include, others, (val, test), seed, others_from)
    out_dir = Path(out)
    with new_output_dir(out_dir) as tmp:
        (tmp / CELEBA_CLASSNAMES).write_text("\n".join(splits.classnames) + "\n")
        shards = {}
        for split, chosen in (("val", splits.validation), ("test", splits.test)):
            shards[split] = write_labelled_shards(chosen, tmp, split, shard_size)
            lines = [f"{splits.files[image.key]} {splits.classnames[image.label]}" for image in chosen]
            (tmp / CELEBA_MAPPINGS[split]).write_text("\n".join(lines) + "\n")
    print(f"{len(splits.classnames)} identities, {len(splits.validation)} validation and {len(splits.test)} "
          f"test images (disjoint) in {out_dir}")
    names_file = out_dir / CELEBA_CLASSNAMES
    config = []
    for stage, split in (("validation", "val"), ("test", "test")):
        pattern = brace_pattern([out_dir / p.name for p in shards[split]])
        config.append(f"{stage}.concepts: {{shards: \"{pattern}\", classnames: {names_file}}}")
    for stage, split in (("validation", "val"), ("test", "test")):
        config.append(f"{stage}.concepts: {{images: {images}, identities: {out_dir / CELEBA_MAPPINGS[split]}, "
                      f"classnames: {names_file}}}   # or the images in place")
    return config


# -- ImageNet -------------------------------------------------------------------------------------


def prepare_imagenet(root: str, out: str, devkit: str | None = None, solution_csv: str | None = None,
                     shard_size: int = 1000) -> list[str]:
    """Write the ImageNet validation set into the new folder ``out``; return the config lines.

    The class list is open_clip's names of the classes that have images, in open_clip's order
    (every class of the official 50,000 images: all 1,000); labels index it."""
    images = imagenet_val_images(root, devkit, solution_csv)
    present = sorted({image.label for image in images})
    relabel = {label: index for index, label in enumerate(present)}
    names = imagenet_classnames()
    images = [type(image)(image.key, image.path, relabel[image.label]) for image in images]
    out_dir = Path(out)
    with new_output_dir(out_dir) as tmp:
        shards = write_labelled_shards(images, tmp, "val", shard_size)
        (tmp / IMAGENET_CLASSNAMES).write_text("\n".join(names[label] for label in present) + "\n")
        (tmp / IMAGENET_TEMPLATES).write_text("\n".join(imagenet_templates()) + "\n")
    partial = "" if len(present) == len(names) else f" (of {len(names)}: zero-shot among these {len(present)})"
    print(f"{len(images)} images of {len(present)} classes{partial} in {out_dir}")
    return [f"utility: {{shards: \"{brace_pattern([out_dir / p.name for p in shards])}\", "
            f"classnames: {out_dir / IMAGENET_CLASSNAMES}, templates: {out_dir / IMAGENET_TEMPLATES}}}"]


# -- UnlearnCanvas --------------------------------------------------------------------------------


def _classifier_record(task: str, classnames: list[str], weights: Path, arch: str, source: Path) -> dict:
    """The JSON of one classifier converted from ``source``: its architecture checked against the
    weights' shapes (built on the meta device: nothing is allocated), its image size read from them."""
    import torch
    from safetensors import safe_open

    from slug_pl.evaluation.architectures import ArchSpec, build_classifier

    with safe_open(str(weights), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    patch = shapes.get("patch_embed.proj.weight")
    tokens = shapes.get("pos_embed")
    if patch is None or tokens is None:
        raise ValueError(f"{source}: not a ViT checkpoint (no patch_embed.proj.weight / pos_embed); the "
                         f"benchmark's classifiers are timm's {UC_ARCH}")
    side = round((tokens[1] - 1) ** 0.5)
    image_size = side * patch[-1]
    record = {"library": "timm", "name": arch}
    with torch.device("meta"):
        default = build_classifier(ArchSpec.from_record(record, str(source)), len(classnames))
        patch_embed = getattr(default, "patch_embed", None)  # timm's ViTs have one; its img_size is (H, W)
        built_size = None if patch_embed is None else getattr(patch_embed, "img_size", None)
        if built_size is not None and tuple(built_size) != (image_size, image_size):
            record["kwargs"] = {"img_size": image_size}
        model = build_classifier(ArchSpec.from_record(record, str(source)), len(classnames))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    differ = sorted(n for n in expected.keys() | shapes.keys() if expected.get(n) != shapes.get(n))
    if differ:
        first = differ[0]
        raise ValueError(f"{source}: the {task} classifier is not timm's {arch} with {len(classnames)} classes "
                         f"({len(differ)} tensors differ, e.g. {first}: {shapes.get(first)} in the checkpoint, "
                         f"{expected.get(first)} in {arch}); give its architecture with --arch")
    return {"task": task, "classnames": classnames, "arch": record, "weights": weights.name,
            "image_size": image_size, "mean": UC_NORMALIZATION, "std": UC_NORMALIZATION}


def prepare_unlearncanvas(classifiers: str, out: str, root: str | None = None, styles: Sequence[str] | None = None,
                          arch: str = UC_ARCH) -> list[str]:
    """Convert the benchmark's classifiers and write their JSONs and the run's style list into the
    new folder ``out``; return the config lines."""
    from slug_pl.convert import convert_checkpoint
    from slug_pl.data.unlearncanvas import SEED_IMAGES, UC_OBJECTS, UC_STYLES, read_layout

    styles = list(UC_STYLES if not styles else styles)
    classnames = {"style": sorted([*UC_STYLES, SEED_IMAGES]), "object": sorted(UC_OBJECTS)}
    unknown = [s for s in styles if s not in classnames["style"]]
    if unknown:
        raise ValueError(f"--styles {unknown}: not a style of the benchmark's classifier (its styles: "
                         f"{', '.join(UC_STYLES[:4])}, ... {SEED_IMAGES}: slug_pl.data.unlearncanvas.UC_STYLES)")
    if root is not None:
        read_layout(root, styles)  # every style a folder holding the same objects, or a LayoutError
    folder = Path(classifiers).expanduser()
    sources = {task: folder / name for task, name in UC_CHECKPOINTS.items()}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"classifier checkpoint(s) not found: {', '.join(missing)}; give the release's "
                                f"cls_model folder (holding {' and '.join(UC_CHECKPOINTS.values())})")
    out_dir = Path(out)
    with new_output_dir(out_dir) as tmp:
        for task, source in sources.items():
            weights = convert_checkpoint(source, tmp / f"{task}.safetensors")
            record = _classifier_record(task, classnames[task], weights, arch, source)
            (tmp / f"{task}.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / UC_STYLES_FILE).write_text("\n".join(styles) + "\n")
    print(f"the style and object classifiers and {len(styles)} styles in {out_dir}")
    return [f"target: style_classifier: {out_dir / 'style.json'}, object_classifier: {out_dir / 'object.json'}",
            f"data: styles: {out_dir / UC_STYLES_FILE}"]


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``prepare`` subcommands and their options."""
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{celeba,imagenet,unlearncanvas}")
    celeba = sub.add_parser("celeba", help="CelebA identities: disjoint validation and test concept sets",
                            description="The identities to forget plus others, each with disjoint validation and "
                                        "test images, as labelled shards and per-split mapping files.")
    celeba.add_argument("--images", required=True, help="the image folder (img_align_celeba)")
    celeba.add_argument("--identities", required=True,
                        help="image -> identity file: identity_CelebA.txt (ids), or a list mapping images to names")
    celeba.add_argument("--names", help="identity id -> name file ('2880 Jane Doe' per line); omit when "
                                        "--identities maps images to names")
    celeba.add_argument("--include", action="append", default=[], metavar="NAME",
                        help="an identity to forget; repeatable")
    celeba.add_argument("--others", type=int, default=100, help="identities besides --include (retain accuracy)")
    celeba.add_argument("--others-from", metavar="FILE",
                        help="pick the others in this file's order (one name per line), not at random")
    celeba.add_argument("--val", type=int, default=10, help="validation images per identity")
    celeba.add_argument("--test", type=int, default=10, help="test images per identity (disjoint from --val)")
    celeba.add_argument("--seed", type=int, default=0, help="seed of the choice of identities and images")
    celeba.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    celeba.add_argument("--out", required=True, help="new output folder")

    imagenet = sub.add_parser("imagenet", help="ImageNet validation images: the utility set",
                              description="The validation images as labelled shards with open_clip's class names "
                                          "and prompt templates.")
    imagenet.add_argument("--root", required=True, help="the validation images (wnid folders, or flat)")
    imagenet.add_argument("--devkit", help="ILSVRC2012_devkit_t12 folder (labels of flat files)")
    imagenet.add_argument("--solution-csv", help="Kaggle's LOC_val_solution.csv (labels of flat files)")
    imagenet.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    imagenet.add_argument("--out", required=True, help="new output folder")

    canvas = sub.add_parser("unlearncanvas", help="UnlearnCanvas: the benchmark's classifiers and the run's styles",
                            description="Convert the benchmark's style and object classifiers (torch pickles, read "
                                        "as weights only) to safetensors, describe them, and list the run's styles.")
    canvas.add_argument("--classifiers", required=True,
                        help=f"the release's cls_model folder ({' and '.join(UC_CHECKPOINTS.values())})")
    canvas.add_argument("--root", help="the UnlearnCanvas images (<root>/<Style>/<Object>/<n>.jpg): the styles "
                                       "are checked against it")
    canvas.add_argument("--styles", nargs="+", metavar="STYLE",
                        help="the styles of the run (default: the 50 of the published experiments)")
    canvas.add_argument("--arch", default=UC_ARCH,
                        help=f"the classifiers' timm architecture (default: the benchmark's {UC_ARCH})")
    canvas.add_argument("--out", required=True, help="new output folder")
    return parser


def run(args: argparse.Namespace) -> int:
    """Prepare ``args.dataset``; print the config lines. Anticipated errors reach the caller."""
    if args.dataset == "celeba":
        lines = prepare_celeba(args.images, args.identities, args.names, args.include, args.others, args.val,
                               args.test, args.out, args.seed, args.others_from, args.shard_size)
    elif args.dataset == "imagenet":
        lines = prepare_imagenet(args.root, args.out, args.devkit, args.solution_csv, args.shard_size)
    else:
        lines = prepare_unlearncanvas(args.classifiers, args.out, args.root, args.styles, args.arch)
    print("config:")
    for line in lines:
        print(f"  {line}")
    return 0
