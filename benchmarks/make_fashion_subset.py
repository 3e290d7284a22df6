"""Regenerates the embedded Fashion-MNIST subset in gcsurgery/assets/ from the full IDX files.

    python benchmarks/make_fashion_subset.py [--src /usr/share/datasets/fashion-mnist] [--out gcsurgery/assets]

It keeps 600 training and 100 test images of each class (6000 / 1000), chosen by
``gcsurgery.harness.loader.balanced_subset`` with seed 0, unchanged and in their original order, and writes
them as gzip IDX files. The same inputs give byte-identical files.
"""

import argparse
from pathlib import Path

from gcsurgery.harness.data import (
    DEBIAN_FASHION_MNIST,
    EMBEDDED_PREFIX,
    FASHION_FILES,
    find_fashion_files,
    read_idx,
    write_idx,
)
from gcsurgery.harness.loader import balanced_subset

TRAIN_PER_CLASS, TEST_PER_CLASS, SEED = 600, 100, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEBIAN_FASHION_MNIST, help="directory with the full IDX files")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "gcsurgery" / "assets")
    args = parser.parse_args()
    files = find_fashion_files(args.src)
    if files is None:
        raise SystemExit(f"no Fashion-MNIST IDX files ({', '.join(FASHION_FILES)}) in {args.src}")
    for i, per_class in ((0, TRAIN_PER_CLASS), (2, TEST_PER_CLASS)):
        images, labels = read_idx(files[i], ndim=3), read_idx(files[i + 1], ndim=1)
        keep = balanced_subset(labels.long(), per_class=per_class, seed=SEED)
        for name, data in ((FASHION_FILES[i], images[keep]), (FASHION_FILES[i + 1], labels[keep])):
            path = args.out / f"{EMBEDDED_PREFIX}{name}.gz"
            write_idx(path, data)
            print(f"{path}: {tuple(data.shape)}, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
