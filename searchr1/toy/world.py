"""The toy world: married couples with a birthplace and an occupation, their corpus and QA splits.

Everything is derived from one seed through a single `random.Random`, and every collection that is
shuffled or sampled is sorted first, so the same seed gives the same bytes in any process (iterating a
`set` of strings would not: its order depends on the per-process hash seed).

Each person gets one passage that names both spouses, with every fact after a prefix the model can
rebuild from the question ("X was born in", "X works as a", "X is married to"), which is what lets a tiny
model learn to read answers by copying. Questions are single-hop ("nq") or two-entity ("hotpotqa": one
search that names both spouses must bring back both passages, as max_turns is 2).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from searchr1.config import FromConfig
from searchr1.prompt import make_messages, normalize_question

FIRST_NAMES = """
Aaron Abigail Adam Adrian Alan Albert Alexander Alice Alison Amanda Amber Amelia Amy Andrea Angela Anna
Anthony Arthur Audrey Austin Barbara Benjamin Bernard Betty Beverly Blake Bradley Brandon Brenda Brian
Brittany Bruce Bryan Caleb Cameron Carl Carlos Carmen Carol Caroline Catherine Charles Charlotte Cheryl
Christina Christine Christopher Cindy Claire Clara Colin Connor Craig Crystal Cynthia Daniel Danielle
Darren David Deborah Debra Denise Dennis Derek Diana Diane Donald Donna Doris Dorothy Douglas Dylan Edith
Edward Eleanor Elena Elijah Elizabeth Ellen Emily Emma Eric Ethan Eugene Evelyn Fiona Frances Frank
Gabriel Gail Gary Gavin George Gerald Gloria Grace Gregory Hannah Harold Harriet Heather Helen Henry Holly
Howard Ian Irene Isaac Isabel Jacob Jacqueline Janet Janice Jason Jeffrey Jennifer Jeremy Jessica Joan
Joanne Joel Jonathan Joseph Joshua Joyce Judith Julia Julian Justin Karen Katherine Kathleen Keith Kelly
Kenneth Kevin Kimberly Kyle Laura Lauren Lawrence Leah Leonard Lillian Linda Lisa Logan Lois Louise Lucas
Lucy Madison Margaret Maria Marilyn Marion Mark Martha Matthew Megan Melanie Melissa Michael Michelle
Miriam Monica Nancy Natalie Nathan Nicholas Nicole Noah Norman Oliver Olivia Oscar Pamela Patricia Paul
Peter Philip Phyllis Rachel Ralph Raymond Rebecca Richard Robert Robin Roger Ronald Rose Russell Ruth
Samantha Samuel Sandra Sarah Scott Sean Sharon Shirley Sophia Stanley Stephanie Stephen Steven Susan
Sylvia Teresa Theodore Timothy Tyler Valerie Vanessa Victor Victoria Vincent Virginia Walter Wayne
Wendy William Zachary
""".split()

SURNAMES = """
Abbott Acosta Adams Aguilar Alvarez Anderson Andrews Armstrong Arnold Atkinson Bailey Baker Baldwin Banks
Barker Barnes Barrett Barton Bates Beck Bennett Berry Bishop Black Blair Bowen Boyd Bradford Brennan
Brooks Bryant Burke Burns Burton Bush Butler Byrd Caldwell Campbell Carpenter Carr Carroll Carter
Castillo Chambers Chandler Chapman Clarke Cohen Cole Coleman Collins Conner Cooper Cox Crawford Cross
Cunningham Curtis Daniels Davidson Davis Dawson Day Dean Delgado Diaz Dixon Doyle Duncan Dunn Edwards
Elliott Ellis Erickson Evans Ferguson Fernandez Fischer Fisher Fleming Fletcher Flores Ford Foster
Fowler Fox Freeman Fuller Garcia Gardner Garrett Gibson Gilbert Gomez Gonzalez Goodman Gordon Graham
Grant Graves Gray Greene Gregory Griffin Gutierrez Hale Hall Hamilton Hansen Hardy Harper Harrison
Hart Harvey Hawkins Hayes Henderson Herrera Hicks Hill Hoffman Holland Holmes Hopkins Howell Hudson
Hughes Hunt Hunter Jackson Jacobs Jenkins Jennings Jensen Johnston Jordan Keller Kennedy Kim King Klein
Knight Lambert Lane Lawson Leonard Lewis Lindsey Little Lloyd Logan Long Lopez Lowe Lynch Marsh Marshall
Martin Mason Maxwell Mccarthy Medina Meyer Miller Mills Mitchell Montgomery Moore Morales Moreno Morgan
Morris Morrison Murphy Murray Myers Nelson Newman Nichols Norris Obrien Olson Ortiz Owens Palmer Parker
Patterson Payne Pearson Perkins Perry Peters Peterson Phillips Pierce Porter Powell Price Quinn Ramirez
Ramos Reed Reeves Reid Reyes Reynolds Rhodes Rice Richards Riley Rivera Roberts Robertson Robinson Rogers
Romero Ross Russo Ryan Sanders Santos Schmidt Schneider Shaw Shelton Simmons Simpson Sims Snyder Spencer
Stanley Steele Stevens Stone Sullivan Sutton Swanson Taylor Thornton Tucker Turner Vargas Vaughn Wade
Wagner Walker Wallace Walsh Ward Warren Watkins Watson Weaver Webb Wells West Wheeler Whitaker Wilkins
Willis Wood Woods Wright Young
""".split()

# One-word cities, so that an answer is one word-level token. "Beijing" is deliberately absent: the
# Search-R1 prompt holds `<answer> Beijing </answer>`, which the faithful EM reads as the answer of a
# response that gives none.
CITIES = """
Amsterdam Ankara Athens Atlanta Austin Baltimore Bangkok Barcelona Berlin Bogota Boston Brisbane
Brussels Budapest Cairo Calgary Chicago Cologne Copenhagen Dallas Denver Detroit Dublin Edinburgh
Florence Frankfurt Geneva Glasgow Hamburg Helsinki Houston Istanbul Jakarta Kyoto Lagos Leeds Lima Lisbon
Liverpool London Lyon Madrid Manchester Manila Marseille Melbourne Miami Milan Montreal Moscow Munich
Nairobi Naples Osaka Oslo Ottawa Paris Perth Phoenix Prague Rome Santiago Seattle Seoul Stockholm
Sydney Tokyo Toronto Vancouver Vienna Warsaw
""".split()

OCCUPATIONS = """
accountant architect baker barber carpenter chef chemist dentist designer economist editor electrician
engineer farmer firefighter florist geologist historian journalist judge lawyer librarian mechanic
musician nurse painter pharmacist photographer physicist pilot plumber poet professor sailor scientist
surgeon tailor teacher translator veterinarian
""".split()

# Answers must never normalise to these (see CITIES): "and" is what the faithful EM reads from a
# response that echoes the instructions.
FORBIDDEN_ANSWERS = ("beijing", "and")

NQ = "nq"
HOTPOTQA = "hotpotqa"
SINGLE_HOP_TEMPLATES = ("born", "occupation", "spouse")
TWO_HOP_TEMPLATES = ("occupation_of_born_in", "spouse_occupation_of_born_in")


def article(word: str) -> str:
    """'a' or 'an' before ``word`` (by its first letter: enough for this vocabulary)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    spouse: int  # index of the spouse in World.people
    couple: int
    passage_id: str  # the corpus row (== line number) of this person's passage


