#!/usr/bin/env python3
"""Writes gpt2kit's default dataset: data/train.jsonl and data/eval.jsonl ({"text": ...}
rows) and data/instruct.jsonl ({"prompt": ..., "completion": ...} rows).

Two sources, nothing downloaded, no third-party text committed:

1. Python's own help texts, `pydoc_data.topics` (what `help("if")` prints), read from the
   interpreter that runs this script: English prose about programming, with code blocks,
   grammar rules and headings. Split into sections at their reStructuredText headings;
   a section is one document.
2. Short stories and arithmetic lessons generated here from templates with a fixed seed.

Documents go to eval (about 5% of the bytes) or train by a seeded shuffle, so no section
or story is in both; long sections become several rows of at most ~2000 characters, cut
at blank lines. Standard library only; the same interpreter version gives the same bytes.

    python3 data/make_data.py [--out data] [--seed 1234]
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

EVAL_FRACTION = 0.05
MAX_ROW_CHARS = 2000
STORY_BYTES = 560_000  # about as much generated text as there is help text
LESSON_BYTES = 60_000
INSTRUCT_ROWS = 3000


# --- Python's help topics ------------------------------------------------------------

HEADING_RULE = re.compile(r"^([=*\-~^])\1{2,}$")


def help_sections():
    """(title, text) of every section of every help topic, in topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped interpreter: the generated text alone
        print("make_data: pydoc_data is missing; generated text only", file=sys.stderr)
        return []
    sections = []
    for name in sorted(topics):
        lines = topics[name].strip("\n").split("\n")
        start = 0
        for i in range(1, len(lines)):
            # A heading is a line underlined by a rule of its own length.
            if HEADING_RULE.match(lines[i]) and len(lines[i]) == len(lines[i - 1]) and i - 1 > start:
                sections.append("\n".join(lines[start : i - 1]).strip("\n"))
                start = i - 1
        sections.append("\n".join(lines[start:]).strip("\n"))
    return [s for s in sections if len(s) > 40]


def rows_of(text):
    """`text` cut at blank lines into pieces of at most MAX_ROW_CHARS (longer
    paragraphs stay whole)."""
    rows, cur = [], ""
    for para in re.split(r"\n{2,}", text):
        if cur and len(cur) + 2 + len(para) > MAX_ROW_CHARS:
            rows.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        rows.append(cur)
    return rows


# --- generated stories ---------------------------------------------------------------

NAMES = [("Tom", "he"), ("Lily", "she"), ("Max", "he"), ("Anna", "she"), ("Ben", "he"),
         ("Mia", "she"), ("Sam", "he"), ("Lucy", "she"), ("Jack", "he"), ("Emma", "she"),
         ("Leo", "he"), ("Zoe", "she"), ("Finn", "he"), ("Ruby", "she"), ("Omar", "he"),
         ("Nora", "she")]
ANIMALS = ["cat", "dog", "rabbit", "fox", "bear", "duck", "mouse", "frog", "owl", "horse",
           "bird", "turtle"]
ADJECTIVES = ["little", "small", "brave", "kind", "curious", "happy", "shy", "clever",
              "sleepy", "funny", "gentle", "busy"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "pink", "brown"]
OBJECTS = ["ball", "box", "hat", "kite", "book", "key", "cup", "shell", "stone", "flower",
           "boat", "drum", "map", "bell"]
PLACES = [("a house", "the garden"), ("a village", "the river"), ("a farm", "the barn"),
          ("a forest", "the old tree"), ("a town", "the park"), ("a small house", "the hill"),
          ("a cottage", "the pond"), ("a big city", "the library")]
ACTIVITIES = ["play in the sun", "read books", "sing songs", "look at the clouds",
              "run in the grass", "draw pictures", "build towers of sand", "feed the ducks",
              "count the stars", "help {pos} mother"]
HIDING = ["under a bush", "behind a rock", "next to the door", "in the tall grass",
          "under the bed", "on a high shelf", "at the bottom of a hole", "inside an old shoe"]
FEELINGS = ["happy", "sad", "surprised", "scared", "proud", "excited", "worried", "calm"]
WEATHER = ["The sun was shining.", "It was a cold morning.", "The wind was blowing hard.",
           "It was raining softly.", "The sky was grey.", "It was a warm spring day.",
           "Snow was falling on the roofs."]
ENDINGS = [
    "From that day on, {name} and {friend} were best friends.",
    "{Name} learned that it is good to share.",
    "At the end of the day, {name} went home, tired but happy.",
    "{Name} smiled. It had been a very good day.",
    "That night, {name} dreamed about the {colour} {obj}.",
    "{Name} said thank you, and {friend} said, \"You are welcome.\"",
]


def cap(s):
    return s[0].upper() + s[1:]


