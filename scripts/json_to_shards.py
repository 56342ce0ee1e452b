"""Turn ALBEF JSON lists (and their images) into WebDataset shards for `train_shards`.

    python scripts/json_to_shards.py data/demo/pretrain.json data/demo/shards --image_root data/demo

Writes OUT_DIR/000000.tar, 000001.tar, ... in img2dataset's layout: per entry `KEY.<image ext>` (the
file's bytes unchanged), `KEY.json` (the entry: `image`, `caption` str or list, other fields) and
`KEY.txt` (the caption; the first of a list), KEY the entry's position as 9 digits. Prints the
`train_shards` pattern and `train_samples_per_epoch` to put in the config.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.shards import write_shards  # noqa: E402


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotation", nargs="+", help="ALBEF JSON list(s) of {'image': path, 'caption': str | [str]}")
    p.add_argument("out_dir")
    p.add_argument("--image_root", default="", help="prefix of relative image paths (as the config's image_root)")
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    args = p.parse_args(argv)
    paths, count = write_shards(args.annotation, args.out_dir, args.image_root or None, args.shard_size)
    pattern = os.path.join(args.out_dir, f"{{000000..{len(paths) - 1:06d}}}.tar")
    print(f"wrote {count} samples in {len(paths)} shards of up to {args.shard_size}")
    print(f"train_shards: '{pattern}'\ntrain_samples_per_epoch: {count}")
    return paths


if __name__ == "__main__":
    main()
