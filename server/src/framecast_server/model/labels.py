"""ImageNet-1k class names in model output order.

The names are Keras' ``imagenet_class_index.json`` (as kept in pytorch/hub's
``imagenet_classes.txt``): short, underscore-joined names such as ``tabby`` or
``golden_retriever``. Two names repeat in that list (``crane`` at 134 and 517, ``maillot`` at
638 and 639) because ImageNet has two synsets for each; the index, not the name, is the class.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

NUM_CLASSES = 1000

_LABELS_FILE = "imagenet_labels.txt"


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """Return the 1000 ImageNet class names, index ``i`` naming output ``i``.

    Read once from the package data file; raises RuntimeError if the installed file is damaged,
    since every prediction would then be mislabelled.
    """
    text = (
        resources.files(__name__.rpartition(".")[0])
        .joinpath(_LABELS_FILE)
        .read_text(encoding="utf-8")
    )
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != NUM_CLASSES:
        raise RuntimeError(
            f"{_LABELS_FILE} holds {len(names)} class names, expected {NUM_CLASSES}; "
            "the framecast-server installation is damaged"
        )
    return names


IMAGENET_LABELS: tuple[str, ...] = imagenet_labels()
