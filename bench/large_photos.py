"""12-megapixel JPEGs from the ants/bees photos, for decoder benchmarks and accuracy checks.

Every `step`-th image of each class folder (train and val) is fitted (centre crop to 4:3, Lanczos)
to 4032 x 3024 (3024 x 4032 for portrait photos), the size of a phone camera's photo, and saved as
a baseline JPEG at `quality` with 4:2:0 chroma subsampling. An upscaled photo has less fine detail
than a real 12 MP one; a decoder that drops detail loses less here than it would there.

    python bench/large_photos.py /tmp/hymenoptera_12mp --step 2     # 199 photos, about 1.5 GB
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageOps

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
SIZE = (4032, 3024)


def make_large_photos(src: Path, dst: Path, step: int = 2, size: tuple[int, int] = SIZE, quality: int = 90,
                      limit: int | None = None) -> int:
    """dst/<split>/<class>/<name>: every `step`-th photo of src at `size` (portrait: swapped); returns the
    count. Files already there are kept (the folder is made once)."""
    n = 0
    for folder in sorted(p for p in Path(src).glob("*/*") if p.is_dir()):
        split, cls = folder.parent.name, folder.name
        for path in sorted(p for p in folder.iterdir() if p.is_file())[::step][:limit]:
            target = Path(dst) / split / cls / (path.stem + ".jpg")
            n += 1
            if target.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                wh = size if im.width >= im.height else size[::-1]
                ImageOps.fit(im, wh, Image.Resampling.LANCZOS).save(target, quality=quality, subsampling=2)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dst")
    ap.add_argument("--src", default=str(ASSETS / "hymenoptera_data"))
    ap.add_argument("--step", type=int, default=2)
    args = ap.parse_args()
    print(make_large_photos(Path(args.src), Path(args.dst), args.step), "photos in", args.dst)


if __name__ == "__main__":
    main()
