"""A deterministic synthetic image-caption corpus: coloured shapes in spatial relations.

Each image shows two shapes, one left of / right of / above / below the other, and carries
several phrasings of the same scene ("a red circle left of a blue square", "a blue square with
a red circle on its left", ...), so that retrieval must read word order and relations, not
only colours. Image ``i`` depends only on ``(seed, i)``: corpora of different sizes share
their first images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 175),
    "orange": (240, 135, 30),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_PHRASES = {
    "left of": ("{a} left of {b}", "{b} with {a} on its left", "{a} to the left of {b}"),
    "right of": ("{a} right of {b}", "{b} with {a} on its right", "{a} to the right of {b}"),
    "above": ("{a} above {b}", "{b} with {a} above it", "{a} on top of {b}"),
    "below": ("{a} below {b}", "{b} with {a} below it", "{a} underneath {b}"),
}

_PARTS = {
    "left of": ("on the left", "on the right"),
    "right of": ("on the right", "on the left"),
    "above": ("at the top", "at the bottom"),
    "below": ("at the bottom", "at the top"),
}


@dataclass(frozen=True)
class Scene:
    """Shape ``a`` stands in ``relation`` to shape ``b``."""

    a_colour: str
    a_shape: str
    relation: str
    b_colour: str
    b_shape: str

    @property
    def key(self) -> str:
        """A canonical name: the same for "A left of B" and "B right of A"."""
        a, b = f"{self.a_colour} {self.a_shape}", f"{self.b_colour} {self.b_shape}"
        if self.relation in ("right of", "below"):
            return f"{b}|{_OPPOSITE[self.relation]}|{a}"
        return f"{a}|{self.relation}|{b}"

    def captions(self) -> list[str]:
        a, b = _noun(self.a_colour, self.a_shape), _noun(self.b_colour, self.b_shape)
        return [p.format(a=a, b=b) for p in _PHRASES[self.relation]]

    def swapped(self) -> Scene:
        """The mirror scene: the same relation with the two shapes swapped ("B left of A")."""
        return Scene(self.b_colour, self.b_shape, self.relation, self.a_colour, self.a_shape)

    def part_captions(self) -> list[str]:
        """Where each shape is, one at a time ("a red circle on the left")."""
        a, b = _noun(self.a_colour, self.a_shape), _noun(self.b_colour, self.b_shape)
        where_a, where_b = _PARTS[self.relation]
        return [f"{a} {where_a}", f"{b} {where_b}"]


def _noun(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def random_scene(rng: np.random.Generator, relations: Sequence[str] = RELATIONS) -> Scene:
    colours, shapes = list(COLOURS), list(SHAPES)
    while True:
        a = (colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])
        b = (colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])
        if a != b:
            return Scene(a[0], a[1], relations[rng.integers(len(relations))], b[0], b[1])


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` on a lightly tinted background, with jittered positions and sizes."""
    bg = tuple(int(v) for v in rng.integers(200, 245, size=3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    near, far = rng.uniform(0.2, 0.35), rng.uniform(0.65, 0.8)
    across_a, across_b = rng.uniform(0.3, 0.7, size=2)
    if scene.relation in ("left of", "above"):
        along_a, along_b = near, far
    else:
        along_a, along_b = far, near
    horizontal = scene.relation in ("left of", "right of")
    for colour, shape, along, across in (
        (scene.a_colour, scene.a_shape, along_a, across_a),
        (scene.b_colour, scene.b_shape, along_b, across_b),
    ):
        cx, cy = (along, across) if horizontal else (across, along)
        r = size * rng.uniform(0.11, 0.16)
        _draw_shape(draw, shape, cx * size, cy * size, r, COLOURS[colour])
    return im


def mirror_pairs(n: int, seed: int, size: int = 64) -> tuple[list[str], list, list]:
    """``n`` random scenes as ``(captions, images, mirror images)``: one caption per scene (the
    phrasings in turn), an image of the scene and one of its mirror (the shapes swapped, same
    relation). A model that reads word order scores each caption higher with the first image;
    a bag-of-words model cannot tell them apart."""
    scenes = [random_scene(np.random.default_rng([seed, 1, i])) for i in range(n)]
    captions = [s.captions()[i % 3] for i, s in enumerate(scenes)]
    own = [render(s, size, np.random.default_rng([seed, 2, i])) for i, s in enumerate(scenes)]
    swapped = [
        render(s.swapped(), size, np.random.default_rng([seed, 3, i])) for i, s in enumerate(scenes)
    ]
    return captions, own, swapped


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def generate(
    out_dir: str | Path,
    n: int = 500,
    seed: int = 0,
    size: int = 64,
    twins: bool = False,
    parts: bool = False,
    relations: Sequence[str] = RELATIONS,
) -> Path:
    """Write ``n`` images and ``corpus.jsonl`` under ``out_dir``; return the corpus file's path.

    Each JSONL record holds the image, its captions and the scene as metadata
    (``scene``, ``relation``, colours and shapes), usable as filters and as ground truth.
    ``twins``: every odd image shows the previous one's scene with its two shapes swapped
    ("A left of B", then "B left of A"), both with the same ``pair`` field, so that a trainer
    keeping pairs in one batch (``retrieval train --batch-group pair``) sees word order as a
    hard negative; without them a model can score well as a bag of words.
    ``parts``: two more captions per image saying where each shape is ("a red circle on the
    left"), which tie colours and shapes to positions without relying on word order.
    ``relations``: draw scenes with these relations only; ``("left of", "above")`` gives a
    corpus where the first-named shape is always left or on top (a training curriculum's
    first stage: a model learns which shape is where before it must also learn that "A right
    of B" is "B left of A").
    """
    unknown = sorted(set(relations) - set(RELATIONS))
    if unknown or not relations:
        given = f"unknown relations {', '.join(unknown)}" if unknown else "no relations given"
        raise ValueError(f"{given}; known: {', '.join(RELATIONS)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        scene = None
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            # A twin shows the previous image's scene with its shapes swapped.
            scene = scene.swapped() if twins and i % 2 else random_scene(rng, relations)
            rel = f"images/{i:06d}.png"
            render(scene, size, rng).save(out / rel, optimize=False)
            record = {
                "id": f"synth-{seed}-{i:06d}",
                "image": rel,
                "captions": scene.captions() + (scene.part_captions() if parts else []),
                "scene": scene.key,
                "relation": scene.relation,
                "colours": sorted({scene.a_colour, scene.b_colour}),
                "shapes": sorted({scene.a_shape, scene.b_shape}),
                **({"pair": i // 2} if twins else {}),
            }
            f.write(json.dumps(record) + "\n")
    return corpus
