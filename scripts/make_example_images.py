"""Write the demo's example images to assets/examples/ (scenes, one clip art, one photo crop).

Usage: python scripts/make_example_images.py [--out assets/examples]
Also writes captions.jsonl there, so the folder itself works as an ImageFolderSource.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from evotok.data import ClipArtSource, PhotoCropSource, SceneWorld
from evotok.data.sources import CLIPART_ROOT

SIDE = 256
CLIPART_FILE = "food/fruit/apple.png"
PHOTO = "chelsea"


def first_scene_of(world: SceneWorld, scene_type: str, min_objects: int = 1) -> int:
    for i in range(10_000):
        scene = world.scene(i)
        if scene.scene_type == scene_type and len(scene.objects) >= min_objects:
            return i
    raise RuntimeError(f"no {scene_type} scene found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/examples")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    world = SceneWorld(resolution=SIDE, seed=0, split="train")
    for name, scene_type, min_objects in (
        ("scene_position.png", "position", 2),
        ("scene_counting.png", "counting", 3),
        ("scene_colours.png", "colour_attribution", 2),
    ):
        sample = world[first_scene_of(world, scene_type, min_objects)]
        sample.image.save(out / name, optimize=True)
        rows.append({"file": name, "caption": sample.caption, "source": "scenes"})

    clipart = ClipArtSource(root=CLIPART_ROOT, resolution=SIDE, seed=0, split="train")
    pos = next(k for k, (rel, _) in enumerate(clipart.files) if rel == CLIPART_FILE)
    index = int(list(clipart._order).index(pos))
    sample = clipart[index]
    sample.image.save(out / "clipart_apple.png", optimize=True)
    rows.append({"file": "clipart_apple.png", "caption": sample.caption, "source": "clipart"})

    photos = PhotoCropSource(seed=0, crop_fraction=(0.9, 1.0), resolution=SIDE, names=[PHOTO])
    sample = photos[0]
    sample.image.save(out / "photo_chelsea.png", optimize=True)
    rows.append({"file": "photo_chelsea.png", "caption": sample.caption, "source": "photos"})

    with open(out / "captions.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    for row in rows:
        print(f"{row['file']}: {row['caption']}")


if __name__ == "__main__":
    main()
