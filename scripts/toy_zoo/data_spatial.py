"""Skill 1, spatial reasoning in spartqa-mchoice form.

A doc mirrors a row of ``metaeval/spartqa-mchoice`` (``story``, ``question``, ``candidate_answers``,
``answer`` = index of the right candidate), so the users' ``preprocess_spartqa.doc_to_text`` renders
it unchanged: a two-sentence story (one placing an object left/right/above/below another, one
about something else), a question about the placed pair, four lettered options and the answer
letter. Deliberately easy: the options keep a fixed order and the question keeps the story's
direction. Measured on 2 CPU cores, shuffled options, inverted questions or two placements to
choose from are not learned in a few hundred steps (the expert plateaus at "copy the first
relation"), and the whole zoo must build in minutes.
"""

from __future__ import annotations

import random

from .words import NAMES, NOUNS, PHRASE, RELATIONS, SIZES, VERBS

TASK = "toy_spatial"
LETTERS = "ABCD"


def make_doc(rng: random.Random) -> dict:
    """One spatial question: a story with one placement among other sentences, asked about."""
    a, b, c = rng.sample(NOUNS, 3)
    relation = rng.choice(RELATIONS)
    filler = rng.choice([f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {c}.", f"The {c} is {rng.choice(SIZES)}."])
    sentences = [f"The {a} is {PHRASE[relation]} the {b}.", filler]
    rng.shuffle(sentences)
    return {
        "story": " ".join(sentences),
        "question": f"Where is the {a} relative to the {b}?",
        "candidate_answers": list(RELATIONS),
        "answer": RELATIONS.index(relation),
    }


def doc_key(doc: dict) -> str:
    """Identity of a doc for the train/search/held-out disjointness checks."""
    return doc["story"] + "|" + doc["question"]


def render_context(doc: dict) -> str:
    """The prompt, exactly as ``preprocess_spartqa.doc_to_text`` renders it."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(doc["candidate_answers"]))
    return f"Context:\n{doc['story']}\n\nQuestion: {doc['question']}\n{options}\nAnswer:"


def render_answer(doc: dict) -> str:
    """The scored continuation (lm-eval's default target delimiter is one space)."""
    return " " + LETTERS[doc["answer"]]


def random_answer(doc: dict, rng: random.Random) -> str:
    """A letter drawn at random: the base corpus shows the format but not the skill."""
    return " " + rng.choice(LETTERS)
