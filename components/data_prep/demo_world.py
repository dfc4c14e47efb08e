"""The demo world: a small, deterministic universe every later stage can learn from on 2 CPU cores.

    kubellm demo-world --output .kubellm/demo --seed 0 [--scale 1.0]
    python -c "from kubellm.data_prep.demo_world import generate; print(generate('/tmp/demo'))"

No network, no randomness beyond `random.Random(seed)`: the same seed and scale give byte-identical
files. The universe: `N_PEOPLE` invented people, each with four attributes (city, favourite colour,
job, pet) drawn from six values each, plus single-digit addition. Files written (the "Demo world
files" contract):

    corpus/part-0000N.jsonl     {"text": ...}   pretraining documents (profiles, meetings, city
                                               guides, arithmetic lessons); every fact is stated many
                                               times in varied templates. Never contains "Answer:".
    chat/train.jsonl            {"messages": [{"role", "content"}, ...]}  SFT data: user questions
                                               answered in the *format* `Answer: <value>` (half of the
                                               replies add a verbose preamble before that line).
    preferences/train.jsonl     {"prompt", "chosen", "rejected", "kind"}  prompt = the user message;
                                               chosen = `Answer: <correct>`; rejected = a verbose reply
                                               with the same answer (kind "verbose") or a concise wrong
                                               one (kind "wrong").
    eval/knowledge.jsonl        {"question", "choices", "answer": int, "kind"}  a cloze prefix
                                               (e.g. "The city where Zorvin lives is") and four choices,
                                               scored by log-likelihood with a " " target delimiter.
    eval/format.jsonl           {"messages": [user], "answer": "Answer: <value>", "value",
                                 "format_regex"}  a chat question; a reply follows the format when
                                               it matches `format_regex` and is correct when the
                                               captured value equals `value`.
    eval/preference.jsonl       {"prompt", "chosen", "rejected", "kind"}  as preferences/train.
    world.json                  the universe itself (people, attributes, splits) for reports;
                                               written last, so it marks a complete world.

Regenerating into the same `--output` replaces those files (and only those: any other file there is
refused by name, never deleted).

Held out, by construction (and checked by tests/data/test_demo_world.py):
  * knowledge: each fact is stated in the corpus with several cloze templates; one template per
    (person, attribute) — and per addition pair — is never used in the corpus for that fact, and the
    eval question is that template. The model must carry the fact over to an unseen phrasing.
  * format/preference: question-answer pairs are split 70/15/15 into train / format-eval /
    preference-eval, so no eval prompt appears in chat or preference training data.
  * the answer format (`Answer: ...`) appears only in chat/preference data, so a base model does not
    follow it and SFT teaches it; verbose-vs-concise is 50/50 in the SFT data, so the preference for
    concise replies comes from DPO.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import random
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubellm.core.errors import ConfigError

log = logging.getLogger(__name__)

MAX_SCALE = 1000.0
"""The largest `scale`: ≈ 2.3 GB of corpus text (5.6 M documents, minutes to write). The world's
facts are fixed (24 people, 100 sums) and scale 1 already states each many times, so larger scales
only repeat them; beyond this a typo (1e9) would fill the disk for hours."""
# What `generate` writes, and so may replace: subdir -> the file names it owns there; plus world.json
OWNED_FILES: dict[str, re.Pattern[str]] = {
    "corpus": re.compile(r"part-\d{5}\.jsonl"),
    "chat": re.compile(r"train\.jsonl"),
    "preferences": re.compile(r"train\.jsonl"),
    "eval": re.compile(r"(knowledge|format|preference)\.jsonl"),
}
WORLD_FILE = "world.json"
_SCRATCH = ".demo-world-tmp-"

N_PEOPLE = 24
ATTRIBUTES: dict[str, list[str]] = {
    "city": ["Tarsk", "Velmora", "Ondris", "Kelport", "Brisa", "Amberlow"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange"],
    "job": ["baker", "painter", "farmer", "doctor", "teacher", "sailor"],
    "pet": ["cat", "dog", "parrot", "rabbit", "turtle", "goat"],
}
# Cloze templates end with the value, so a prefix is a knowledge question. For each fact one of them
# is held out of the corpus and becomes the eval question.
CLOZE: dict[str, list[str]] = {
    "city": ["{name} lives in the city of", "The city where {name} lives is",
             "{name} has a small house in", "Every morning {name} walks through the streets of"],
    "colour": ["The favourite colour of {name} is", "{name} likes the colour",
               "{name} always wears something", "The colour that {name} loves most is"],
    "job": ["{name} works as a", "By trade, {name} is a", "The job of {name} is that of a",
            "Everyone knows that {name} is a hard working"],
    "pet": ["{name} has a pet", "At home, {name} keeps a", "The pet of {name} is a",
            "{name} takes good care of a"],
}
# Value-first sentences (corpus only): they state the same facts from the other side.
REVERSE: dict[str, list[str]] = {
    "city": ["Among the people of {value} is {name}."],
    "colour": ["Anything {value} makes {name} happy."],
    "job": ["As a {value}, {name} is busy all week."],
    "pet": ["A {value} waits at the door for {name} every evening."],
}
QUESTIONS: dict[str, list[str]] = {
    "city": ["Where does {name} live?", "In which city does {name} live?", "Which city is home to {name}?"],
    "colour": ["What is the favourite colour of {name}?", "Which colour does {name} like best?",
               "What colour does {name} love most?"],
    "job": ["What does {name} do for a living?", "What is the job of {name}?",
            "Which job does {name} have?"],
    "pet": ["What pet does {name} have?", "Which animal does {name} keep as a pet?",
            "What kind of pet does {name} own?"],
    "sum": ["What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.",
            "How much is {a} plus {b}?"],
}
SUM_CLOZE = ["{a} plus {b} is", "The sum of {a} and {b} is", "If you add {a} and {b} you get",
             "Adding {b} to {a} gives"]
FILLERS = [
    "{name} enjoys long walks by the river.", "{name} is known for a warm laugh.",
    "On rainy days {name} reads old books.", "{name} often visits friends on the weekend.",
    "{name} likes to cook soup in the winter.", "Children in the street often wave at {name}.",
    "{name} sings quietly while working.", "{name} keeps a tidy garden with many flowers.",
]
OPENERS = ["Here is a short note about {name}.", "This is the story of {name}.",
           "A few words about {name}.", "Let me tell you about {name}."]
VERBOSE = [
    "That is a good question, and I am happy to help you with it.",
    "Let me think about this carefully before I reply.",
    "I have thought about this question for a while, and here is what I believe.",
    "Thank you for asking; questions like this one are always interesting to answer.",
]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful assistant who answers briefly.",
                  "Answer the user's question."]
SYLLABLES = ["ka", "lo", "mi", "ra", "zen", "dor", "vel", "tha", "bri", "nor", "sel", "quin", "mar",
             "tu", "fen", "gor", "li", "sa", "ven", "ro"]
ENDINGS = ["a", "o", "in", "el", "us", "an", "ix", "eth"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FORMAT_REGEX = r"Answer:\s*([A-Za-z0-9]+)"


@dataclass(frozen=True)
class QA:
    """One question-answer fact: a person's attribute or a sum."""

    key: str        # "person:<name>:<attr>" or "sum:<a>:<b>"
    kind: str       # attribute name or "sum"
    value: str
    options: tuple[str, ...]
    fields: tuple[tuple[str, str], ...]

    def fmt(self, template: str) -> str:
        return template.format(**dict(self.fields))


