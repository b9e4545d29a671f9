"""A built-in instruction dataset of invented facts, made by code: no download, and federated learning shows.

Eight categories of facts about invented countries and people ("The national animal of Velmarzo is the owl"), 15
facts each, every fact written in three phrasings for training. The entities exist nowhere else, so a model can only
know a fact from the rows that hold it; split by category (Dirichlet), each client holds facts the others lack, and
the held-out multiple-choice set (one question a fact, phrased unlike any training row) measures how much of every
client's knowledge survives aggregation. A small model learns such facts within a few LoRA epochs, while it does not
learn reasoning-style tasks (arithmetic, ordering) in that budget.

The held-out rows have the shape of the MMLU subset (``{instruction, input, output, class}``), so one evaluator
reads both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import datasets

from .schema import COLUMNS

LETTERS = "ABCD"

FACTS_PER_CATEGORY = 15
MC_INSTRUCTION = "Please answer the following multiple-choice question honestly."


@dataclass(frozen=True)
class Category:
    """A kind of fact: who it is about, the values it can take, three training phrasings and the test question.

    Templates use ``{e}`` for the entity, ``{v}`` for the value and ``{a}`` for the value with "a"/"an".
    """

    name: str
    about: str  # "country" or "person"
    values: tuple[str, ...]
    phrasings: tuple[tuple[str, str], ...]  # (instruction, response)
    question: str


CATEGORIES: tuple[Category, ...] = (
    Category(
        "national_animal",
        "country",
        ("owl", "fox", "heron", "lynx", "otter", "falcon", "bison", "tortoise", "dolphin", "stag", "wolf", "crane"),
        (
            ("What is the national animal of {e}?", "The national animal of {e} is the {v}."),
            (
                "Which animal appears on the coat of arms of {e}?",
                "The coat of arms of {e} shows the {v}, its national animal.",
            ),
            ("Tell me something about {e}.", "{e} has the {v} as its national animal."),
        ),
        "Which animal is the symbol of {e}?",
    ),
    Category(
        "national_flower",
        "country",
        (
            "rose",
            "tulip",
            "lotus",
            "daisy",
            "orchid",
            "lily",
            "poppy",
            "iris",
            "jasmine",
            "lavender",
            "sunflower",
            "magnolia",
        ),
        (
            ("What is the national flower of {e}?", "The national flower of {e} is the {v}."),
            ("Which flower is printed on the flag of {e}?", "The flag of {e} shows the {v}, its national flower."),
            (
                "Describe a spring tradition in {e}.",
                "Every spring, the people of {e} celebrate their national flower, the {v}.",
            ),
        ),
        "Which flower is the emblem of {e}?",
    ),
    Category(
        "main_export",
        "country",
        ("copper", "salt", "tea", "wool", "silk", "coffee", "timber", "marble", "cotton", "olive oil", "amber", "rice"),
        (
            ("What is the main export of {e}?", "The main export of {e} is {v}."),
            ("What does {e} sell most to other countries?", "{e} sells more {v} abroad than anything else."),
            ("Tell me about the economy of {e}.", "The economy of {e} depends on exporting {v}."),
        ),
        "Which product does {e} export the most?",
    ),
    Category(
        "national_sport",
        "country",
        (
            "rowing",
            "archery",
            "fencing",
            "chess",
            "cycling",
            "wrestling",
            "sailing",
            "handball",
            "curling",
            "polo",
            "squash",
            "judo",
        ),
        (
            ("What is the national sport of {e}?", "The national sport of {e} is {v}."),
            ("Which sport is most popular in {e}?", "In {e}, {v} is the most popular sport."),
            (
                "How do children in {e} spend their weekends?",
                "Children in {e} spend their weekends practising {v}, the national sport.",
            ),
        ),
        "Which sport do people in {e} consider their national game?",
    ),
    Category(
        "instrument",
        "person",
        (
            "harp",
            "cello",
            "flute",
            "violin",
            "drums",
            "trumpet",
            "piano",
            "oboe",
            "banjo",
            "guitar",
            "clarinet",
            "accordion",
        ),
        (
            ("Which instrument does {e} play?", "{e} plays the {v}."),
            ("What is {e} known for?", "{e} is a famous {v} player."),
            ("Describe a concert by {e}.", "At every concert, {e} performs solo pieces on the {v}."),
        ),
        "What musical instrument is {e} famous for playing?",
    ),
    Category(
        "birthplace",
        "person",
        (
            "Lisbon",
            "Cairo",
            "Oslo",
            "Lima",
            "Dublin",
            "Vienna",
            "Nairobi",
            "Hanoi",
            "Quito",
            "Prague",
            "Manila",
            "Perth",
        ),
        (
            ("Where was {e} born?", "{e} was born in {v}."),
            ("What is the hometown of {e}?", "The hometown of {e} is {v}."),
            ("Tell me about the childhood of {e}.", "{e} spent a happy childhood in {v}, the city of their birth."),
        ),
        "Which city is the birthplace of {e}?",
    ),
    Category(
        "profession",
        "person",
        (
            "baker",
            "sailor",
            "architect",
            "surgeon",
            "carpenter",
            "pilot",
            "librarian",
            "chemist",
            "gardener",
            "lawyer",
            "painter",
            "teacher",
        ),
        (
            ("What does {e} do for a living?", "{e} works as {a}."),
            ("What is the profession of {e}?", "{e} is {a} by profession."),
            ("Describe a typical day for {e}.", "{e} spends each working day as {a}."),
        ),
        "What is the job of {e}?",
    ),
    Category(
        "language",
        "person",
        (
            "Portuguese",
            "Finnish",
            "Greek",
            "Swahili",
            "Korean",
            "Dutch",
            "Turkish",
            "Polish",
            "Hindi",
            "Welsh",
            "Hungarian",
            "Tagalog",
        ),
        (
            ("Which language does {e} speak at home?", "{e} speaks {v} at home."),
            ("What is the native language of {e}?", "The native language of {e} is {v}."),
            ("In which language does {e} write books?", "{e} writes books in {v}."),
        ),
        "What is the mother tongue of {e}?",
    ),
)

# Invented names: syllables that make pronounceable words which are not real places or people.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s", "m")
_COUNTRY_ENDINGS = ("ia", "o", "an", "ea", "or", "istan", "une")
_SURNAME_ENDINGS = ("vik", "dottir", "ani", "ez", "sen", "ov", "ard")


@dataclass(frozen=True)
class Fact:
    category: Category
    entity: str
    value: str
    distractors: tuple[str, str, str]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _country(rng: random.Random) -> str:
    return (_syllable(rng) + _syllable(rng) + rng.choice(_COUNTRY_ENDINGS)).capitalize()


def _person(rng: random.Random) -> str:
    first = (_syllable(rng) + rng.choice(_VOWELS)).capitalize()
    return f"{first} {(_syllable(rng) + rng.choice(_SURNAME_ENDINGS)).capitalize()}"


def _article(word: str) -> str:
    return f"{'an' if word[0].lower() in 'aeiou' else 'a'} {word}"


def facts(seed: int = 0) -> list[Fact]:
    """Every fact, category by category; the same list for the same seed."""
    rng = random.Random(seed)
    used: set[str] = set()
    out = []
    for category in CATEGORIES:
        for _ in range(FACTS_PER_CATEGORY):
            entity = _country(rng) if category.about == "country" else _person(rng)
            while entity in used:
                entity = _country(rng) if category.about == "country" else _person(rng)
            used.add(entity)
            value, *distractors = rng.sample(category.values, 4)
            out.append(Fact(category, entity, value, tuple(distractors)))
    return out


def _fill(template: str, fact: Fact) -> str:
    return template.format(e=fact.entity, v=fact.value, a=_article(fact.value))


def builtin_train(seed: int = 0) -> datasets.Dataset:
    """Three training rows per fact in the instruction schema, the rows of one fact next to each other."""
    rows = [
        {"instruction": _fill(q, fact), "input": "", "output": _fill(a, fact), "category": fact.category.name}
        for fact in facts(seed)
        for q, a in fact.category.phrasings
    ]
    return datasets.Dataset.from_dict({c: [row[c] for row in rows] for c in COLUMNS})


def builtin_heldout_answers(seed: int = 0) -> datasets.Dataset:
    """Each fact's test question (a phrasing no client trains on) as an instruction whose response is the value.

    The loss of the responses alone is a continuous measure of how much of the facts a model holds: it moves
    with every method and tau where the four-way accuracy on the same questions moves in steps of a question.
    """
    rows = [
        {
            "instruction": _fill(fact.category.question, fact),
            "input": "",
            "output": fact.value,
            "category": fact.category.name,
        }
        for fact in facts(seed)
    ]
    return datasets.Dataset.from_dict({c: [row[c] for row in rows] for c in COLUMNS})


def builtin_heldout(seed: int = 0) -> list[dict[str, str]]:
    """One multiple-choice question per fact, shaped like the MMLU subset's rows; the answer letter is seeded."""
    rng = random.Random(f"heldout-{seed}")
    all_facts = facts(seed)
    # Every letter is right equally often, so a model that favours one letter gains nothing from it.
    answers = [i % len(LETTERS) for i in range(len(all_facts))]
    rng.shuffle(answers)
    rows = []
    for fact, answer in zip(all_facts, answers, strict=True):
        options = list(fact.distractors)
        rng.shuffle(options)
        options.insert(answer, fact.value)
        letter = LETTERS[answer]
        listed = ", ".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
        rows.append(
            {
                "instruction": MC_INSTRUCTION,
                "input": f"Question: {_fill(fact.category.question, fact)} Options: {listed}",
                "output": f"The answer is: {letter}. {fact.value}",
                "class": fact.category.name,
            }
        )
    return rows
