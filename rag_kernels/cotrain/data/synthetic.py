"""The embedded default data set: a fictional knowledge base generated deterministically.

:func:`load_default` builds, from ``random.Random(seed)`` alone (no network, no model):

* invented entities of four types — structures ("Varnholt Bridge"), people ("Ilsa Moren"),
  places ("Tellmar") and artefacts ("the Sorrel Tapestry") — whose names are built from
  syllables, each with 3-4 attributes (who built / founded / made it, where it is, which
  year, what material, which colour, ...). Attribute values are drawn uniformly, so an
  answer cannot be guessed from the question;
* one passage per entity: its facts in varied sentences (several templates per relation,
  later mentions by a short reference such as "the bridge"), mixed with 2-3 unrelated
  sentences on varied topics that name other people and places (so the answer must be
  read, not pattern matched); people and places that have their own passage also occur
  as values in other passages;
* confusable *distractor* entities: entities come in families of 3-5 with near-duplicate
  names ("Varnholt Bridge" / "Varnholm Bridge", one letter apart) or, sometimes, namesakes
  ("Varnholt Tower", "Upper Tellmar", a relative with the same surname), of the same kind
  and with the same relations but different values. Each passage names its siblings
  ("Unlike Varnholm Bridge, Varnholt Bridge was ...", "... not to be confused with ..."),
  so an off-the-shelf sentence encoder often ranks a sibling first while the gold passage
  stays in its top 20 (all-MiniLM-L6-v2: recall@1 about 0.6, recall@20 about 1.0);
* questions that paraphrase the passage (separate question templates, never the passage's
  wording), with a short answer (1-4 words) that occurs verbatim in the gold passage and
  never in the question.

Splits are by question. Each (entity, relation) fact gives at most one question. Train
questions come from a "seen" part of the corpus; dev and test take ``heldout_fraction`` of
their questions from passages that are no train question's gold passage (disjoint between
dev and test) and the rest from seen passages, about a relation not asked in train.

Nothing in the library may depend on these templates: this is a test bed, the training
code treats it like any user corpus.
"""

from __future__ import annotations

import random
import re

from .jsonl import Dataset, Passage, QAExample

__all__ = ["load_default", "DEFAULT_SIZES"]

# Difficulty knobs, tuned so that all-MiniLM-L6-v2 is clearly imperfect at top-1 (near 0.6 on
# dev/test) and near perfect at top-20. Family sizes and weights; chance that a passage
# lists its siblings, opens by contrasting itself with one, or that a sibling is a namesake.
_FAMILY_SIZES = ([3, 4, 5], [0.3, 0.4, 0.3])
_MENTION_PROB = 1.0
_CONTRAST_PROB = 1.0
_NAMESAKE_PROB = 0.1
_MUTATED_LETTERS = [1]  # letters changed in a near-duplicate name
_MUTATE_END_PROB = 1.0  # mutate in the second half of the word
_N_FILLERS = [2, 3]
_NAME_REPEAT_PROB = 0.0  # chance that a later sentence repeats the full name
_EXTRA_POOL = 60  # people and places that occur only as values

DEFAULT_SIZES = {"n_entities": 800, "n_train": 400, "n_dev": 100, "n_test": 100}

# --- names -------------------------------------------------------------------------------

# fmt: off
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r",
           "s", "st", "t", "th", "v", "w", "z", "sk", "tr", "c", "j", "al", "el", "or", "ul"]
_NUCLEI = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ai", "y"]
_CODAS = ["", "", "", "n", "r", "l", "m", "s", "th", "nd", "rn", "ld", "st", "v"]
_SUFFIXES = {
    "place": ["holt", "mar", "wick", "ford", "den", "mere", "ton", "by", "stead", "vik", "heim",
              "dal", "moor", "gard", "well", "burg", "mond", "sett", "ham", "ley", "rith", "ora",
              "ia", "enne", "wyn", "dor", "vale", "crest"],
    "first": ["a", "o", "is", "en", "ric", "ina", "ald", "wen", "ya", "as", "el", "ette", "iel",
              "ard", "an", "ora", "us", "ith", "ian", "e"],
    "last": ["sen", "ley", "wood", "ford", "mann", "ard", "ell", "ick", "en", "ow", "ing", "er",
             "ton", "bury", "vane", "holm", "ric", "ash", "worth", "dale"],
}
# fmt: on