@dataclass(frozen=True)
class Question:
    """One generated question, with what a demonstration needs to show how it is answered."""

    question: str
    answer: str
    data_source: str  # "nq" | "hotpotqa"
    template: str
    names: tuple[str, ...]  # the people named in the question, in question order
    subject: int  # the person the question is about (for two-hop: the one born in the named city)
    target: int  # the person whose fact is the answer
    couple: int


@dataclass
class WorldSizes(FromConfig):
    # From the config (toy.*): no defaults here.
    n_couples: int
    test_per_split: int
    rl_questions: int
    # Not config keys: how the couples are split (test / RL / warm start) and the RL question mix.
    n_test_couples: int = 400
    n_rl_couples: int = 1300
    two_hop_fraction: float = 0.5  # of the RL training questions

    CONFIG_KEYS: ClassVar[dict[str, str]] = {
        "n_couples": "toy.n_couples",
        "test_per_split": "toy.test_per_split",
        "rl_questions": "toy.train_questions",
    }

    def validate(self) -> None:
        if self.n_couples <= 0:
            raise ValueError(f"n_couples must be > 0, got {self.n_couples}")
        if self.n_test_couples <= 0 or self.n_rl_couples <= 0:
            raise ValueError(
                f"n_test_couples and n_rl_couples must be > 0, got {self.n_test_couples}, {self.n_rl_couples}"
            )
        if self.n_test_couples + self.n_rl_couples >= self.n_couples:
            raise ValueError(
                f"n_test_couples ({self.n_test_couples}) + n_rl_couples ({self.n_rl_couples}) must leave "
                f"warm-start couples out of n_couples ({self.n_couples})"
            )
        if not 0.0 <= self.two_hop_fraction <= 1.0:
            raise ValueError(f"two_hop_fraction must be in [0, 1], got {self.two_hop_fraction}")
        max_names = len(first_names()) * len(surnames())
        if 2 * self.n_couples > max_names:
            raise ValueError(f"n_couples={self.n_couples} needs more than the {max_names} distinct names")


