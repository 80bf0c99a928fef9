"""Build the CelebA validation and test sets of the recipe (configs/clip_vit_b32_laion.yaml) as
labelled shards: the identities to forget plus N others, disjoint validation / test images.

    python scripts/celeba_to_shards.py --images celeba/img_align_celeba \
        --identities celeba/identity_CelebA.txt --names celeba/identity_names.txt \
        --include "Elon Musk" --others 100 --val 10 --test 10 --out data/celeba

CelebA's identity_CelebA.txt maps images to numeric ids; zero-shot prompts need names, so give a
file mapping each id to a name (``2880 Jane Doe`` per line; .txt/.csv/.tsv/.json), or an identity
file that maps images to names directly and no --names. Writes into the new folder --out:
celeba_names.txt (the class list), val-000000.tar ..., test-000000.tar ... (see
slug_pl.data.build_labelled), and prints the config lines that use them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slug_pl.data.build_labelled import brace_pattern, celeba_splits, new_output_dir, write_labelled_shards
from slug_pl.errors import ANTICIPATED, error_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celeba_to_shards.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="the image folder (img_align_celeba)")
    parser.add_argument("--identities", required=True, help="image -> identity file (identity_CelebA.txt)")
    parser.add_argument("--names", help="identity id -> name file (omit if --identities maps to names)")
    parser.add_argument("--include", action="append", default=[], help="an identity to forget; repeatable")
    parser.add_argument("--others", type=int, default=100, help="identities besides --include (retain accuracy)")
    parser.add_argument("--val", type=int, default=10, help="validation images per identity")
    parser.add_argument("--test", type=int, default=10, help="test images per identity (disjoint from --val)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of identities and images")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--out", required=True, help="new output folder")
    args = parser.parse_args(argv)
    try:
        splits = celeba_splits(args.images, args.identities, args.names, args.include, args.others,
                               (args.val, args.test), args.seed)
        out = Path(args.out)
        with new_output_dir(out) as tmp:
            (tmp / "celeba_names.txt").write_text("\n".join(splits.classnames) + "\n")
            shards = {name: write_labelled_shards(images, tmp, name, args.shard_size)
                      for name, images in (("val", splits.validation), ("test", splits.test))}
    except ANTICIPATED as err:
        print(f"celeba_to_shards.py: error: {error_message(err)}", file=sys.stderr)
        return 2
    print(f"{len(splits.classnames)} identities, {len(splits.validation)} validation and "
          f"{len(splits.test)} test images in {out}; config:")
    for stage, name in (("validation", "val"), ("test", "test")):
        pattern = brace_pattern([out / p.name for p in shards[name]])
        print(f"  {stage}.concepts: {{shards: {pattern}, classnames: {out / 'celeba_names.txt'}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