def _rng(seed: int, *parts: object) -> random.Random:
    """An independent, stable RNG per purpose (string hashing is salted in Python; sha256 is not)."""
    h = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def _names(seed: int, n: int) -> list[str]:
    rng = _rng(seed, "names")
    names: list[str] = []
    while len(names) < n:
        name = (rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + rng.choice(ENDINGS)).capitalize()
        # No name may be a prefix of another: eval prefixes must not match a longer name's sentence.
        if all(not a.startswith(name) and not name.startswith(a) for a in names):
            names.append(name)
    return names


def build_world(seed: int = 0) -> dict[str, Any]:
    """The universe: people with attributes, the held-out template per fact, and the QA splits."""
    rng = _rng(seed, "world")
    people = {name: {attr: rng.choice(values) for attr, values in ATTRIBUTES.items()}
              for name in _names(seed, N_PEOPLE)}
    heldout = {f"person:{n}:{a}": rng.randrange(len(CLOZE[a])) for n in people for a in ATTRIBUTES}
    heldout.update({f"sum:{a}:{b}": rng.randrange(len(SUM_CLOZE)) for a in range(10) for b in range(10)})
    keys = sorted(heldout)
    rng.shuffle(keys)
    n_eval = round(0.15 * len(keys))
    split = {k: "format" for k in keys[:n_eval]}
    split.update({k: "preference" for k in keys[n_eval : 2 * n_eval]})
    split.update({k: "train" for k in keys[2 * n_eval :]})
    return {"seed": seed, "people": people, "heldout_template": heldout, "split": split}