@dataclass
class World:
    seed: int
    sizes: WorldSizes
    people: list[Person]
    splits: dict[str, list[int]] = field(default_factory=dict)  # "warmstart" | "rl" | "test" -> couples

    def couple_members(self, couple: int) -> tuple[int, int]:
        return 2 * couple, 2 * couple + 1

    def passage_text(self, person: int) -> str:
        p = self.people[person]
        spouse = self.people[p.spouse].name
        return (
            f"{p.name} was born in {p.city}, where {p.name} works as {article(p.job)} {p.job}. "
            f"{p.name} is married to {spouse}."
        )

    def passage_contents(self, person: int) -> str:
        """Search-R1 `contents`: the quoted title (the person's name), a newline, the text."""
        return f'"{self.people[person].name}"\n{self.passage_text(person)}'

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "sizes": asdict(self.sizes),
            "people": [asdict(p) for p in self.people],
            "splits": self.splits,
        }

    @classmethod
    def from_json(cls, data: dict) -> World:
        return cls(
            seed=data["seed"],
            sizes=WorldSizes(**data["sizes"]),
            people=[Person(**p) for p in data["people"]],
            splits={k: list(v) for k, v in data["splits"].items()},
        )


def first_names() -> list[str]:
    return sorted(set(FIRST_NAMES))


def surnames() -> list[str]:
    # A name in both lists would make "first last" ambiguous to read; drop it from the surnames.
    firsts = set(FIRST_NAMES)
    return sorted(set(SURNAMES) - firsts)


def make_world(seed: int, sizes: WorldSizes) -> World:
    """The people, couples and the couple splits for ``seed`` (pure; no files)."""
    sizes.validate()
    rng = random.Random(seed)
    all_names = [f"{f} {s}" for f in first_names() for s in surnames()]
    names = rng.sample(all_names, 2 * sizes.n_couples)
    cities, jobs = sorted(CITIES), sorted(OCCUPATIONS)
    n_people = 2 * sizes.n_couples
    # Corpus rows are a permutation of the people, so that spouses are not neighbours in the corpus.
    rows = list(range(n_people))
    rng.shuffle(rows)
    people: list[Person] = []
    for couple in range(sizes.n_couples):
        city_a, city_b = rng.sample(cities, 2)  # different, so "the person born in C" is one person
        job_a, job_b = rng.sample(jobs, 2)
        a, b = 2 * couple, 2 * couple + 1
        people.append(Person(names[a], city_a, job_a, b, couple, str(rows[a])))
        people.append(Person(names[b], city_b, job_b, a, couple, str(rows[b])))
    order = list(range(sizes.n_couples))
    rng.shuffle(order)
    n_test, n_rl = sizes.n_test_couples, sizes.n_rl_couples
    splits = {
        "test": sorted(order[:n_test]),
        "rl": sorted(order[n_test : n_test + n_rl]),
        "warmstart": sorted(order[n_test + n_rl :]),
    }
    return World(seed=seed, sizes=sizes, people=people, splits=splits)


def corpus_rows(world: World) -> list[dict[str, str]]:
    """The corpus in row order: row i has id str(i)."""
    by_row = sorted(range(len(world.people)), key=lambda i: int(world.people[i].passage_id))
    return [{"id": world.people[i].passage_id, "contents": world.passage_contents(i)} for i in by_row]


