"""Training data of the zoo: the base's generic corpus and each expert's (prompt, answer) pairs.

Everything is drawn from ``random.Random`` instances seeded from the build seed, and every doc
that an eval task scores (any split) is skipped, so the eval splits stay unseen.
"""

from __future__ import annotations

import random
from types import ModuleType

from . import data_format, data_generic
from .tasks import SKILLS, eval_keys


class FreshDocs:
    """Draws skill docs that are not in any eval split (keys read from the shipped task data)."""

    def __init__(self) -> None:
        self._excluded = {SKILLS[s].TASK: eval_keys(s) for s in SKILLS}

    def __call__(self, mod: ModuleType, rng: random.Random) -> dict:
        excluded = self._excluded[mod.TASK]
        while True:
            doc = mod.make_doc(rng)
            if mod.doc_key(doc) not in excluded:
                return doc


def base_texts(n: int, seed: int, fresh: FreshDocs) -> list[str]:
    """``n`` generic documents for pretraining the base."""
    rng = random.Random(f"base/{seed}")
    return [data_generic.make_text(rng, fresh) for _ in range(n)]


def skill_pairs(skill: str, n: int, seed: int, fresh: FreshDocs) -> list[tuple[str, str]]:
    """``n`` (context, continuation) training pairs of one skill; loss goes on the continuation."""
    mod = SKILLS[skill]
    rng = random.Random(f"{skill}/train/{seed}")
    pairs = []
    for _ in range(n):
        doc = fresh(mod, rng)
        if mod is data_format:
            pairs.append(data_format.training_pair(doc))
        else:
            pairs.append((mod.render_context(doc), mod.render_answer(doc)))
    return pairs


def tokenizer_texts(n: int, seed: int, fresh: FreshDocs) -> list[str]:
    """Texts for training the tokenizer: generic documents plus every skill's full examples."""
    texts = base_texts(n, seed + 1_000_003, fresh)
    for skill in SKILLS:
        texts += [c + t for c, t in skill_pairs(skill, n // 4, seed + 7, fresh)]
    return texts
