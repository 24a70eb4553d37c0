"""Write tether/data/digits.npz, the built-in digits, from scikit-learn's bundled copy.

scikit-learn ships UCI's optical digits as `sklearn/datasets/data/digits.csv.gz`: 1797 rows of
64 pixel values in 0..16, then the label. Tether ships the same values in the same order as two
uint8 arrays, `pixels` (1797, 64) and `labels` (1797,), so that `--dataset digits` needs no
scikit-learn and trains on exactly the bits it did when it read the CSV. Needs scikit-learn
(the `test` extra) to run.

    python scripts/gen_digits.py            # rewrite the file
    python scripts/gen_digits.py --check    # exit 1 when its arrays differ from scikit-learn's
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tether" / "data" / "digits.npz"


def from_sklearn() -> dict[str, np.ndarray]:
    # find_spec finds the CSV without importing scikit-learn itself.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("scikit-learn is not installed: pip install -e '.[test]'")
    root = Path(next(iter(spec.submodule_search_locations)))
    table = np.loadtxt(root / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    pixels, labels = table[:, :-1], table[:, -1]
    for name, values in (("pixels", pixels), ("labels", labels)):
        whole = np.array_equal(values, np.round(values))
        if not (whole and 0 <= values.min() <= values.max() <= 16):
            sys.exit(f"scikit-learn's digits have {name} that are not integers in 0..16")
    return {"pixels": pixels.astype(np.uint8), "labels": labels.astype(np.uint8)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    arrays = from_sklearn()
    if args.check:
        with np.load(OUT, allow_pickle=False) as npz:
            same = sorted(npz.files) == sorted(arrays) and all(
                npz[k].dtype == v.dtype and np.array_equal(npz[k], v) for k, v in arrays.items()
            )
        verdict = "the same as" if same else "DIFFERS from"
        print(f"{OUT.relative_to(ROOT)}: {verdict} scikit-learn's")
        return 0 if same else 1
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
