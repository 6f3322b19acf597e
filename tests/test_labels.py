"""Class labels: ids, names, ImageNet synonyms for the official 1000-class models, one-line errors."""

import pytest

from flowar.errors import FlowARError
from flowar.sampling.labels import ClassNames, class_names_for, imagenet, label_ids, parse_labels, split_class_names


def test_imagenet_names_and_synonyms_give_the_class_id():
    n = imagenet()
    assert len(n) == 1000 and n[0] == "tench" and n[999] == "toilet tissue"
    for name in ("great grey owl", "great gray owl", "Strix nebulosa", "Great  Grey Owl"):
        assert n.lookup(name) == 24, name
    assert n.lookup("white shark") == 2 and n.lookup("umbrella") == 879 and n.lookup("golden retriever") == 207


def test_a_typo_names_the_closest_and_an_ambiguous_name_the_ids():
    n = imagenet()
    with pytest.raises(FlowARError) as e:
        n.lookup("grey owl")
    assert "great grey owl" in str(e.value) and "\n" not in str(e.value)
    # a word first, and one name per class ("owl" was "howler or washbowl or soup bowl"; a class's
    # synonyms took two of the three places)
    with pytest.raises(FlowARError) as e:
        n.lookup("owl")
    assert str(e.value).endswith("Fix: did you mean 'great grey owl' or 'howler' or 'washbowl'?"), str(e.value)
    with pytest.raises(FlowARError) as e:      # a class's usual name before another's synonym (the red panda's)
        n.lookup("cat")
    assert str(e.value).endswith("Fix: did you mean 'tiger cat' or 'Persian cat' or 'Siamese cat'?"), str(e.value)
    with pytest.raises(FlowARError) as e:
        n.lookup("crane")                      # the bird (134) and the machine (517), said (both were "crane")
    assert "names 134 (crane: the bird); 517 (crane: the lifting machine). Fix: pass its class id: 134 or 517" in str(e.value)
    with pytest.raises(FlowARError) as e:
        n.lookup("horn")                       # (told apart by their usual names: nothing added)
    assert "names 513 (cornet); 566 (French horn)." in str(e.value)


def test_names_apply_where_the_model_has_none_of_its_own():
    assert class_names_for(1000, None) is imagenet()
    assert class_names_for(10, None) is None
    own = class_names_for(1000, ["a"] * 999 + ["zebra"])
    assert own.lookup("zebra") == 999 and own[0] == "a"


def test_classes_option_keeps_names_with_commas_whole():
    n = imagenet()
    assert split_class_names("cat,dog") == ["cat", "dog"]
    assert split_class_names("tench; great grey owl, great gray owl, Strix nebulosa", n) == [
        "tench", "great grey owl, great gray owl, Strix nebulosa"]
    assert split_class_names(["great grey owl, great gray owl, Strix nebulosa"], n) == [
        "great grey owl, great gray owl, Strix nebulosa"]
    assert split_class_names(["tench", "goldfish,white shark"], n) == ["tench", "goldfish", "white shark"]
    assert parse_labels(1000, n, classes=["great grey owl, great gray owl, Strix nebulosa"]) == [24]
    assert parse_labels(1000, n, classes=("tench;Strix nebulosa",), n_per_class=2) == [0, 0, 24, 24]


def test_ids_and_names_mix_and_bad_ones_are_one_line():
    names = ClassNames.plain(["bear", "bird", "cat"])
    assert label_ids([2, "bird", "CAT"], 3, names) == [2, 1, 2]
    for bad, needle in (([3], "class ids in 0..2"), (["unicorn"], "a class name of this model"),
                        ([True], "class ids (int) or class names"), ([1.5], "class ids (int)")):
        with pytest.raises(FlowARError) as e:
            label_ids(bad, 3, names)
        assert needle in str(e.value), (bad, str(e.value))
    with pytest.raises(FlowARError, match="class names stored with the model"):
        label_ids(["cat"], 10, None)


def test_a_changed_class_list_is_told_by_its_first_moved_ids_and_its_counts():
    """A resumed run whose class folders changed is told how, short for 1000 names."""
    from flowar.sampling.labels import names_changed
    was = [f"c{i}" for i in range(1000)]
    now = was[:2] + ["new"] + was[3:500] + [f"x{i}" for i in range(500, 999)]
    assert names_changed(now, was) == "id 2 'new' (was 'c2'), id 500 'x500' (was 'c500'), id 501 'x501' (was 'c501'), " \
                                      "497 more, 999 classes, was 1000"
    assert names_changed(["a", "b", "c"], ["a", "b"]) == "3 classes, was 2"