_VOWELS = "aeiouy"
_CONSONANTS = "bcdfghklmnprstvwz"


class _Names:
    """Unique invented words (a syllable plus a suffix); :meth:`sibling` changes one or two
    letters, giving a near-duplicate ("Varnholt" -> "Varnholm")."""

    def __init__(self, rng: random.Random, reserved: set[str]):
        self.rng = rng
        self.used: set[str] = set()
        self.reserved = reserved  # lower-case words that must never be a name

    def _ok(self, word: str) -> bool:
        w = word.lower()
        return 4 <= len(w) <= 10 and w not in self.used and w not in self.reserved

    def word(self, style: str = "place") -> str:
        rng = self.rng
        while True:
            root = rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
            if rng.random() < 0.25:
                root += rng.choice(_ONSETS[:22]) + rng.choice(_NUCLEI)
            w = (root + rng.choice(_SUFFIXES[style])).capitalize()
            if self._ok(w):
                self.used.add(w.lower())
                return w

    def sibling(self, word: str) -> str:
        rng = self.rng
        for _ in range(500):
            letters = list(word.lower())
            for _ in range(rng.choice(_MUTATED_LETTERS)):
                # mostly in the second half, where a reader's eye (and a tokenizer) is less sure
                lo = len(letters) // 2 if rng.random() < _MUTATE_END_PROB else 1
                i = rng.randrange(lo, len(letters))
                pool = _VOWELS if letters[i] in _VOWELS else _CONSONANTS
                letters[i] = rng.choice([c for c in pool if c != letters[i]])
            w = "".join(letters).capitalize()
            if self._ok(w):
                self.used.add(w.lower())
                return w
        return self.word()  # pragma: no cover - practically unreachable


# --- values ------------------------------------------------------------------------------

# fmt: off
_COLOURS = ["ochre", "crimson", "teal", "indigo", "amber", "ivory", "scarlet", "violet",
            "silver", "grey", "white", "black", "green", "blue", "yellow", "rust red"]
_STONE = ["granite", "basalt", "marble", "sandstone", "limestone", "oak", "cedar", "red brick",
          "slate", "iron", "flint", "chalk", "bluestone", "timber"]
_FINE = ["silk", "wool", "linen", "silver", "gold", "bronze", "ivory", "walnut", "copper",
         "glass", "leather", "pewter", "jade", "ebony"]
_TRADES = ["glassblower", "cartographer", "clockmaker", "weaver", "shipwright", "apothecary",
           "astronomer", "stonemason", "bookbinder", "falconer", "brewer", "goldsmith", "tanner",
           "lute maker", "herbalist", "ferryman"]
_INSTRUMENTS = ["lute", "harp", "viol", "flute", "drum", "horn", "fiddle", "zither", "bagpipe",
                "lyre", "organ", "cittern", "dulcimer", "oboe"]
_GOODS = ["salted plums", "copper pots", "wool", "dried fish", "dyed cloth", "glassware",
          "honey", "goat cheese", "timber", "sea salt", "paper", "plum wine", "tin", "rope",
          "pottery", "candles"]
_STRUCTURE_KINDS = ["Bridge", "Tower", "Lighthouse", "Abbey", "Mill", "Gate", "Library",
                    "Observatory", "Fountain", "Hall", "Aqueduct", "Chapel"]
_PLACE_KINDS = ["town", "village", "port", "city"]
_PLACE_PREFIXES = ["Upper", "Lower", "North", "South", "East", "West", "Old", "New", "Great",
                   "Little"]
_ARTEFACT_KINDS = ["Tapestry", "Codex", "Chalice", "Crown", "Map", "Portrait", "Clock", "Harp",
                   "Mask", "Shield", "Lantern", "Atlas"]
# fmt: on