def make_question(world: World, couple: int, template: str, rng: random.Random) -> Question:
    """One question of ``template`` about ``couple``; ``rng`` picks the person and the name order."""
    a, b = world.couple_members(couple)
    subject = rng.choice((a, b))
    p = world.people[subject]
    spouse = p.spouse
    if template == "born":
        return Question(f"where was {p.name} born", p.city, NQ, template, (p.name,), subject, subject, couple)
    if template == "occupation":
        return Question(f"what is the occupation of {p.name}", p.job, NQ, template, (p.name,), subject, subject, couple)
    if template == "spouse":
        return Question(
            f"who is {p.name} married to", world.people[spouse].name, NQ, template, (p.name,), subject, subject, couple
        )
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    names = (world.people[first].name, world.people[second].name)
    among = f"among {names[0]} and {names[1]}"
    if template == "occupation_of_born_in":
        return Question(
            f"{among}, what is the occupation of the person born in {p.city}",
            p.job,
            HOTPOTQA,
            template,
            names,
            subject,
            subject,
            couple,
        )
    if template == "spouse_occupation_of_born_in":
        return Question(
            f"{among}, what is the occupation of the spouse of the person born in {p.city}",
            world.people[spouse].job,
            HOTPOTQA,
            template,
            names,
            subject,
            spouse,
            couple,
        )
    raise ValueError(
        f"unknown question template {template!r}; expected one of {SINGLE_HOP_TEMPLATES + TWO_HOP_TEMPLATES}"
    )


def sample_questions(
    world: World,
    couples: list[int],
    n: int,
    two_hop_fraction: float,
    rng: random.Random,
    *,
    distinct_couples: bool = False,
) -> list[Question]:
    """``n`` questions over ``couples``; with ``distinct_couples`` each couple is used at most once."""
    couples = sorted(couples)
    if distinct_couples:
        if n > len(couples):
            raise ValueError(f"asked for {n} questions on distinct couples but only {len(couples)} couples")
        picked = rng.sample(couples, n)
    else:
        picked = [rng.choice(couples) for _ in range(n)]
    questions = []
    for couple in picked:
        templates = TWO_HOP_TEMPLATES if rng.random() < two_hop_fraction else SINGLE_HOP_TEMPLATES
        questions.append(make_question(world, couple, rng.choice(templates), rng))
    return questions


def question_rows(questions: list[Question], split: str) -> list[dict]:
    """Rows in the Search-R1 schema of PeterJinGo/nq_hotpotqa_train (plus our `question` and `id`)."""
    rows = []
    for index, q in enumerate(questions):
        rows.append(
            {
                "id": f"{split}_{index}",
                "question": normalize_question(q.question),
                "golden_answers": [q.answer],
                "data_source": q.data_source,
                "prompt": make_messages(q.question),
                "ability": "fact-reasoning",
                "reward_model": {"style": "rule", "ground_truth": {"target": [q.answer]}},
                "extra_info": {"split": split, "index": index},
            }
        )
    return rows


def split_questions(world: World) -> dict[str, list[Question]]:
    """The RL training set and the merged test set (single-hop and two-hop, per split)."""
    sizes = world.sizes
    # Separate generators per split so that changing one split's size leaves the others unchanged.
    rng_train = random.Random(f"{world.seed}/train")
    rng_test = random.Random(f"{world.seed}/test")
    train = sample_questions(world, world.splits["rl"], sizes.rl_questions, sizes.two_hop_fraction, rng_train)
    n_test = min(sizes.test_per_split, len(world.splits["test"]))
    test = sample_questions(
        world, world.splits["test"], n_test, 0.0, rng_test, distinct_couples=True
    ) + sample_questions(world, world.splits["test"], n_test, 1.0, rng_test, distinct_couples=True)
    for q in train + test:
        if q.answer.lower() in FORBIDDEN_ANSWERS:  # guarded by construction; a cheap second check
            raise ValueError(f"forbidden answer {q.answer!r} in question {q.question!r}")
    return {"train": train, "test": test}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_world(seed: int, out_dir: str | Path, sizes: WorldSizes) -> World:
    """Write corpus.jsonl, train.parquet, test.parquet and world.json under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = make_world(seed, sizes)
    corpus_path = out / "corpus.jsonl"
    with open(corpus_path, "w", encoding="utf-8", newline="\n") as f:
        for row in corpus_rows(world):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for split, questions in split_questions(world).items():
        pd.DataFrame(question_rows(questions, split)).to_parquet(out / f"{split}.parquet", index=False)
    meta = world.to_json()
    meta["corpus_sha256"] = file_sha256(corpus_path)
    (out / "world.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return world


def load_world(world_dir: str | Path) -> World:
    path = Path(world_dir) / "world.json"
    if not path.exists():
        raise FileNotFoundError(f"no world.json in {world_dir} (run `python -m searchr1.toy world` first)")
    return World.from_json(json.loads(path.read_text(encoding="utf-8")))
