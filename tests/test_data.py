"""Training data: both labelling schemes, and a held-out split that training never sees."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from amskv_jax.train import data

SIZE = 8  # rendering is at 128 px whatever the size; a small size keeps the arrays small


@pytest.fixture(scope="module", params=data.SCHEMES)
def splits(request):
    return {split: data.load_emoji_set(SIZE, request.param, split) for split in data.SPLITS}


def test_heldout_never_overlaps_train_and_both_cover_the_set(splits):
    train, heldout, full = (set(splits[s].sequences) for s in ("train", "heldout", "all"))
    assert train.isdisjoint(heldout)
    assert train | heldout == full
    assert len(full) == len(splits["all"].sequences)  # no emoji twice
    # all skin tones of an emoji fall on one side
    bases = [{data.base_sequence(s) for s in splits[k].sequences} for k in ("train", "heldout")]
    assert bases[0].isdisjoint(bases[1])


def test_heldout_is_about_a_tenth_of_every_class(splits):
    total = collections.Counter(splits["all"].labels.tolist())
    held = collections.Counter(splits["heldout"].labels.tolist())
    for label, n in total.items():
        if n >= 50:
            assert 0.06 <= held[label] / n <= 0.14, (splits["all"].classes[label], held[label], n)
        assert held[label] < n


def test_split_images_are_the_rows_of_the_full_set(splits):
    full = splits["all"]
    row = {s: i for i, s in enumerate(full.sequences)}
    for split in ("train", "heldout"):
        part = splits[split]
        index = np.asarray([row[s] for s in part.sequences])
        np.testing.assert_array_equal(part.images, full.images[index])
        np.testing.assert_array_equal(part.labels, full.labels[index])


def test_heldout_split_does_not_depend_on_the_order_of_the_emoji():
    full = data.load_emoji_set(SIZE, "unicode")
    held = data.held_out_mask(full.sequences, full.labels)
    order = np.random.default_rng(0).permutation(len(full.labels))
    shuffled = data.held_out_mask(tuple(full.sequences[i] for i in order), full.labels[order])
    np.testing.assert_array_equal(shuffled, held[order])


def test_unicode_scheme_has_at_least_ten_classes_of_a_hundred_emoji():
    full = data.load_emoji_set(SIZE, "unicode")
    counts = collections.Counter(full.labels.tolist())
    assert len(full.classes) >= 10 and sorted(counts) == list(range(len(full.classes)))
    assert min(counts.values()) >= 100, dict(zip(full.classes, (counts[k] for k in range(len(full.classes)))))
    assert len(full.labels) > 3000


def test_unicode_classes_follow_emoji_test_groups_and_subgroups():
    names = data.class_names("unicode")
    assert names[data.unicode_class_of("Smileys & Emotion", "face-smiling")] == "smileys"
    assert names[data.unicode_class_of("People & Body", "family")] == "families"
    assert names[data.unicode_class_of("Activities", "sport")] == "objects"
    assert data.unicode_class_of("Component", "skin-tone") is None
    full = data.load_emoji_set(SIZE, "unicode")
    label = {s: int(y) for s, y in zip(full.sequences, full.labels)}
    assert names[label["\U0001F600"]] == "smileys"  # grinning face
    assert names[label["\U0001F44D\U0001F3FD"]] == "hands"  # thumbs up, medium skin tone
    assert names[label["\U0001F1EB\U0001F1F7"]] == "flags"


def test_ranges_scheme_keeps_the_embedded_models_classes():
    full = data.load_emoji_set(SIZE, "ranges")
    assert full.classes == data.GROUP_NAMES and len(data.GROUP_NAMES) == 10
    assert sorted(set(full.labels.tolist())) == list(range(10))
    assert all(data.group_of(s) == y for s, y in zip(full.sequences, full.labels))


def test_bad_scheme_or_split_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="ranges, unicode"):
        data.load_emoji_set(SIZE, "emojipedia")
    with pytest.raises(ValueError, match="all, train, heldout"):
        data.load_emoji_set(SIZE, "ranges", "test")
