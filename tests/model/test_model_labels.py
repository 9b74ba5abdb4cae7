"""ImageNet labels: 1000 Keras class names in output order, shipped inside the package."""

from __future__ import annotations

from importlib import resources

from framecast_server.model import IMAGENET_LABELS, imagenet_labels


def test_thousand_labels_in_index_order() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench"
    assert labels[1] == "goldfish"
    assert labels[207] == "golden_retriever"
    assert labels[281] == "tabby"
    assert labels[409] == "analog_clock"
    assert labels[954] == "banana"
    assert labels[999] == "toilet_tissue"
    # The two synsets ImageNet names alike keep their own indices.
    assert labels[134] == labels[517] == "crane"
    assert labels[638] == labels[639] == "maillot"
    assert all(name and name == name.strip() and ", " not in name for name in labels)


def test_labels_are_cached_and_exported() -> None:
    assert imagenet_labels() is imagenet_labels()
    assert IMAGENET_LABELS is imagenet_labels()


def test_label_file_is_package_data() -> None:
    data = resources.files("framecast_server.model").joinpath("imagenet_labels.txt")
    assert data.is_file()
    assert len(data.read_text(encoding="utf-8").splitlines()) == 1000
