"""Prompt of the spartqa-mchoice tasks (``spartqa_train`` and the toy ``toy_spatial``)."""


def doc_to_text(doc: dict) -> str:
    """Story, question and lettered options, ending in ``Answer:`` (the letter is the choice)."""
    options = "\n".join(f"{'ABCD'[i]}. {answer}" for i, answer in enumerate(doc["candidate_answers"]))
    return f"Context:\n{doc['story']}\n\nQuestion: {doc['question']}\n{options}\nAnswer:"