# value kinds: "person", "place", "river", "year" or a list of literal values
# Each relation: (value kind, passage templates, question templates). Passage templates use
# {S} (subject at the start of a sentence), {s} (subject inside a sentence), {S_poss},
# {s_poss} and {a} (the answer); question templates use {n} (the full name).
# fmt: off
_RELATIONS: dict[str, dict[str, tuple]] = {
    "structure": {
        "builder": ("person", [
            "{S} was designed by the architect {a}.",
            "The master mason {a} raised {s}.",
            "Construction of {s} was overseen by {a}.",
            "{S} is the work of {a}.",
        ], [
            "Who built {n}?",
            "Which architect is credited with {n}?",
            "Who was responsible for constructing {n}?",
            "Name the builder of {n}.",
        ]),
        "year": ("year", [
            "{S} was completed in {a}.",
            "Work on {s} came to an end in {a}.",
            "{S} has stood since {a}.",
            "{S} opened in the year {a}.",
        ], [
            "In which year was {n} finished?",
            "When was {n} built?",
            "What year did building work on {n} end?",
        ]),
        "material": ("stone", [
            "{S} is built of {a}.",
            "{S_poss} walls are made of {a}.",
            "The builders of {s} used {a} throughout.",
        ], [
            "What material is {n} constructed from?",
            "Out of what was {n} built?",
            "What is {n} made of?",
        ]),
        "location": ("place", [
            "{S} stands in the {pk} of {a}.",
            "{S} can be found in {a}.",
            "{S} rises above the rooftops of {a}.",
        ], [
            "Where is {n}?",
            "In which town is {n} located?",
            "Where would one go to see {n}?",
        ]),
        "colour": ("colour", [
            "{S} is painted {a}.",
            "The facade of {s} is {a}.",
            "Locals know {s} by its {a} paint.",
        ], [
            "What colour is {n}?",
            "Which colour has {n} been painted?",
            "What is the colour of {n}?",
        ]),
    },
    "person": {
        "birthplace": ("place", [
            "{S} was born in {a}.",
            "{S} is a native of the {pk} of {a}.",
            "{S_poss} birthplace was {a}.",
        ], [
            "Where was {n} born?",
            "What is the hometown of {n}?",
            "In which town did {n} come into the world?",
        ]),
        "profession": ("trade", [
            "{S} worked as {art} {a}.",
            "{S} earned a living as {art} {a}.",
            "By trade, {s} was {art} {a}.",
        ], [
            "What was the occupation of {n}?",
            "What did {n} do for a living?",
            "What was {n}'s job?",
        ]),
        "teacher": ("person", [
            "{S} was apprenticed to {a}.",
            "{S} learned the craft from {a}.",
            "As a youth, {s} studied under {a}.",
        ], [
            "Who trained {n}?",
            "Who was the mentor of {n}?",
            "Who taught {n}?",
        ]),
        "birth_year": ("year", [
            "{S} was born in the year {a}.",
            "{S_poss} birth is recorded in {a}.",
            "{S} came into the world in {a}.",
        ], [
            "In what year was {n} born?",
            "When was {n} born?",
            "What is the birth year of {n}?",
        ]),
        "instrument": ("instrument", [
            "{S} played the {a}.",
            "In the evenings {s} played the {a} for guests.",
            "{S} was a skilled {a} player.",
        ], [
            "Which instrument did {n} play?",
            "What musical instrument was {n} known for?",
            "{n} was a musician: on what instrument?",
        ]),
    },
    "place": {
        "founder": ("person", [
            "{S} was founded by {a}.",
            "{S} owes its founding to {a}.",
            "The first settlers of {s} were led by {a}.",
        ], [
            "Who founded {n}?",
            "Who established {n}?",
            "Who is remembered as the founder of {n}?",
        ]),
        "river": ("river", [
            "The river {a} flows through {s}.",
            "{S} lies on the banks of the {a}.",
            "{S} grew along the {a} river.",
        ], [
            "Which river runs through {n}?",
            "On what river does {n} lie?",
            "Name the river at {n}.",
        ]),
        "export": ("goods", [
            "{S} is known for its {a}.",
            "Merchants in {s} trade mainly in {a}.",
            "The chief export of {s} is {a}.",
        ], [
            "What is {n} famous for producing?",
            "What goods does {n} mainly sell?",
            "What does {n} export?",
        ]),
        "founding_year": ("year", [
            "{S} received its charter in {a}.",
            "The first houses of {s} were built in {a}.",
            "{S} was settled in {a}.",
        ], [
            "When was {n} founded?",
            "In what year was {n} established?",
            "What is the founding year of {n}?",
        ]),
    },
    "artefact": {
        "maker": ("person", [
            "{S} was crafted by {a}.",
            "{S} is the work of {a}.",
            "The artisan {a} created {s}.",
        ], [
            "Who made {n}?",
            "Who was the maker of {n}?",
            "Which artisan produced {n}?",
        ]),
        "kept_in": ("place", [
            "{S} is kept in {a}.",
            "{S} is now held in a museum in {a}.",
            "Today {s} is displayed in {a}.",
        ], [
            "Where is {n} kept today?",
            "In which town can {n} be seen?",
            "Where is {n} on display?",
        ]),
        "material": ("fine", [
            "{S} is fashioned from {a}.",
            "{S} is wrought in {a}.",
            "The maker of {s} worked mostly in {a}.",
        ], [
            "What material is {n} made of?",
            "From what was {n} made?",
            "What is {n} made from?",
        ]),
        "year": ("year", [
            "{S} was finished in {a}.",
            "{S} dates from {a}.",
            "{S} was completed in {a}.",
        ], [
            "When was {n} made?",
            "In which year was {n} created?",
            "What year does {n} come from?",
        ]),
        "colour": ("colour", [
            "{S} is mostly {a}.",
            "The dominant colour of {s} is {a}.",
            "{S} shines {a} in the light.",
        ], [
            "What colour is {n}?",
            "Which colour dominates {n}?",
            "Of what colour is {n}?",
        ]),
    },
}
# fmt: on

