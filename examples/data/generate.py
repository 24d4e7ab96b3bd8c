"""Generate the demo corpora: `tinystories-cpu.txt`, short children's stories from a small grammar,
and the three-source mixture's files under `mixture/` (examples/mixture-cpu.yaml).

TinyStories itself is 2 GB and cannot ship with the repository; this grammar gives text with the
same flavour (simple words, recurring characters, cause and effect) that a 2-layer model learns
visibly within a few hundred steps on a CPU. Deterministic: the same seed writes the same bytes.

    python examples/data/generate.py            # rewrites examples/data/tinystories-cpu.txt
    python examples/data/generate.py --mixture  # rewrites examples/data/mixture/

The mixture's files are small and of other kinds than the demo corpus: JSON Lines with a few empty
rows (rejected as emptyText, so the per-source table shows rejects), a folder of text files with a
drafts/ subfolder the example excludes, and a held-out validation file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Emma", "Jack"]
ANIMALS = ["cat", "dog", "bird", "bunny", "frog", "duck", "puppy", "kitten", "fox", "bear"]
PLACES = ["park", "garden", "forest", "beach", "yard", "farm", "lake", "hill", "school", "house"]
THINGS = ["ball", "kite", "box", "hat", "cake", "toy car", "red balloon", "book", "flower", "shell"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "angry", "surprised", "proud"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "bright"]
ACTIONS = ["play", "run", "jump", "dance", "sing", "look for shells", "build a tower", "swim"]

OPENINGS = [
    "Once upon a time, there was a little {kid} who lived near a big {place}.",
    "One {weather} day, {kid} went to the {place} with {pronoun} {animal}.",
    "There was a {feeling} {animal} named {pet}. It lived in a small {place}.",
    "{kid} had a {thing}. {kid} loved the {thing} very much.",
]
MIDDLES = [
    "{kid} wanted to {action}, but the {animal} was {feeling}.",
    'Then {kid} saw a {thing} under a tree. "What is this?" {kid} asked.',
    "The {animal} ran away with the {thing}. {kid} felt {feeling}.",
    "{kid} and {friend} wanted to {action} together at the {place}.",
    "Suddenly, it became {weather}. {kid} and the {animal} had to go home.",
    '"Can I have your {thing}?" asked {friend}. {kid} said, "Yes, we can share."',
]
ENDINGS = [
    "In the end, {kid} and {friend} were {feeling} and played all day.",
    "{kid} learned that sharing is good. The {animal} was happy too.",
    "They found the {thing} and went home. {kid} smiled and went to sleep.",
    "From that day on, {kid} and the {animal} were best friends.",
]


def story(rng: random.Random) -> str:
    kid, friend = rng.sample(NAMES, 2)
    slots = {
        "kid": kid,
        "friend": friend,
        "pet": rng.choice(NAMES),
        "pronoun": rng.choice(["her", "his"]),
        "animal": rng.choice(ANIMALS),
        "place": rng.choice(PLACES),
        "thing": rng.choice(THINGS),
        "feeling": rng.choice(FEELINGS),
        "weather": rng.choice(WEATHER),
        "action": rng.choice(ACTIONS),
    }
    parts = [rng.choice(OPENINGS)]
    parts += rng.sample(MIDDLES, rng.randint(2, 3))
    parts.append(rng.choice(ENDINGS))
    return " ".join(p.format(**slots) for p in parts)


def stories(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)  # noqa: S311 — a reproducible corpus, not a secret
    return [story(rng) for _ in range(count)]


def text_file(path: Path, count: int, seed: int) -> None:
    """Stories as paragraphs (the text reader's default split)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(stories(count, seed)) + "\n", encoding="utf-8")


def mixture(out: Path) -> None:
    """The files of examples/mixture-cpu.yaml's sources."""
    rows = [{"text": s} for s in stories(300, seed=7)]
    for at in (0, 100, 200):
        rows.insert(at, {"text": ""})  # three rows the stage rejects (emptyText)
    (out / "fables.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (out / "fables.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    text_file(out / "notes" / "a.txt", 150, seed=8)
    text_file(out / "notes" / "b.txt", 150, seed=9)
    text_file(out / "notes" / "drafts" / "c.txt", 50, seed=10)  # excluded by the example
    text_file(out / "validation.txt", 100, seed=11)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tinystories-cpu.txt"))
    parser.add_argument(
        "--mixture", action="store_true", help="write the mixture's files under mixture/ instead"
    )
    args = parser.parse_args()
    if args.mixture:
        mixture(Path(__file__).with_name("mixture"))
        return
    text_file(args.out, args.stories, args.seed)


if __name__ == "__main__":
    main()
