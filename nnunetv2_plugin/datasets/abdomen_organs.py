"""The 13 abdominal organs of the paper's two datasets, in FLARE22's label order.

Both `Dataset701_AbdomenCT` (FLARE22) and `Dataset702_AbdomenMR` (AMOS22 MR, remapped) use these
names with the values 1..13, so a model, its plans and the evaluation table read the same everywhere.
"""
from __future__ import annotations

import re
from typing import Dict

ABDOMEN_ORGANS: tuple[str, ...] = (
    "liver",
    "right kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior vena cava",
    "right adrenal gland",
    "left adrenal gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left kidney",
)


def abdomen_labels() -> Dict[str, int]:
    """nnU-Net v2 ``labels`` entry: ``{"background": 0, "liver": 1, ..., "left kidney": 13}``."""
    labels = {"background": 0}
    labels.update({name: value for value, name in enumerate(ABDOMEN_ORGANS, start=1)})
    return labels


def normalize_label_name(name: str) -> str:
    """Lower case with everything but letters and digits removed: ``"Gall Bladder"`` -> ``"gallbladder"``.

    Label names in public datasets vary in case, spaces, underscores and brackets; comparing the
    normalised forms matches ``"right_kidney"``, ``"Right Kidney"`` and ``"right kidney"``.
    """
    return re.sub(r"[^a-z0-9]", "", name.lower())