def _qas(world: dict[str, Any]) -> list[QA]:
    out = []
    for name, attrs in world["people"].items():
        for attr, value in attrs.items():
            out.append(QA(f"person:{name}:{attr}", attr, value, tuple(ATTRIBUTES[attr]), (("name", name),)))
    for a in range(10):
        for b in range(10):
            opts = tuple(str(v) for v in range(19))
            out.append(QA(f"sum:{a}:{b}", "sum", str(a + b), opts, (("a", str(a)), ("b", str(b)))))
    return out


# ---------------------------------------------------------------- corpus
def _fact_sentence(rng: random.Random, world: dict[str, Any], name: str, attr: str) -> str:
    value = world["people"][name][attr]
    held = world["heldout_template"][f"person:{name}:{attr}"]
    choices = [t for i, t in enumerate(CLOZE[attr]) if i != held]
    if rng.random() < 0.2:
        return rng.choice(REVERSE[attr]).format(name=name, value=value)
    return f"{rng.choice(choices).format(name=name)} {value}."


def _sum_sentence(rng: random.Random, world: dict[str, Any], a: int, b: int) -> str:
    held = world["heldout_template"][f"sum:{a}:{b}"]
    choices = [t for i, t in enumerate(SUM_CLOZE) if i != held]
    return f"{rng.choice(choices).format(a=a, b=b)} {a + b}."


def _profile(rng: random.Random, world: dict[str, Any]) -> str:
    name = rng.choice(sorted(world["people"]))
    sents = [_fact_sentence(rng, world, name, attr) for attr in ATTRIBUTES]
    sents += [_fact_sentence(rng, world, name, rng.choice(list(ATTRIBUTES))) for _ in range(rng.randint(1, 3))]
    sents += [f.format(name=name) for f in rng.sample(FILLERS, rng.randint(2, 4))]
    rng.shuffle(sents)
    return " ".join([rng.choice(OPENERS).format(name=name), *sents])


def _meeting(rng: random.Random, world: dict[str, Any]) -> str:
    names = rng.sample(sorted(world["people"]), rng.randint(2, 4))
    place = rng.choice(["the market", "the harbour", "a wedding", "the library", "a festival"])
    sents = [f"One day {', '.join(names[:-1])} and {names[-1]} met at {place}."]
    for name in names:
        for attr in rng.sample(list(ATTRIBUTES), rng.randint(2, 3)):
            sents.append(_fact_sentence(rng, world, name, attr))
        sents.append(rng.choice(FILLERS).format(name=name))
    sents.append(rng.choice(["They talked until the sun went down.", "It was a pleasant afternoon.",
                             "Afterwards everyone went home happy."]))
    return " ".join(sents)