def story(rng):
    name, pro = rng.choice(NAMES)
    friend, fpro = rng.choice([n for n in NAMES if n[0] != name])
    pos = "his" if pro == "he" else "her"
    animal, adj = rng.choice(ANIMALS), rng.choice(ADJECTIVES)
    home, spot = rng.choice(PLACES)
    colour, obj = rng.choice(COLOURS), rng.choice(OBJECTS)
    f = dict(name=name, Name=name, pro=pro, Pro=cap(pro), pos=pos, Pos=cap(pos),
             friend=friend, fpro=fpro, Fpro=cap(fpro), colour=colour, obj=obj,
             spot=spot, animal=animal)
    act = rng.choice(ACTIVITIES).format(**f)
    start = rng.choice([
        "Once upon a time, there was a {adj} {animal} named {name}.",
        "There once was a {adj} {animal}. {Pos} name was {name}.",
        "{Name} was a {adj} {animal}.",
    ])
    s = [start.format(adj=adj, **f),
         f"{pro.capitalize()} lived in {home} near {spot}.",
         f"Every day, {name} liked to {act}."]
    if rng.random() < 0.5:
        s.append(rng.choice(WEATHER))
    events = [
        "One day, {name} found a {colour} {obj} " + rng.choice(HIDING) + ".",
        "{Name} wanted to show the {obj} to {friend}.",
        "\"Look what I found!\" said {name}.",
        "{Friend} looked at the {obj} and felt " + rng.choice(FEELINGS) + ".",
        "\"Can we play with it together?\" asked {friend}.",
        "\"Yes, of course,\" said {name}.",
        "They took the {obj} to {spot} and played all afternoon.",
    ]
    twists = [
        "But then the {obj} fell into the water. {Name} was sad.",
        "Suddenly, a big wind came and blew the {obj} away.",
        "But the {obj} was broken. {Friend} said, \"Don't worry, we can fix it.\"",
        "Then {name} saw that the {obj} belonged to an old {animal2}.",
    ]
    fixes = [
        "{Friend} had an idea. {Fpro} found a long stick and they got the {obj} back.",
        "They looked everywhere, and at last they found it near {spot}.",
        "They worked together, and soon the {obj} was as good as new.",
        "{Name} gave the {obj} back, and the old {animal2} was very happy.",
    ]
    animal2 = rng.choice(ANIMALS)
    k = rng.randrange(len(twists))
    body = events[:2 + rng.randrange(len(events) - 1)]
    body += [twists[k], fixes[k]]
    s += [e.replace("{Friend}", friend).format(animal2=animal2, **f) for e in body]
    s.append(rng.choice(ENDINGS).format(**f))
    # A paragraph break before the twist, as stories are written.
    cut = len(s) - 3
    return " ".join(s[:cut]) + "\n\n" + " ".join(s[cut:])


def lesson(rng):
    """A short arithmetic lesson: sums, differences and a counting line."""
    lines = [rng.choice(["Let us practise with numbers.", "Here are some sums.",
                         "Adding and taking away:"])]
    for _ in range(rng.randrange(4, 9)):
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        if rng.random() < 0.6:
            lines.append(rng.choice(["{a} + {b} = {c}", "{a} plus {b} is {c}.",
                                     "If you have {a} apples and get {b} more, you have {c} apples."])
                         .format(a=a, b=b, c=a + b))
        else:
            a, b = max(a, b), min(a, b)
            lines.append(rng.choice(["{a} - {b} = {c}", "{a} minus {b} is {c}."])
                         .format(a=a, b=b, c=a - b))
    n, step = rng.randrange(1, 30), rng.randrange(1, 6)
    lines.append("Counting by {}: {}.".format(step, ", ".join(str(n + i * step) for i in range(8))))
    return "\n".join(lines)


def generated(rng, budget, make):
    docs, size = [], 0
    while size < budget:
        docs.append(make(rng))
        size += len(docs[-1]) + 1
    return docs


def instruct_rows(rng):
    rows = []
    for _ in range(INSTRUCT_ROWS):
        a, b = rng.randrange(0, 100), rng.randrange(0, 100)
        if rng.random() < 0.5:
            rows.append({"prompt": f"Q: What is {a} + {b}?\nA:", "completion": f" {a + b}"})
        else:
            a, b = max(a, b), min(a, b)
            rows.append({"prompt": f"Q: What is {a} - {b}?\nA:", "completion": f" {a - b}"})
    return rows


# --- the split -----------------------------------------------------------------------

def split(docs, rng):
    """Seeded split by document: eval takes documents in shuffled order until it holds
    EVAL_FRACTION of the bytes."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    target = EVAL_FRACTION * sum(len(d) for d in docs)
    eval_ids, size = set(), 0
    for i in order:
        if size >= target:
            break
        if size + len(docs[i]) <= 1.2 * target:
            eval_ids.add(i)
            size += len(docs[i])
    train = [d for i, d in enumerate(docs) if i not in eval_ids]
    evals = [d for i, d in enumerate(docs) if i in eval_ids]
    return train, evals


def write_jsonl(path, rows):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    # Each source has its own generator, so changing one leaves the others' text alone.
    stories = generated(random.Random(a.seed), STORY_BYTES, story)
    lessons = generated(random.Random(a.seed + 1), LESSON_BYTES, lesson)
    docs = help_sections() + stories + lessons
    train_docs, eval_docs = split(docs, random.Random(a.seed + 2))

    train = [r for d in train_docs for r in rows_of(d)]
    random.Random(a.seed + 3).shuffle(train)  # sources interleaved, a section's rows apart
    evals = [r for d in eval_docs for r in rows_of(d)]
    write_jsonl(out / "eval.jsonl", [{"text": t} for t in evals])
    write_jsonl(out / "instruct.jsonl", instruct_rows(random.Random(a.seed + 4)))
    # Last: the Makefile takes train.jsonl's time for the three files'.
    write_jsonl(out / "train.jsonl", [{"text": t} for t in train])

    def size(rows):
        return sum(len(r.encode("utf-8")) for r in rows)

    print(f"make_data: {len(docs)} documents (Python {sys.version.split()[0]} help sections "
          f"and generated text) -> train.jsonl {len(train)} rows, {size(train)} bytes; "
          f"eval.jsonl {len(evals)} rows, {size(evals)} bytes; "
          f"instruct.jsonl {INSTRUCT_ROWS} rows")


if __name__ == "__main__":
    main()
