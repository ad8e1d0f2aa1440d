"""Write the demo datasets: ``sentiment/`` and ``topic/``, each with three JSONL files.

Policy, and why:
- Everything is generated here from templates and word lists with one seeded ``random.Random``:
  no download, and the output is byte-for-byte reproducible (``python -m models.training.generate``).
- A quarter of each label's templates is set aside. ``train.jsonl`` and ``test.jsonl`` are
  drawn from the other templates (same distribution, no sentence shared: the usual held-out
  split); ``test_unseen_templates.jsonl`` only from the set-aside ones, so it measures
  generalisation to phrasings never seen in training, a much harder and noisier number.
  No sentence occurs in two files; templates are used round-robin so none dominates a file.
- Reviews mix generic templates with domain-specific ones (films, restaurants, products, hotels,
  books, apps) and sometimes add a neutral context sentence before and a short verdict after.
- Sentiment includes the cases a bag of words gets wrong: negated praise and complaints
  ("not bad at all", "wasn't great"), contrast ("looked promising, but ..."), idioms without a
  sentiment word ("never again", "does exactly what it promises").
- Rows are ``{"text": ..., "label": ...}`` JSON lines, shuffled, balanced per label.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
from pathlib import Path

from models.training.topics import (
    CITIES,
    COMPANIES,
    COUNTRIES,
    EVENTS,
    FIELDS,
    FOSSILS,
    LIFE,
    PLAYERS,
    SECTORS,
    SPACE,
    TEAMS,
    TECH,
    TOPIC,
)

HERE = Path(__file__).resolve().parent.parent / "data"  # models/data
SEED = 20240607
SIZES = {"train": 400, "test": 120, "test_unseen_templates": 120}
UNSEEN_TEMPLATE_SHARE = 0.25
AN_RE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")  # "a app" -> "an app"

# --- sentiment: reviews -----------------------------------------------------------------------
# domain: (items, aspects, "do it again", neutral context sentences)
DOMAINS = {
    "film": (["film", "movie", "sequel", "documentary", "thriller", "romantic comedy", "animated feature",
              "horror movie"],
             ["acting", "plot", "soundtrack", "pacing", "ending", "dialogue", "cinematography", "lead performance"],
             "watch it again",
             ["Saw it on opening night.", "We streamed it on Sunday evening.", "Went to the late showing."]),
    "restaurant": (["restaurant", "bistro", "pizza place", "sushi bar", "cafe", "steakhouse", "taco truck", "bakery"],
                   ["service", "food", "dessert", "atmosphere", "pasta", "coffee", "wine list", "seafood"],
                   "eat there again",
                   ["We went there for a birthday dinner.", "Stopped by for lunch on Tuesday.",
                    "Booked a table for four."]),
    "product": (["blender", "vacuum cleaner", "laptop", "pair of headphones", "coffee maker", "backpack", "desk lamp",
                 "electric toothbrush", "air fryer", "smartwatch"],
                ["battery life", "build quality", "design", "sound quality", "price", "setup", "customer support",
                 "screen"],
                "buy it again",
                ["Bought it last month.", "It arrived on Monday.", "Got this as a gift."]),
    "hotel": (["hotel", "resort", "guesthouse", "hostel", "bed and breakfast", "beach villa"],
              ["room", "breakfast", "location", "front desk", "pool", "view", "bed"],
              "stay there again",
              ["We stayed three nights.", "Spent a weekend there in May.", "Checked in late on Friday."]),
    "book": (["novel", "memoir", "cookbook", "biography", "short story collection", "fantasy saga"],
             ["writing", "main character", "ending", "pacing", "translation", "world building"],
             "read it again",
             ["Read it on holiday.", "Picked it up for my book club.", "Finished it last night."]),
    "app": (["app", "video game", "meditation app", "budgeting app", "photo editor", "language course"],
            ["interface", "latest update", "sync feature", "onboarding", "design", "subscription price"],
            "use it again",
            ["Been using it for a few weeks.", "Installed it on my phone and tablet.",
             "Tried it after a friend mentioned it."]),
}
# `posa`/`nega` stand before a noun; `pos`/`neg` after a verb, where phrases also fit
POS_ADJ = ["excellent", "wonderful", "fantastic", "superb", "delightful", "outstanding", "brilliant", "lovely",
           "impressive", "charming", "first-rate", "terrific"]
NEG_ADJ = ["terrible", "awful", "disappointing", "mediocre", "dreadful", "subpar", "frustrating", "overpriced",
           "forgettable", "sloppy", "bland", "underwhelming"]
POS = POS_ADJ + ["a real pleasure", "surprisingly good", "great value", "a joy"]
NEG = NEG_ADJ + ["a letdown", "a waste of money", "a mess", "a chore"]
WHO = ["My sister", "My partner", "My dad", "Our kids", "A friend of mine", "My whole team", "My neighbour"]
WHEN = ["two days", "a week", "an hour", "a month", "the first try", "a single weekend"]
VERDICT = {"positive": ["Highly recommended.", "Five stars from me.", "Would recommend.", "Worth it."],
           "negative": ["Avoid.", "Not recommended.", "One star.", "Skip it."],
           None: ["Just my two cents.", "That's all for now.", "Make of that what you will."]}

SENTIMENT = {
    "positive": [
        "The {item} was {pos}, and the {aspect} exceeded my expectations.",
        "Honestly, I expected very little, but the {item} turned out {pos}.",
        "Not bad at all: the {aspect} of this {item} is {pos}.",
        "I have no complaints about the {aspect}; it was {pos} from start to finish.",
        "Five stars. The {item} is {pos} and worth every penny.",
        "I would happily {again}, the {aspect} alone was {pos}.",
        "{who} loved the {item}, especially the {aspect}.",
        "I couldn't have asked for a better {item}.",
        "It wasn't perfect, but overall the {item} was {pos}.",
        "Can't recommend this {item} enough; the {aspect} is {pos}.",
        "I was skeptical at first, yet the {aspect} won me over completely.",
        "Nothing to complain about, the {item} does exactly what it promises.",
        "The {aspect} is not just good, it is {pos}.",
        "What a {posa} {item}! I will definitely {again}.",
        "Never thought a {item} could make me this happy.",
        "Loved it. The {aspect} was {pos} and the whole experience felt effortless.",
        "The reviews undersold it: this {item} is {pos}.",
        "I keep recommending this {item} to everyone I know.",
        "Even the {aspect} was {pos}, which I did not expect at this price.",
        "After {when} I am still impressed by the {aspect}.",
        "The {item} has no real flaws, and the {aspect} is {pos}.",
        "I wasn't disappointed for a second; the {item} was {pos}.",
        "Easily the best {item} I have tried this year.",
        "Hard to find anything wrong with the {aspect}, it is {pos}.",
        "{who} and I agreed the {item} was {pos}.",
        "A {posa} {item} with a {aspect} that really stands out.",
        "I didn't expect to enjoy the {item}, but I loved every minute.",
        "Thumbs up: the {aspect} was {pos} and the {item} felt well worth it.",
        "No regrets at all, I would {again} tomorrow.",
        "Money well spent; the {aspect} is {pos}.",
        "Ten out of ten, the {aspect} could not have been better.",
        "I'm glad I gave this {item} a chance.",
        "It exceeded every expectation I had.",
        "The {aspect} made my day, and the rest of the {item} was {pos} too.",
        "I had my doubts, but the {aspect} changed my mind.",
        "Despite a slow start, the {item} won me over.",
        "Four stars, and only because nothing is perfect.",
        "Would I recommend the {item}? Absolutely.",
        "I'd recommend this {item} to anyone who wants a {posa} {aspect}.",
        "Not a single thing went wrong with the {item}.",
        "I was worried about the {aspect}, but it turned out {pos}.",
        "It's not cheap, but the {item} is worth it.",
        "I can't fault the {aspect}.",
        "There is nothing I would change about the {item}.",
    ],
    "negative": [
        "The {item} was {neg}, and the {aspect} was even worse.",
        "I wanted to like the {item}, but it was {neg}.",
        "The {aspect} wasn't great, and honestly the whole {item} felt {nega}.",
        "Not worth the money: the {item} was {neg}.",
        "I would not recommend this {item} to anyone.",
        "The {aspect} was {neg} and nobody seemed to care.",
        "Never again. I will not {again}.",
        "It looked promising, but I gave up on the {item} after {when}.",
        "{who} hated the {item}, and I can see why: the {aspect} is {neg}.",
        "I can't say anything good about the {aspect}.",
        "The {aspect} is not good at all, it is {neg}.",
        "One star. The {item} is {neg}.",
        "Save your money; this {item} is {neg}.",
        "The {item} did not live up to the hype, the {aspect} was {neg}.",
        "I regret choosing this {item}, the {aspect} was {neg}.",
        "It wasn't terrible, but the {aspect} was {neg} and I won't {again}.",
        "What a {nega} {item}; I gave up after {when}.",
        "Nobody should have to put up with a {aspect} this {nega}.",
        "The {item} promised a lot and delivered very little.",
        "I expected much more from the {aspect}; it was {neg}.",
        "Far from {posa}, the {item} was {neg}.",
        "The worst {item} I have tried in years.",
        "Sadly the {aspect} ruined what could have been a decent {item}.",
        "{who} gave up on the {item} after {when} because it was {neg}.",
        "The {aspect} was hardly acceptable and the {item} felt {nega}.",
        "I don't think I have ever seen a {aspect} this {nega}.",
        "Thumbs down: the {aspect} was {neg} and the {item} was not worth it.",
        "Everyone raved about this {item}, but to me it was {neg}.",
        "I want my money back.",
        "Don't bother with this {item}; the {aspect} is {neg}.",
        "Two stars, and that is being generous to the {aspect}.",
        "Total waste of time, I will never {again}.",
        "I really can't understand the good reviews for this {item}.",
        "The {aspect} was so {nega} that I almost laughed.",
        "I wouldn't recommend the {item}, not even to my worst enemy.",
        "I can't recommend this {item}; the {aspect} is {neg}.",
        "Would I recommend the {item}? Absolutely not.",
        "One and a half stars, mostly for the {aspect}.",
        "I gave it a fair chance, but the {item} never won me over.",
        "At first it seemed fine, then the {aspect} turned out {neg}.",
        "I had high hopes, but the {aspect} let me down.",
        "Zero stars if I could.",
        "Nothing about the {item} worked the way it should.",
        "The {item} is not worth half the price.",
    ],
}
# (domain, label) -> templates that only make sense for that domain
DOMAIN_SENTIMENT = {
    ("film", "positive"): ["I was on the edge of my seat until the credits rolled.",
                           "The {aspect} gave me chills; a {posa} {item}."],
    ("film", "negative"): ["We walked out halfway through the {item}.",
                           "I checked my watch every ten minutes during this {item}."],
    ("restaurant", "positive"): ["Every plate came out hot and the {aspect} was {pos}.",
                                 "The staff remembered our names and the {aspect} was {pos}."],
    ("restaurant", "negative"): ["We waited an hour for cold food at this {item}.",
                                 "The {aspect} tasted like it had been reheated twice."],
    ("product", "positive"): ["The {item} works flawlessly and the {aspect} is {pos}.",
                              "Setup took five minutes and the {item} has worked perfectly since."],
    ("product", "negative"): ["The {item} stopped working after {when}.",
                              "The {item} broke after {when} and customer support never replied."],
    ("hotel", "positive"): ["The room was spotless and the {aspect} was {pos}.",
                            "We slept like babies at this {item}."],
    ("hotel", "negative"): ["The room smelled of smoke and the {aspect} was {neg}.",
                            "We barely slept; the {item} was noisy all night."],
    ("book", "positive"): ["I couldn't put the {item} down.",
                           "I finished the {item} in one sitting; the {aspect} is {pos}."],
    ("book", "negative"): ["I had to force myself to finish this {item}.",
                           "I gave up on the {item} halfway through; the {aspect} was {neg}."],
    ("app", "positive"): ["The {item} runs smoothly and the {aspect} is {pos}.",
                          "Since the {aspect} changed, the {item} has been a joy to use."],
    ("app", "negative"): ["The {item} crashes every time I open it.",
                          "Since the {aspect} changed, the {item} has been {neg}."],
}

def _fill(rng: random.Random, template: str, slots: dict[str, list[str]]) -> str:
    """Fill each ``{slot}``; ``{x2}`` is ``x`` drawn again, distinct from ``{x}``."""
    names = dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f)  # ordered, unique
    values: dict[str, str] = {}
    for name in sorted(names, key=lambda n: n.endswith("2")):  # stable: template order otherwise
        pool = slots[name.rstrip("2")]
        values[name] = rng.choice([v for v in pool if v != values.get(name.rstrip("2"))])
    text = AN_RE.sub(lambda m: m.group(1) + "n ", template.format(**values))
    return text[0].upper() + text[1:]


def sentiment_sentence(rng: random.Random, label: str, template: tuple[str | None, str]) -> str:
    """A review: maybe a neutral context sentence, the filled template, maybe a verdict."""
    domain, text = template
    items, aspects, again, context = DOMAINS[domain or rng.choice(sorted(DOMAINS))]
    slots = {"item": items, "aspect": aspects, "again": [again], "pos": POS, "neg": NEG, "posa": POS_ADJ,
             "nega": NEG_ADJ, "who": WHO, "when": WHEN}
    parts = [_fill(rng, text, slots)]
    if rng.random() < 0.3:
        parts.insert(0, rng.choice(context))
    if rng.random() < 0.2:
        parts.append(rng.choice(VERDICT[rng.choice([label, None])]))
    return " ".join(parts)


def topic_sentence(rng: random.Random, label: str, template: tuple[str | None, str]) -> str:
    slots = {"country": COUNTRIES, "city": CITIES, "team": TEAMS, "player": PLAYERS, "event": EVENTS,
             "company": COMPANIES, "sector": SECTORS, "field": FIELDS, "space": SPACE, "life": LIFE,
             "fossil": FOSSILS, "tech": TECH, "a": ["2", "3", "4", "5"], "b": ["0", "1"],  # winners score more
             "n": ["2", "3", "4", "5", "6", "7", "8", "10", "12", "15"]}
    return _fill(rng, template[1], slots)


def build(templates: dict[str, list[tuple[str | None, str]]], make, rng: random.Random) -> dict[str, list[dict]]:
    """Balanced, shuffled rows per file; no sentence is in two files (see the module docstring)."""
    rows: dict[str, list[dict]] = {split: [] for split in SIZES}
    seen: set[str] = set()
    for label in sorted(templates):
        pool = list(templates[label])
        rng.shuffle(pool)
        n_unseen = round(len(pool) * UNSEEN_TEMPLATE_SHARE)
        seen_pool, unseen_pool = pool[n_unseen:], pool[:n_unseen]
        by_split = {"train": seen_pool, "test": seen_pool, "test_unseen_templates": unseen_pool}
        for split, size in SIZES.items():
            want, got, misses = size // len(templates), 0, 0
            while got < want:
                cycle = list(by_split[split])
                rng.shuffle(cycle)
                for template in cycle:  # round-robin: each template once per cycle
                    text = make(rng, label, template)
                    if text.lower() in seen:
                        misses += 1
                        if misses > 50 * want:
                            raise ValueError(f"{label}/{split}: only {got} distinct sentences of {want}")
                        continue
                    seen.add(text.lower())
                    rows[split].append({"text": text, "label": label})
                    got += 1
                    if got == want:
                        break
    for split in rows:
        rng.shuffle(rows[split])
    return rows


def write(out: Path = HERE, seed: int = SEED) -> dict[str, dict[str, int]]:
    """Write both datasets under ``out``; returns row counts."""
    sentiment = {label: [(None, t) for t in ts] for label, ts in SENTIMENT.items()}
    for (domain, label), ts in sorted(DOMAIN_SENTIMENT.items()):
        sentiment[label] += [(domain, t) for t in ts]
    topic = {label: [(None, t) for t in ts] for label, ts in TOPIC.items()}
    counts = {}
    for offset, (name, templates, make) in enumerate(
        [("sentiment", sentiment, sentiment_sentence), ("topic", topic, topic_sentence)]
    ):
        rows = build(templates, make, random.Random(seed + offset))
        (out / name).mkdir(parents=True, exist_ok=True)
        for split, items in rows.items():
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
            (out / name / f"{split}.jsonl").write_text(lines)
        counts[name] = {split: len(items) for split, items in rows.items()}
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="Folder to write into (default: here).")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    print(json.dumps(write(args.out, args.seed)))
