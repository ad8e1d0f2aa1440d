"""The demo generation adapter's data: say in one sentence how a story ends.

Each row is a chat: the user gives a story written by the base's own story generator
(``corpus._story``) and asks how it ends; the assistant answers ``"<name> felt <feeling>."``,
facts the story states (its hero, and the feeling of its last sentence, which the story words in
one of three ways). The bare base has never seen this request and answers with a story or a
dialogue of its own; an adapter that learned the task reads the two facts out of the prompt,
which exact match on held-out stories measures.

A first version asked for ``"<name> the <animal> wanted <wish>."``: the adapter learned the form
and the name but not the animal or the wish (exact match 0 on held-out stories, in a run whose
adapter was not kept): this 3.7M
base does not retrieve facts from the middle of a story well, so the task asks for what the
story repeats (the name) and what it says last (the feeling).

Sets (``python -m models.generative.endings --out models/data/endings``, byte for byte
reproducible): ``train``, ``validation`` and ``test`` from disjoint seeds (names from the
corpus' list), and ``test-new-names``, stories about names that occur nowhere in the base's
corpus nor in the adapter's training rows, so the adapter must copy, not recall.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from models.generative.corpus import ANIMALS, NAMES, _story

NEW_NAMES = ["Kai", "Rosa", "Milo", "Iris", "Hugo", "Luna", "Otto", "Vera", "Ada", "Eli", "Nina", "Rex"]
ASK = "How does this story end? Answer in one sentence.\n"
SETS = {"train": (2000, 10, NAMES), "validation": (200, 11, NAMES), "test": (200, 12, NAMES),
        "test-new-names": (200, 13, NEW_NAMES)}
_FEELING = re.compile(r"(?:felt|went to sleep) ([a-z ]+)\.$")


def rows(n: int, seed: int, names: list[str], seen: set[str]) -> list[dict]:
    """``n`` rows whose stories are not in ``seen`` (which they join): no story in two sets."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        name, animal = rng.choice(names), rng.choice(ANIMALS)
        story = _story(rng, name, animal)
        if story in seen:
            continue
        seen.add(story)
        feeling = _FEELING.search(story).group(1)
        out.append({"messages": [{"role": "user", "content": ASK + story},
                                 {"role": "assistant", "content": f"{name} felt {feeling}."}]})
    return out


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for name, (n, seed, names) in SETS.items():
        lines = [json.dumps(r, ensure_ascii=False) for r in rows(n, seed, names, seen)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.generative.endings", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("models/data/endings"))
    write(p.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