def _city_guide(rng: random.Random, world: dict[str, Any]) -> str:
    city = rng.choice(ATTRIBUTES["city"])
    residents = sorted(n for n, a in world["people"].items() if a["city"] == city)
    sents = [f"{city} is a quiet city with old stone bridges and a busy market."]
    if residents:
        sents.append(f"The people who live in {city} include {', '.join(residents)}.")
        for name in rng.sample(residents, min(len(residents), 3)):
            sents.append(_fact_sentence(rng, world, name, "city"))
            sents.append(_fact_sentence(rng, world, name, rng.choice(["job", "pet", "colour"])))
    else:
        sents.append(f"Nobody from our stories lives in {city} yet, but travellers like to visit it.")
    sents.append(rng.choice(["Visitors say the bread there is the best in the land.",
                             "In spring the whole city smells of flowers."]))
    return " ".join(sents)


def _lesson(rng: random.Random, world: dict[str, Any]) -> str:
    teacher = rng.choice(sorted(n for n, a in world["people"].items() if a["job"] == "teacher")
                         or sorted(world["people"]))
    sents = [f"Today in the counting lesson, the teacher {teacher} wrote some sums on the board."]
    for _ in range(rng.randint(4, 7)):
        a, b = rng.randrange(10), rng.randrange(10)
        sents.append(_sum_sentence(rng, world, a, b))
        if rng.random() < 0.4:
            sents.append(f"In words, {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} makes {a + b}.")
    sents.append(rng.choice(["The children copied every sum into their books.",
                             "Everyone practised until the bell rang."]))
    return " ".join(sents)


def _documents(world: dict[str, Any], n_docs: int) -> Iterable[str]:
    rng = _rng(world["seed"], "corpus")
    kinds = [(_profile, 0.4), (_meeting, 0.3), (_city_guide, 0.1), (_lesson, 0.2)]
    fns, weights = zip(*kinds, strict=True)
    for _ in range(n_docs):
        yield rng.choices(fns, weights)[0](rng, world)


# ---------------------------------------------------------------- chat, preferences, eval
def _verbose(rng: random.Random, qa: QA) -> str:
    intro = " ".join(rng.sample(VERBOSE, 2))
    return f"{intro} Answer: {qa.value}"


def _conversation(rng: random.Random, qas: list[QA]) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for qa in rng.sample(qas, 1 if rng.random() < 0.7 else 2):
        msgs.append({"role": "user", "content": qa.fmt(rng.choice(QUESTIONS[qa.kind]))})
        reply = f"Answer: {qa.value}" if rng.random() < 0.5 else _verbose(rng, qa)
        msgs.append({"role": "assistant", "content": reply})
    return msgs


def _pair(rng: random.Random, qa: QA, question: str) -> dict[str, str]:
    if rng.random() < 0.6:
        rejected, kind = _verbose(rng, qa), "verbose"
    else:
        wrong = rng.choice([o for o in qa.options if o != qa.value])
        rejected, kind = f"Answer: {wrong}", "wrong"
    return {"prompt": question, "chosen": f"Answer: {qa.value}", "rejected": rejected, "kind": kind}