# Unrelated sentences: {S}/{s} the subject, {p} another place, {h} another person. Their
# topics vary so that two passages about similar entities differ in more than the names.
_THING_FILLERS = [
    "A local legend says that a silver bell lies buried beneath {s}.",
    "Every spring a lantern festival is held in honour of {s}.",
    "Scholars still argue about an old inscription connected with {s}.",
    "Children in {p} sing a rhyme about {s}.",
    "The chronicler {h} described {s} as the pride of the valley.",
    "During the great flood, boats were moored beside {s} for weeks.",
    "Painters from {p} come to sketch {s} at dawn.",
    "A fire in the winter of the comet damaged {s}, but it was restored.",
    "{S} is mentioned in a letter from {h} to the council of {p}.",
    "Tax records from {p} list {s} among the treasures of the region.",
    "Many visitors leave a coin for luck when they see {s}.",
    "Soldiers camped near {s} during the war of the three rivers.",
]
_FILLERS = {
    "structure": _THING_FILLERS
    + [
        "Travellers from {p} often rest there.",
        "A plaque near {s} honours {h}, a local merchant.",
        "{S} appears in a song by {h}.",
        "Pilgrims on the road to {p} pass close by.",
    ],
    "person": [
        "{S} once travelled to {p}.",
        "{S} corresponded for years with {h}.",
        "{S} is buried in {p}.",
        "A portrait of {s} hangs in {p}.",
        "{S} kept a diary full of sketches of birds.",
        "In old age {s} moved to a small house near {p}.",
        "{S} survived a shipwreck off the coast of {p}.",
        "A street in {p} is named after {s}.",
        "{S} was known for a quick temper and a generous heart.",
        "{S} married into a family of merchants from {p}.",
        "The letters of {s} were published by {h}.",
        "{S} fell ill during the famine years but recovered.",
    ],
    "place": _THING_FILLERS
    + [
        "Merchants from {p} visit {s} each autumn.",
        "{S} had a long feud with {p}.",
        "The poet {h} lived in {s} for a while.",
        "A road links {s} with {p}.",
    ],
    "artefact": _THING_FILLERS
    + [
        "{S} was once admired by {h}.",
        "A copy of {s} was sent to {p}.",
        "{h} wrote a short essay about {s}.",
        "{S} was carried through {p} in a procession.",
    ],
}

