"""Shared vocabulary of the toy world: the same words appear in every skill and in the base corpus.

Sharing words (not only formats) keeps the experts' task vectors about *skills*: the base already
knows every token, so fine-tuning only has to change what is predicted after a given prompt.
"""

from __future__ import annotations

import random

COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
NOUNS = ["box", "ball", "cup", "book", "lamp", "key", "hat", "shoe", "chair", "vase", "pen", "bag"]
RELATIONS = ["left", "right", "above", "below"]
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# How a relation reads inside a story sentence.
PHRASE = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal"]
VERBS = ["sees", "holds", "moves", "finds", "likes", "drops"]
SIZES = ["small", "big", "old", "new", "clean", "heavy"]


def entity(rng: random.Random) -> str:
    """A random ``colour noun`` pair, e.g. ``red box``."""
    return f"{rng.choice(COLORS)} {rng.choice(NOUNS)}"


def distinct_entities(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct entities (no two share colour *and* noun)."""
    out: list[str] = []
    while len(out) < n:
        e = entity(rng)
        if e not in out:
            out.append(e)
    return out