def _knowledge_item(rng: random.Random, world: dict[str, Any], qa: QA) -> dict[str, Any]:
    held = world["heldout_template"][qa.key]
    question = qa.fmt((SUM_CLOZE if qa.kind == "sum" else CLOZE[qa.kind])[held])
    wrong = rng.sample([o for o in qa.options if o != qa.value], 3)
    choices = [qa.value, *wrong]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(qa.value), "kind": qa.kind}


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def generate(out_dir: str | Path, seed: int = 0, scale: float = 1.0) -> dict[str, Path]:
    """Write the demo world under `out_dir`; returns name -> path of what was written.

    `scale` multiplies the corpus, chat and preference sizes (1.0 ≈ 2 MB of corpus text; a finite
    number in (0, MAX_SCALE]); the eval items do not depend on it, so scores stay comparable across
    scales. A previous demo world in `out_dir` is replaced as a whole (no shard of a larger earlier
    scale survives): the new one is written to a scratch folder inside `out_dir` and moved into place.
    A file there that the demo world does not own is refused (ConfigError naming it), never deleted."""
    scale = check_scale(scale)
    final = Path(out_dir)
    _refuse_foreign_files(final)  # before any work: nothing of the user's is ever replaced
    final.mkdir(parents=True, exist_ok=True)
    out = final / f"{_SCRATCH}{uuid.uuid4().hex[:12]}"  # written here, then moved into place
    try:
        paths, n_docs, n_chat, n_pref = _write_world(out, seed, scale)
        _replace_world(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    paths = {name: final / p.relative_to(out) for name, p in paths.items()}
    size = sum(p.stat().st_size for p in (final / "corpus").glob("*.jsonl"))
    log.info("demo world (seed %d, scale %g) in %s: %d corpus documents (%.2f MB), %d chats, %d pairs",
             seed, scale, final, n_docs, size / 1e6, n_chat, n_pref)
    return paths


def check_scale(scale: Any) -> float:
    """`scale` as a float, or a ConfigError: a finite number in (0, MAX_SCALE]."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(scale, bool) or not math.isfinite(value) or not 0 < value <= MAX_SCALE:
        raise ConfigError(f"scale must be a finite number in (0, {MAX_SCALE:g}] (1.0 ≈ 2 MB of "
                          f"corpus text), got {scale!r}")
    return value


def _foreign_files(out: Path) -> list[str]:
    """Entries under `out` that `generate` did not write (relative paths; a foreign folder once)."""
    if not out.exists():
        return []
    if not out.is_dir():
        return ["."]
    foreign: list[str] = []
    for top in sorted(out.iterdir()):
        if top.name.startswith(_SCRATCH) and top.is_dir() and not top.is_symlink():
            continue  # an interrupted run's scratch dir: ours, removed on the next success
        if top.name == WORLD_FILE and top.is_file() and not top.is_symlink():
            continue
        pattern = OWNED_FILES.get(top.name)
        if pattern is None or not top.is_dir() or top.is_symlink():
            foreign.append(top.name)
            continue
        foreign += [f"{top.name}/{f.name}" for f in sorted(top.iterdir())
                    if not (pattern.fullmatch(f.name) and f.is_file() and not f.is_symlink())]
    return foreign


def _refuse_foreign_files(out: Path) -> None:
    foreign = _foreign_files(out)
    if foreign == ["."]:
        raise ConfigError(f"output {out} exists and is not a directory")
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise ConfigError(
            f"output folder {out} holds files the demo world did not write ({shown}); regenerating "
            "replaces the folder's corpus/, chat/, preferences/, eval/ and world.json, so move those files "
            "away or choose an empty or new output folder")


def _replace_world(new: Path, out: Path) -> None:
    """Move the freshly written world from `new` into `out`, replacing a previous one (only files
    `generate` owns: checked again here). world.json goes last, so an interrupted swap leaves no
    world.json (the mark of a complete world) behind."""
    _refuse_foreign_files(out)
    (out / WORLD_FILE).unlink(missing_ok=True)
    for sub in OWNED_FILES:
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        (new / sub).rename(out / sub)
    (new / WORLD_FILE).rename(out / WORLD_FILE)
    for stale in out.glob(f"{_SCRATCH}*"):
        if stale != new:
            shutil.rmtree(stale, ignore_errors=True)


def _write_world(out: Path, seed: int, scale: float) -> tuple[dict[str, Path], int, int, int]:
    world = build_world(seed)
    qas = _qas(world)
    train = [q for q in qas if world["split"][q.key] == "train"]
    n_docs = max(8, round(5600 * scale))
    n_files = 4 if n_docs >= 400 else 1
    paths: dict[str, Path] = {}

    docs = _documents(world, n_docs)  # streamed: one document in memory at a time
    per_file = -(-n_docs // n_files)
    for i in range(n_files):
        p = out / "corpus" / f"part-{i:05d}.jsonl"
        _write_jsonl(p, ({"text": t} for t in itertools.islice(docs, per_file)))
    paths["corpus"] = out / "corpus"

    rng = _rng(seed, "chat")
    n_chat = max(16, round(1500 * scale))
    paths["chat"] = out / "chat" / "train.jsonl"
    _write_jsonl(paths["chat"], ({"messages": _conversation(rng, train)} for _ in range(n_chat)))

    rng = _rng(seed, "preferences")
    n_pref = max(16, round(800 * scale))
    paths["preferences"] = out / "preferences" / "train.jsonl"
    _write_jsonl(paths["preferences"], (
        _pair(rng, qa, qa.fmt(rng.choice(QUESTIONS[qa.kind]))) for qa in (rng.choice(train) for _ in range(n_pref))
    ))

    rng = _rng(seed, "eval")
    paths["eval_knowledge"] = out / "eval" / "knowledge.jsonl"
    person = [q for q in qas if q.kind != "sum"]
    sums = rng.sample([q for q in qas if q.kind == "sum"], 40)
    _write_jsonl(paths["eval_knowledge"], (_knowledge_item(rng, world, q) for q in person + sums))

    paths["eval_format"] = out / "eval" / "format.jsonl"
    fmt_rows = []
    for qa in (q for q in qas if world["split"][q.key] == "format"):
        for template in QUESTIONS[qa.kind][:2]:
            fmt_rows.append({"messages": [{"role": "user", "content": qa.fmt(template)}],
                             "answer": f"Answer: {qa.value}", "value": qa.value,
                             "format_regex": FORMAT_REGEX})
    _write_jsonl(paths["eval_format"], fmt_rows)

    paths["eval_preference"] = out / "eval" / "preference.jsonl"
    pref_qas = [q for q in qas if world["split"][q.key] == "preference"]
    _write_jsonl(paths["eval_preference"], (_pair(rng, qa, qa.fmt(t)) for qa in pref_qas
                                            for t in QUESTIONS[qa.kind][:2]))

    paths["world"] = out / "world.json"
    paths["world"].write_text(json.dumps(world, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return paths, n_docs, n_chat, n_pref


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--output", required=True,
                        help="directory to write the demo world into: new, empty, or a previous demo world "
                             "(which is replaced); other files there are refused, never deleted")
    parser.add_argument("--seed", type=int, default=0, help="world seed (same seed, same files)")
    parser.add_argument("--scale", type=_scale_arg, default=1.0,
                        help=f"size multiplier for corpus/chat/preferences, a number in (0, {MAX_SCALE:g}] "
                             "(1.0 ≈ 2 MB of corpus text, 5,600 documents; the facts are the same at every "
                             f"scale, {MAX_SCALE:g} ≈ 2.3 GB)")


def _scale_arg(text: str) -> float:
    try:
        return check_scale(text)
    except ConfigError as e:  # argparse prints it with the usage line to stderr and exits 2
        raise argparse.ArgumentTypeError(str(e).removeprefix("scale ")) from None


def main(args: argparse.Namespace) -> int:
    paths = generate(args.output, seed=args.seed, scale=args.scale)
    for name, path in paths.items():
        if path.is_dir():
            files = sorted(path.glob("*.jsonl"))
            size = sum(f.stat().st_size for f in files)
            print(f"{name:16s} {path}/ ({len(files)} files, {size / 1e6:.2f} MB)")
        else:
            lines = sum(1 for _ in open(path, encoding="utf-8")) if path.suffix == ".jsonl" else 1
            print(f"{name:16s} {path} ({lines} records)" if path.suffix == ".jsonl" else f"{name:16s} {path}")
    return 0
