"""Build the ImageNet validation set of the recipe (configs/clip_vit_b32_laion.yaml) as labelled
shards, with open_clip's class names and prompt templates beside them.

    # images sorted into wnid folders (val/n01440764/*.JPEG):
    python scripts/imagenet_to_shards.py --root imagenet/val --out data/imagenet
    # the official flat folder with the devkit's ground truth:
    python scripts/imagenet_to_shards.py --root ILSVRC2012_img_val --devkit ILSVRC2012_devkit_t12 --out data/imagenet
    # the flat folder with Kaggle's LOC_val_solution.csv:
    python scripts/imagenet_to_shards.py --root ILSVRC/Data/CLS-LOC/val --solution-csv LOC_val_solution.csv --out data/imagenet

Labels are indices into the sorted wnids, the order of open_clip's ImageNet class names. Writes
into the new folder --out: val-000000.tar ... (1,000 images each by default),
imagenet_classes.txt and imagenet_templates.txt (open_clip's 80 OpenAI templates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slug_pl.data.build_labelled import brace_pattern, imagenet_val_images, new_output_dir, write_labelled_shards
from slug_pl.data.layouts import imagenet_classnames, imagenet_templates
from slug_pl.errors import ANTICIPATED, error_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagenet_to_shards.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the validation images (wnid folders or flat)")
    parser.add_argument("--devkit", help="ILSVRC2012_devkit_t12 folder (labels of flat files)")
    parser.add_argument("--solution-csv", help="Kaggle LOC_val_solution.csv (labels of flat files)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--out", required=True, help="new output folder")
    args = parser.parse_args(argv)
    try:
        images = imagenet_val_images(args.root, args.devkit, args.solution_csv)
        out = Path(args.out)
        with new_output_dir(out) as tmp:
            shards = write_labelled_shards(images, tmp, "val", args.shard_size)
            (tmp / "imagenet_classes.txt").write_text("\n".join(imagenet_classnames()) + "\n")
            (tmp / "imagenet_templates.txt").write_text("\n".join(imagenet_templates()) + "\n")
    except ANTICIPATED as err:
        print(f"imagenet_to_shards.py: error: {error_message(err)}", file=sys.stderr)
        return 2
    print(f"{len(images)} images of {len({i.label for i in images})} classes in {out}; config:")
    print(f"  utility: {{shards: {brace_pattern([out / p.name for p in shards])}, "
          f"classnames: {out / 'imagenet_classes.txt'}, templates: {out / 'imagenet_templates.txt'}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
