"""The demo's own data, generated procedurally from fixed seeds: nothing is downloaded or shipped.

A small fictional *world* (people, towns, pets, jobs) is built from ``WORLD_SEED``. Two kinds of data
are drawn from it:

- a **pre-training corpus** of short English-like documents: facts about the world's people and
  towns (including two-step facts: person -> town -> region), sums and comparisons of numbers,
  counting and the order of days and months, spelling and reversing words letter by letter, and
  little stories whose last number has to be worked out from the earlier ones;
- an **instruction task** of Alpaca-style records ``{instruction, input, output}`` whose answers are
  checkable by exact match ("Add 23 and 18." -> "41", "What comes after Tuesday?" -> "Wednesday",
  "Reverse the letters." / "k p e" -> "e p k", "Where does Benra live?" -> "Benrozu", ...).

The corpus states the knowledge the instruction task asks about, but never in instruction format:
a base model trained on the corpus knows the answers but not the "Instruction: ... Response:"
convention; supervised fine-tuning has to teach that.

Every function is a pure function of its arguments (seeded ``random.Random`` instances, never the
global generators), so the same call gives the same data on every machine and Python version.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable

WORLD_SEED = 20250205  # the paper's arXiv month; any fixed value would do
TRAIN_CORPUS_SEED = 1
HELDOUT_CORPUS_SEED = 2
INSTRUCTION_SEED = 3

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
REGIONS = ["north", "south", "east", "west"]
PETS = ["cat", "dog", "bird", "fish", "horse", "goat", "rabbit", "frog"]
COLORS = ["red", "blue", "green", "black", "white", "brown", "yellow", "grey"]
JOBS = ["baker", "farmer", "teacher", "doctor", "painter", "sailor", "miller", "singer", "builder",
        "weaver", "hunter", "smith"]
FOODS = ["bread", "soup", "rice", "apples", "cheese", "fish", "honey", "beans", "plums", "cake"]
FRUITS = ["apples", "pears", "plums", "eggs", "coins", "shells", "books", "stones"]
WORDS = ["cat", "dog", "sun", "tree", "book", "milk", "rain", "star", "fish", "bird", "hand", "door",
         "lamp", "ship", "road", "king", "moon", "salt", "wind", "gold", "frog", "cake", "bell", "rope",
         "nest", "leaf", "seed", "bean", "corn", "hill", "lake", "rock", "sand", "snow", "wolf", "bear",
         "coat", "boat", "ring", "drum"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Sizes of the world and of the number ranges (the tokenizer splits numbers into digits).
NUM_PEOPLE = 40
NUM_TOWNS = 12
MAX_ADDEND = 30  # sums a + b with 0 <= a, b <= MAX_ADDEND
MAX_COUNT = 99

_SYLLABLES = ["ma", "ri", "to", "ka", "lin", "dor", "vel", "sa", "ben", "ni", "ro", "ta", "mi", "zu",
              "pel", "gar", "fen", "lo", "ra", "ti", "bo", "ne", "sil", "wen", "ha", "ku", "del", "mor"]


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    job: str
    pet: str
    pet_color: str
    food: str


@dataclass(frozen=True)
class World:
    towns: dict[str, str]  # town -> region
    people: tuple[Person, ...]

    def region_of(self, person: Person) -> str:
        return self.towns[person.town]


@lru_cache(maxsize=4)
def demo_world(seed: int = WORLD_SEED) -> World:
    """The fictional world the demo's data talks about (the same for every call with ``seed``)."""
    rng = random.Random(seed)
    names: list[str] = []

    def fresh_name(syllables: int) -> str:
        while True:
            name = "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()
            if name not in names:
                names.append(name)
                return name

    towns = {fresh_name(3): REGIONS[i % len(REGIONS)] for i in range(NUM_TOWNS)}
    town_names = sorted(towns)
    people = tuple(
        Person(
            name=fresh_name(2),
            town=rng.choice(town_names),
            job=rng.choice(JOBS),
            pet=rng.choice(PETS),
            pet_color=rng.choice(COLORS),
            food=rng.choice(FOODS),
        )
        for _ in range(NUM_PEOPLE)
    )
    return World(towns=towns, people=people)


# --------------------------------------------------------------------------- pre-training corpus

def _spaced(letters: Iterable[str]) -> str:
    return " ".join(letters)


