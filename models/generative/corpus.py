"""The text the default generative base learns from: short stories and chat dialogues, written
by this seeded generator (templates plus word lists, one ``random.Random``), nothing downloaded.

A model of a few million parameters trained on a few minutes of this learns to write fluent,
simple sentences: the point is a base that reads as language, so that generation, streaming,
adapters and batching can be seen working, not a model that knows anything.

- **Stories**: a character (a name and an animal), a place, a wish, a small problem and its
  solution, a feeling at the end; 4-8 sentences, in one of several orders and phrasings.
- **Dialogues**: a user asks about a character of a story or a simple fact (colours, counts,
  where things are), the assistant answers in a sentence. They are rendered with the chat
  template of ``tokenizer.CHAT_TEMPLATE`` by the builder, not here.

``stories(n, seed)`` and ``dialogues(n, seed)`` return the same texts for the same arguments on
any machine (no hashing of strings, no dict order dependence).
"""

from __future__ import annotations

import random

NAMES = ["Mia", "Tom", "Lily", "Ben", "Zoe", "Max", "Anna", "Leo", "Sara", "Sam", "Ella", "Finn", "Nora",
         "Jack", "Ruby", "Owen", "Ivy", "Noah", "Lucy", "Theo"]
ANIMALS = ["cat", "dog", "rabbit", "fox", "bear", "duck", "mouse", "owl", "frog", "pig", "horse", "bird"]
PLACES = ["the park", "the forest", "the garden", "the beach", "the farm", "the river", "the hill",
          "the school", "the town", "the meadow"]
THINGS = [("ball", "red"), ("kite", "blue"), ("hat", "green"), ("box", "brown"), ("cup", "yellow"),
          ("book", "big"), ("boat", "small"), ("shell", "pink"), ("key", "gold"), ("drum", "loud")]
WISHES = ["to fly a kite", "to find a friend", "to see the sea", "to climb the tall tree",
          "to bake a cake", "to win the race", "to build a boat", "to sing a song"]
FEELINGS = ["happy", "proud", "glad", "calm", "excited", "tired but happy"]
PROBLEMS = [("it started to rain", "they found a dry place under a tree"),
            ("the {thing} fell into the water", "a kind {animal2} helped to get it back"),
            ("{name} got lost", "the friendly {animal2} showed the way home"),
            ("the wind was too strong", "they waited until the wind was calm"),
            ("{name} was too small to reach it", "{name} asked a friend for help")]
COUNTS = ["one", "two", "three", "four", "five"]


def a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _story(rng: random.Random, name: str | None = None, animal: str | None = None) -> str:
    name, animal, animal2 = name or rng.choice(NAMES), animal or rng.choice(ANIMALS), rng.choice(ANIMALS)
    place, wish, feeling = rng.choice(PLACES), rng.choice(WISHES), rng.choice(FEELINGS)
    thing, colour = rng.choice(THINGS)
    problem, fix = (p.format(name=name, thing=thing, animal2=animal2) for p in rng.choice(PROBLEMS))
    opening = rng.choice([f"Once upon a time, there was a little {animal} named {name}.",
                          f"{name} was a little {animal} who lived near {place}.",
                          f"There once was {a(animal)} called {name}."])
    middle = [rng.choice([f"{name} liked to play in {place}.", f"Every day, {name} went to {place}."]),
              rng.choice([f"{name} wanted {wish}.", f"More than anything, {name} wished {wish}."]),
              rng.choice([f"One day, {name} found a {colour} {thing}.", f"One morning, {name} saw a {colour} {thing}."])]
    if rng.random() < 0.5:
        middle.insert(1, f"{name} had a friend, {a(animal2)}.")
    trouble = [f"But {problem}.", f"{name} was sad for a moment.", f"Then {fix}."]
    if rng.random() < 0.4:
        trouble.pop(1)
    ending = rng.choice([f"In the end, {name} felt {feeling}.", f"{name} smiled and felt {feeling}.",
                         f"That night, {name} went to sleep {feeling}."])
    return " ".join([opening, *middle, *trouble, ending])


def stories(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]


def _dialogue(rng: random.Random) -> list[dict[str, str]]:
    kind = rng.randrange(4)
    name, animal = rng.choice(NAMES), rng.choice(ANIMALS)
    thing, colour = rng.choice(THINGS)
    if kind == 0:
        place = rng.choice(PLACES)
        question, answer = f"Where does {name} the {animal} like to play?", f"{name} likes to play in {place}."
        context = f"{name} is {a(animal)} who likes to play in {place}."
        return [{"role": "user", "content": f"{context} {question}"}, {"role": "assistant", "content": answer}]
    if kind == 1:
        return [{"role": "user", "content": f"What colour is the {thing} in the story about {name}?"},
                {"role": "assistant", "content": f"In that story, the {thing} is {colour}."}] if colour not in (
                    "big", "small", "loud") else [
                {"role": "user", "content": f"Tell me about the {thing}."},
                {"role": "assistant", "content": f"The {thing} is {colour}, and {name} likes it."}]
    if kind == 2:
        i, j = rng.randrange(1, 4), rng.randrange(1, 3)
        return [{"role": "user", "content": f"{name} has {COUNTS[i - 1]} {animal}s and finds {COUNTS[j - 1]} more. "
                                            "How many are there now?"},
                {"role": "assistant", "content": f"There are {COUNTS[i + j - 1]} {animal}s now."}]
    wish = rng.choice(WISHES)
    return [{"role": "user", "content": f"Write a short story about {a(animal)} named {name}."},
            {"role": "assistant", "content": _story(rng, name, animal).split(" But ")[0]
             + f" {name} wanted {wish}, and one day {name} did it."}]


def dialogues(n: int, seed: int = 1) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [_dialogue(rng) for _ in range(n)]
