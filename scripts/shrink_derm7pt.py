"""Write a copy of a Derm7pt release with every image cropped (25 px) and resized to SIZE x SIZE.

Used to carry the dataset to a GPU machine (~50 MB at 299 px, JPEG q90); train on the copy with
`data.crop=0`. For local research only: the copy is derived data and must never be committed.
    python scripts/shrink_derm7pt.py ~/data/derm7pt gpu-data [299]
"""

import shutil
import sys
from pathlib import Path

from PIL import Image

from sevenpoint.data.derm7pt import find_release_root
from sevenpoint.data.images import crop_and_resize, open_rgb

src = find_release_root(Path(sys.argv[1]))
dst = Path(sys.argv[2]) / "release_v0"
size = int(sys.argv[3]) if len(sys.argv) > 3 else 299
shutil.copytree(src / "meta", dst / "meta", dirs_exist_ok=True)
for path in sorted((src / "images").rglob("*")):
    if path.is_file():
        out = dst / "images" / path.relative_to(src / "images")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop_and_resize(open_rgb(path), size, 25)).save(out, "JPEG", quality=90)
print(f"wrote {dst}")