def _random_letters(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


def _person_facts(rng: random.Random, world: World) -> str:
    p = rng.choice(world.people)
    region = world.region_of(p)
    facts = [
        rng.choice([f"{p.name} lives in {p.town}.", f"{p.name} is from {p.town}.",
                    f"{p.name} is a {p.job} who lives in {p.town}."]),
        rng.choice([f"{p.name} works as a {p.job}.", f"{p.name} is a {p.job}."]),
        rng.choice([f"{p.name} has a {p.pet_color} {p.pet}.", f"The {p.pet} of {p.name} is {p.pet_color}."]),
        f"{p.name} likes to eat {p.food}.",
        rng.choice([f"{p.town} is a town in the {region}.", f"{p.town} lies in the {region}."]),
    ]
    rng.shuffle(facts)
    facts = facts[: rng.randint(2, len(facts))]
    if rng.random() < 0.5:  # a two-step fact: person -> town -> region
        facts.append(f"So {p.name} lives in the {region}.")
    return " ".join(facts)


def _town_facts(rng: random.Random, world: World) -> str:
    town = rng.choice(sorted(world.towns))
    region = world.towns[town]
    residents = [p.name for p in world.people if p.town == town]
    text = f"{town} is a town in the {region}."
    if residents:
        chosen = rng.sample(residents, min(len(residents), rng.randint(1, 3)))
        text += " " + " ".join(f"{name} lives in {town}." for name in chosen)
    return text


def _sums(rng: random.Random, world: World) -> str:
    sentences = []
    for _ in range(rng.randint(2, 4)):
        a, b = rng.randint(0, MAX_ADDEND), rng.randint(0, MAX_ADDEND)
        sentences.append(rng.choice([f"{a} plus {b} is {a + b}.", f"{a + b} minus {b} is {a}.",
                                     f"If you add {a} and {b} you get {a + b}."]))
    return " ".join(sentences)


def _comparisons(rng: random.Random, world: World) -> str:
    sentences = []
    for _ in range(rng.randint(2, 3)):
        a, b = rng.sample(range(MAX_COUNT + 1), 2)
        sentences.append(rng.choice([f"{max(a, b)} is larger than {min(a, b)}.",
                                     f"{min(a, b)} is smaller than {max(a, b)}.",
                                     f"Of {a} and {b}, the larger number is {max(a, b)}."]))
    return " ".join(sentences)


def _counting(rng: random.Random, world: World) -> str:
    start = rng.randint(0, MAX_COUNT - 6)
    if rng.random() < 0.5:
        items = [str(n) for n in range(start, start + rng.randint(3, 6))]
        return f"Counting up from {items[0]}: {', '.join(items)}."
    items = [str(n) for n in range(start + 6, start + 6 - rng.randint(3, 6), -1)]
    return f"Counting down from {items[0]}: {', '.join(items)}."


def _calendar(rng: random.Random, world: World) -> str:
    sentences = []
    for _ in range(rng.randint(2, 3)):
        kind = rng.choice(["days", "months"])
        names = DAYS if kind == "days" else MONTHS
        i = rng.randrange(len(names))
        after, before = names[(i + 1) % len(names)], names[i - 1]
        sentences.append(rng.choice([
            f"After {names[i]} comes {after}.",
            f"Before {names[i]} comes {before}.",
            f"{names[i]} is followed by {after}.",
            f"The {kind} from {names[i]} are "
            + ", ".join(names[(i + k) % len(names)] for k in range(rng.randint(3, 5))) + ".",
        ]))
    return " ".join(sentences)


def _spelling(rng: random.Random, world: World) -> str:
    word = rng.choice(WORDS)
    return rng.choice([f"The word {word} is spelled {_spaced(word)}.",
                       f"The word {word} is spelled {_spaced(word)}. Backwards it is {_spaced(word[::-1])}."])


def _reversing(rng: random.Random, world: World) -> str:
    # Random letters cannot be memorised: the model has to copy them from the context, reversed.
    letters = _random_letters(rng)
    return rng.choice([f"The letters {_spaced(letters)} reversed are {_spaced(letters[::-1])}.",
                       f"Read backwards, {_spaced(letters)} becomes {_spaced(letters[::-1])}."])


def _counting_story(rng: random.Random, world: World) -> str:
    a, b = rng.sample(world.people, 2)
    thing = rng.choice(FRUITS)
    x = rng.randint(1, 9)
    if rng.random() < 0.5:
        y = rng.randint(1, 9)
        return f"{a.name} has {x} {thing}. {b.name} gives {a.name} {y} more {thing}. Now {a.name} has {x + y} {thing}."
    y = rng.randint(0, x)
    return f"{a.name} has {x} {thing}. {a.name} gives {y} {thing} to {b.name}. Now {a.name} has {x - y} {thing}."


_PIECES: list[Callable[[random.Random, World], str]] = [
    _person_facts, _person_facts, _town_facts, _sums, _sums, _comparisons, _counting, _counting, _calendar,
    _spelling, _reversing, _counting_story,
]


def pretraining_corpus(num_documents: int, seed: int = TRAIN_CORPUS_SEED, world: World | None = None) -> list[str]:
    """``num_documents`` short documents, each a few pieces of world knowledge, numbers or letters.

    Use ``seed=TRAIN_CORPUS_SEED`` for training and ``seed=HELDOUT_CORPUS_SEED`` for the held-out
    perplexity set: both describe the same world, drawn independently.
    """
    world = world or demo_world()
    rng = random.Random(seed)
    return [" ".join(rng.choice(_PIECES)(rng, world) for _ in range(rng.randint(2, 5))) for _ in range(num_documents)]


# --------------------------------------------------------------------------- instruction task

PROMPT_TEMPLATE = "Instruction: {instruction}\nResponse:"
PROMPT_WITH_INPUT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nResponse:"


def format_prompt(record: dict) -> str:
    """The text a model is given for an instruction record; the answer follows after one space."""
    template = PROMPT_WITH_INPUT_TEMPLATE if record.get("input") else PROMPT_TEMPLATE
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def to_prompt_completion(record: dict) -> dict:
    """A record in TRL's prompt/completion form (the completion is what the loss is taken on)."""
    return {"prompt": format_prompt(record), "completion": " " + record["output"]}


def _record(task: str, instruction: str, output: str, input: str = "") -> dict:
    return {"task": task, "instruction": instruction, "input": input, "output": output}


def _task_add(world: World, rng: random.Random) -> list[dict]:
    return [_record("add", f"Add {a} and {b}.", str(a + b))
            for a in range(MAX_ADDEND + 1) for b in range(MAX_ADDEND + 1)]


def _task_next(world: World, rng: random.Random) -> list[dict]:
    records = [_record("next", f"What comes after {n}?", str(n + 1)) for n in range(MAX_COUNT)]
    for names in (DAYS, MONTHS):
        records += [_record("next", f"What comes after {name}?", names[(i + 1) % len(names)])
                    for i, name in enumerate(names)]
    return records


def _task_previous(world: World, rng: random.Random) -> list[dict]:
    records = [_record("previous", f"What comes before {n}?", str(n - 1)) for n in range(1, MAX_COUNT + 1)]
    for names in (DAYS, MONTHS):
        records += [_record("previous", f"What comes before {name}?", names[i - 1]) for i, name in enumerate(names)]
    return records


def _task_larger(world: World, rng: random.Random) -> list[dict]:
    pairs = [(a, b) for a in range(MAX_COUNT + 1) for b in range(MAX_COUNT + 1) if a != b]
    return [_record("larger", "Which number is larger?", str(max(a, b)), f"{a} or {b}")
            for a, b in rng.sample(pairs, 600)]


def _task_spell(world: World, rng: random.Random) -> list[dict]:
    return [_record("spell", "Spell the word.", _spaced(word), word) for word in WORDS]


def _task_reverse(world: World, rng: random.Random) -> list[dict]:
    seen: set[str] = set()
    records = []
    while len(records) < 600:
        letters = _random_letters(rng)
        if letters not in seen:
            seen.add(letters)
            records.append(_record("reverse", "Reverse the letters.", _spaced(letters[::-1]), _spaced(letters)))
    return records


def _task_town(world: World, rng: random.Random) -> list[dict]:
    return [_record("town", f"Where does {p.name} live?", p.town) for p in world.people]


def _task_region(world: World, rng: random.Random) -> list[dict]:  # two steps: person -> town -> region
    return [_record("region", f"In which part of the land does {p.name} live?", world.region_of(p))
            for p in world.people]


def _task_pet(world: World, rng: random.Random) -> list[dict]:
    return [_record("pet", f"What pet does {p.name} have?", p.pet) for p in world.people]


def _task_count(world: World, rng: random.Random) -> list[dict]:
    records = []
    for x in range(1, 10):
        for y in range(1, 10):
            a, b = rng.sample(world.people, 2)
            thing = rng.choice(FRUITS)
            story = f"{a.name} has {x} {thing}. {b.name} gives {a.name} {y} more {thing}."
            records.append(_record("count", f"How many {thing} does {a.name} have now?", str(x + y), story))
    return records


def cloze_form(record: dict, world: World | None = None) -> tuple[str, str]:
    """The same question as an instruction record, asked the way the pre-training corpus phrases it:
    ``(prompt, answer)``, e.g. ("After Tuesday comes", "Wednesday"). It measures what a base model
    knows before it has learnt the instruction format."""
    world = world or demo_world()
    task, text, answer = record["task"], record["instruction"], record["output"]
    subject = text.rstrip("?.").split()[-1]  # the last word of "What comes after X?", "Where does X live?"
    if task == "add":
        a, b = text.rstrip(".").split()[1::2]
        return f"{a} plus {b} is", answer
    if task in ("next", "previous"):
        if subject.isdigit():
            return f"Counting {'up' if task == 'next' else 'down'} from {subject}: {subject},", answer
        return f"{'After' if task == 'next' else 'Before'} {subject} comes", answer
    if task == "larger":
        a, b = record["input"].split(" or ")
        return f"Of {a} and {b}, the larger number is", answer
    if task == "spell":
        return f"The word {record['input']} is spelled", answer
    if task == "reverse":
        return f"The letters {record['input']} reversed are", answer
    if task == "count":
        return f"{record['input']} Now {text.split()[-3]} has", answer
    person = next(p for p in world.people if p.name in text.split())
    if task == "town":
        return f"{person.name} lives in", answer
    if task == "region":
        return f"So {person.name} lives in the", answer
    if task == "pet":
        return f"{person.name} has a {person.pet_color}", answer
    raise ValueError(f"no cloze form for task '{task}'")


# task name -> every record of that task (a deterministic list; the split is drawn from it)
INSTRUCTION_TASKS: dict[str, Callable[[World, random.Random], list[dict]]] = {
    "add": _task_add,
    "next": _task_next,
    "previous": _task_previous,
    "larger": _task_larger,
    "spell": _task_spell,
    "reverse": _task_reverse,
    "town": _task_town,
    "region": _task_region,
    "pet": _task_pet,
    "count": _task_count,
}

PERSON_TASKS = ("town", "region", "pet")  # questions about one person each, in world.people order
EVAL_PER_TASK = 20
TRAIN_PER_TASK = 200


def instruction_splits(
    train_per_task: int = TRAIN_PER_TASK,
    eval_per_task: int = EVAL_PER_TASK,
    seed: int = INSTRUCTION_SEED,
    world: World | None = None,
) -> dict[str, list[dict]]:
    """``{"train": [...], "eval": [...]}``: Alpaca-style records ``{task, instruction, input, output}``.

    For each task the evaluation records are drawn first (at most a quarter of the task's records),
    and training records only from the rest, so no instruction appears in both splits. The tasks
    about the world's people hold out a quarter of the people: the evaluation asks about people
    whom the fine-tuning data never mentions (only the pre-training corpus states their facts).
    """
    world = world or demo_world()
    held_out_people = set(random.Random(f"{seed}-people").sample(range(len(world.people)), len(world.people) // 4))
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for task, build in INSTRUCTION_TASKS.items():
        rng = random.Random(f"{seed}-{task}")  # str seeds hash with sha512: stable across runs
        records = build(world, rng)
        if task in PERSON_TASKS:  # record i asks about world.people[i]: hold out whole people
            evaluation = [r for i, r in enumerate(records) if i in held_out_people][:eval_per_task]
            training = [r for i, r in enumerate(records) if i not in held_out_people]
        else:
            rng.shuffle(records)
            n_eval = min(eval_per_task, len(records) // 4)
            evaluation, training = records[:n_eval], records[n_eval:]
        splits["eval"] += evaluation
        splits["train"] += training[:train_per_task]
    for name, records in splits.items():
        random.Random(f"{seed}-{name}").shuffle(records)
    return splits


# --------------------------------------------------------------------------- tokenizer and packing

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
VOCAB_SIZE = 1024


def build_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers ``PreTrainedTokenizerFast``.

    Numbers are split into single digits (as in Llama), so sums are learnt digit by digit rather than
    as a table of number tokens. Any text encodes (byte-level: ``<unk>`` is never produced) and
    decodes back exactly. Encoding adds ``<s>`` in front, as Llama tokenizers do. Special token ids:
    ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3. Training is deterministic for the same texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=MAX_POSITIONS, padding_side="right",
                                   **SPECIAL_TOKENS)


BLOCK_SIZE = 128  # tokens per pre-training sequence
MAX_POSITIONS = 256  # the model's context length (room for fine-tuning prompts longer than a block)
HELDOUT_DOCUMENTS = 1000


def pack_documents(tokenizer, documents: Iterable[str], block_size: int = BLOCK_SIZE) -> list[list[int]]:
    """Token ids of ``<s> doc </s> <s> doc </s> ...`` cut into blocks of ``block_size`` (the last,
    partial block is dropped): the usual packing for causal language-model training."""
    ids: list[int] = []
    for encoded in tokenizer(list(documents), add_special_tokens=True, verbose=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]


def heldout_blocks(tokenizer, num_documents: int = HELDOUT_DOCUMENTS, block_size: int = BLOCK_SIZE) -> list[list[int]]:
    """The held-out perplexity set: ``num_documents`` documents drawn with ``HELDOUT_CORPUS_SEED``, packed."""
    return pack_documents(tokenizer, pretraining_corpus(num_documents, seed=HELDOUT_CORPUS_SEED), block_size)


def sample_prompts(world: World | None = None) -> list[str]:
    """Prompts whose greedy continuations show what a model has learnt (for reports and the demo)."""
    person = (world or demo_world()).people[0]
    return [
        f"{person.name} lives in",
        "After Tuesday comes",
        "12 plus 7 is",
        "The letters k p e reversed are",
        "Counting up from 41:",
    ]