# Sentences that name the near-duplicate siblings ({o}: one name or "A, B or C"): hard
# negatives, as in real corpora where similar entities mention each other. A passage that
# names all of its siblings leaves a bag-of-words encoder little beyond word order to
# tell it from theirs.
_SIBLING_MENTIONS = {
    "structure": [
        "{S} is not to be confused with {o}.",
        "Visitors sometimes mistake {s} for {o}.",
        "Guidebooks often mix up {s} and {o}.",
    ],
    "person": [
        "{S} is often confused with {o}.",
        "{S} is not to be confused with {o}.",
        "Old records sometimes mix up {s} and {o}.",
    ],
    "place": [
        "{S} is not to be confused with {o}.",
        "Old maps often mix up {s} and {o}.",
        "Travellers sometimes mistake {s} for {o}.",
    ],
    "artefact": [
        "{S} is not to be confused with {o}.",
        "Collectors sometimes mistake {s} for {o}.",
        "Catalogues often mix up {s} and {o}.",
    ],
}


def _enumerate(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# fmt: off
_LITERALS = {"colour": _COLOURS, "stone": _STONE, "fine": _FINE, "trade": _TRADES,
             "instrument": _INSTRUMENTS, "goods": _GOODS}
# fmt: on

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def _norm(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split())


def _contains(haystack: str, needle: str) -> bool:
    return f" {_norm(needle)} " in f" {_norm(haystack)} "


# --- entities ----------------------------------------------------------------------------


class _Entity:
    def __init__(self, etype, kind, name, short, relations, values):
        self.etype, self.kind, self.name, self.short = etype, kind, name, short
        self.relations: list[str] = relations
        self.values: dict[str, str] = values
        self.pid = ""
        self.text = ""
        self.family: list[_Entity] = []


class _World:
    def __init__(
        self, rng: random.Random, mention_prob: float, contrast_prob: float, namesake_prob: float
    ):
        self.rng = rng
        self.namesake_prob = namesake_prob
        self.mention_prob = mention_prob
        self.contrast_prob = contrast_prob
        reserved = {w for lst in _LITERALS.values() for v in lst for w in v.split()}
        reserved |= {w.lower() for w in _STRUCTURE_KINDS + _ARTEFACT_KINDS + _PLACE_KINDS}
        reserved |= {w.lower() for w in _PLACE_PREFIXES}
        self.names = _Names(rng, reserved)
        # answer pools: people and places are shared by the whole world
        # answer pools; load_default adds the described people and places to them, so that
        # an entity's name also occurs in other passages (as a builder, a location, ...)
        self.people = [" ".join(self._person_name()) for _ in range(_EXTRA_POOL)]
        self.places = [self.names.word() for _ in range(_EXTRA_POOL)]
        self.rivers = [self.names.word() for _ in range(60)]

    def _person_name(self, base: tuple | None = None) -> tuple:
        if base is None:
            return (self.names.word("first"), self.names.word("last"))
        first, last = base
        if self.rng.random() < 0.7:
            return (first, self.names.sibling(last))
        return (self.names.sibling(first), last)

    def value(self, vkind: str, avoid: set[str]) -> str:
        for _ in range(100):
            if vkind == "person":
                v = self.rng.choice(self.people)
            elif vkind == "place":
                v = self.rng.choice(self.places)
            elif vkind == "river":
                v = self.rng.choice(self.rivers)
            elif vkind == "year":
                v = str(self.rng.randint(1100, 1899))
            else:
                v = self.rng.choice(_LITERALS[vkind])
            if v not in avoid:
                return v
        raise RuntimeError("could not draw a distinct value")  # pragma: no cover

    def family(self, etype: str, size: int) -> list[_Entity]:
        """An entity and ``size - 1`` confusable siblings of the same type and relations:
        near-duplicate names ("Varnholt Bridge" / "Varnholm Bridge") and namesakes (the
        "Varnholt Tower", "Upper Tellmar", "Tomas Moren" next to "Ilsa Moren")."""
        rng = self.rng
        relations = rng.sample(list(_RELATIONS[etype]), rng.choice([3, 4]))
        kinds = {
            "structure": _STRUCTURE_KINDS,
            "artefact": _ARTEFACT_KINDS,
            "place": _PLACE_KINDS,
            "person": ["person"],
        }[etype]
        kind0 = rng.choice(kinds)
        out: list[_Entity] = []
        names: set[str] = set()
        if etype == "person":
            first0, last0 = self._person_name()
        else:
            word0 = self.names.word()
        for i in range(size):
            kind = kind0
            namesake = i > 0 and rng.random() < self.namesake_prob
            if etype == "person":
                first, last = first0, last0
                if namesake:  # a relative: same surname
                    first = self.names.word("first")
                elif i:
                    first, last = self._person_name((first0, last0))
                name, short = f"{first} {last}", last
            elif etype == "place":
                word = self.names.sibling(word0) if i and not namesake else word0
                if namesake:
                    used = {n.split()[0] for n in names if " " in n}
                    word = rng.choice([p for p in _PLACE_PREFIXES if p not in used]) + " " + word
                kind = rng.choice(kinds)
                name, short = word, f"the {kind}"
            else:
                word = word0
                if namesake:
                    taken = {e.kind for e in out if e.name.endswith(word0 + " " + e.kind)}
                    kind = rng.choice([k for k in kinds if k not in taken | {kind0}])
                elif i:
                    word = self.names.sibling(word0)
                name = f"{word} {kind}" if etype == "structure" else f"the {word} {kind}"
                short = f"the {kind.lower()}"
            if name in names:  # pragma: no cover - tiny chance; skip the duplicate
                continue
            names.add(name)
            out.append(_Entity(etype, kind, name, short, relations, {}))
        for e in out:
            e.family = [o for o in out if o is not e]
        return out

    def assign_values(self, family: list[_Entity]) -> None:
        """Draw each relation's value; siblings never share one ("same relation, different
        answer"), and no entity is its own value."""
        for i, e in enumerate(family):
            for r in e.relations:
                taken = {o.values[r] for o in family[:i]} | {e.name}
                e.values[r] = self.value(_RELATIONS[e.etype][r][0], taken)

    def write_passage(self, e: _Entity) -> str:
        rng = self.rng
        facts = list(e.relations)
        rng.shuffle(facts)
        sentences: list[tuple[str, str | None]] = [(f, None) for f in facts]
        fillers = rng.sample(_FILLERS[e.etype], rng.choice(_N_FILLERS))
        siblings = [o.name for o in e.family]
        rng.shuffle(siblings)
        # the opening fact may contrast the entity with a sibling ("Unlike X, Y was ...")
        contrast = None
        if siblings and rng.random() < self.contrast_prob:
            contrast = siblings.pop()
        if siblings and rng.random() < self.mention_prob:
            o = _enumerate(siblings[:4])
            fillers.append(rng.choice(_SIBLING_MENTIONS[e.etype]).replace("{o}", o))
        for fl in fillers:
            sentences.insert(rng.randint(1, len(sentences)), ("", fl))
        answers = set(e.values.values())
        out = []
        for i, (rel, filler) in enumerate(sentences):
            ref = e.name if i == 0 or rng.random() < _NAME_REPEAT_PROB else e.short
            fields = {
                "S": ref[0].upper() + ref[1:],
                "s": ref,
                "S_poss": (ref[0].upper() + ref[1:]) + "'s",
                "s_poss": ref + "'s",
            }
            if filler is not None:
                p = self.value("place", answers | {e.name})
                h = self.value("person", answers | {e.name})
                out.append(filler.format(p=p, h=h, **fields))
                continue
            a = e.values[rel]
            templates = _RELATIONS[e.etype][rel][1]
            if i == 0 and contrast is not None:
                tpl = rng.choice([t for t in templates if t.startswith("{S} ")])
                tpl = "Unlike " + contrast + ", {s}" + tpl[3:]
            else:
                tpl = rng.choice(templates)
            art = "an" if a[0] in "aeiou" else "a"
            pk = rng.choice(_PLACE_KINDS)
            sent = tpl.format(a=a, art=art, pk=pk, **fields)
            out.append(sent[0].upper() + sent[1:])
        return " ".join(out)


def _question(rng: random.Random, e: _Entity, rel: str) -> str:
    tpl = rng.choice(_RELATIONS[e.etype][rel][2])
    q = tpl.format(n=e.name)
    return q[0].upper() + q[1:]


def load_default(
    seed: int = 0,
    n_entities: int = DEFAULT_SIZES["n_entities"],
    *,
    n_train: int = DEFAULT_SIZES["n_train"],
    n_dev: int = DEFAULT_SIZES["n_dev"],
    n_test: int = DEFAULT_SIZES["n_test"],
    heldout_fraction: float = 0.6,
) -> Dataset:
    """The embedded fictional QA data set (deterministic in ``seed``; see the module docstring).

    ``n_entities`` is the number of passages (one per entity). Returns a :class:`Dataset`
    whose corpus order is shuffled; passage ids are ``"p00000"``..., question ids
    ``"train-0000"``... Every question has exactly one gold passage (``positive_ids``).
    """
    for name, v in (
        ("n_entities", n_entities),
        ("n_train", n_train),
        ("n_dev", n_dev),
        ("n_test", n_test),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction!r}")
    rng = random.Random(seed)
    world = _World(rng, _MENTION_PROB, _CONTRAST_PROB, _NAMESAKE_PROB)

    # Entity families: mostly pairs, some singletons and triples of near-duplicate names.
    families: list[list[_Entity]] = []
    etypes = list(_RELATIONS)
    count = 0
    while count < n_entities:
        size = rng.choices(_FAMILY_SIZES[0], weights=_FAMILY_SIZES[1])[0]
        size = min(size, n_entities - count)
        families.append(world.family(rng.choice(etypes), size))
        count += size
    entities = [e for f in families for e in f]
    world.people += [e.name for e in entities if e.etype == "person"]
    world.places += [e.name for e in entities if e.etype == "place"]
    for f in families:
        world.assign_values(f)
    rng.shuffle(entities)
    corpus = []
    for i, e in enumerate(entities):
        e.pid = f"p{i:05d}"
        e.text = world.write_passage(e)
        corpus.append(Passage(id=e.pid, title=e.name[0].upper() + e.name[1:], text=e.text))

    # Usable facts: the answer is in the passage and not in the question.
    def make(e: _Entity, rel: str) -> tuple[str, str] | None:
        for _ in range(5):
            q = _question(rng, e, rel)
            if _contains(e.text, e.values[rel]) and not _contains(q, e.values[rel]):
                return q, e.values[rel]
        return None

    order = list(range(len(entities)))
    rng.shuffle(order)
    n_held_dev = round(n_dev * heldout_fraction)
    n_held_test = round(n_test * heldout_fraction)
    held_dev, held_test = order[:n_held_dev], order[n_held_dev : n_held_dev + n_held_test]
    seen = order[n_held_dev + n_held_test :]
    used: set[tuple[int, str]] = set()

    def take(
        pool: list[int],
        n: int,
        prefix: str,
        *,
        one_per_passage: bool = True,
    ) -> list[QAExample]:
        out: list[QAExample] = []
        rounds = 1 if one_per_passage else 4
        for _ in range(rounds):
            for idx in pool:
                if len(out) == n:
                    return out
                e = entities[idx]
                rels = [r for r in e.relations if (idx, r) not in used]
                if not rels:
                    continue
                rel = rng.choice(rels)
                qa = make(e, rel)
                if qa is None:
                    continue
                used.add((idx, rel))
                out.append(QAExample(f"{prefix}-{len(out):04d}", qa[0], [qa[1]], [e.pid]))
            if len(out) == n:
                break
        if len(out) < n:
            raise ValueError(
                f"n_entities={n_entities} is too small for {n} {prefix} questions; "
                "increase n_entities"
            )
        return out

    train = take(seen, n_train, "train", one_per_passage=False)
    train_gold = {int(q.positive_ids[0][1:]) for q in train}
    # Seen-passage eval questions ask about a relation train did not ask about.
    seen_eval = [i for i in seen if i in train_gold]
    rng.shuffle(seen_eval)
    dev_held = take(held_dev, n_held_dev, "dev")
    test_held = take(held_test, n_held_test, "test")
    dev_seen = take(seen_eval, n_dev - n_held_dev, "dev")
    test_seen = take(seen_eval, n_test - n_held_test, "test", one_per_passage=False)

    def merge(a: list[QAExample], b: list[QAExample], prefix: str) -> list[QAExample]:
        qs = a + b
        rng.shuffle(qs)
        return [
            QAExample(f"{prefix}-{i:04d}", q.question, q.answers, q.positive_ids)
            for i, q in enumerate(qs)
        ]

    return Dataset(
        corpus=corpus,
        train=train,
        dev=merge(dev_held, dev_seen, "dev"),
        test=merge(test_held, test_seen, "test"),
    )
