"""The closed vocabulary of the synthetic long-context suite, in disjoint ranges.

Every word is one token of the suite's word-level tokenizer. The ranges are disjoint on purpose
(measured in ../shared TRAINING_NOTES: a small model learns retrieval only when keys, values and
filler never share ids): filler words make the haystack, key words name needles, values are what a
needle stores, and ids are the random identifiers of key-value retrieval and variable tracking.
"""

from __future__ import annotations

import random

# Special tokens, in id order (ids 0..6). The mask token is LLaDA's name for it.
EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"
UNK = "<|unk|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|eot|>"
SPECIAL_TOKENS = [EOS, MASK, UNK, SYSTEM, USER, ASSISTANT, END_OF_TURN]

# The words the task templates are written with (instructions, needles, questions).
STRUCTURE_WORDS = (
    "read the text and answer question at end . , : ? = { } "
    "magic number numbers for is what are all of a json ids follows value id "
    "var which variables equal list words three most common in"
).split()

_FILLER_CANDIDATES = """
time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program work government city point home water room
mother money story fact month lot right study book eye job business issue side kind head house
service friend father power hour game line member law car name president team minute idea kid body
information back parent face level office door health person art war history party result change
morning reason research girl guy moment air teacher force education foot boy age policy music market
sense nation plan college interest death experience effect class control care field development role
effort rate heart drug show leader light voice wife police mind price report decision son view town
road arm difference good new old great high small large long young big early late little important
public bad strong free true whole clear full simple ready happy warm cold dark bright quiet quick
slow soft hard deep wide short heavy empty open walk run sing build carry hold bring write sit stand
lose pay meet include continue learn lead understand watch follow stop create speak allow add spend
grow offer love consider appear buy wait serve send expect stay fall cut reach remain suggest raise
pass sell require decide pull table chair window garden river mountain forest ocean island desert
valley bridge street market station train plane boat ship truck bicycle engine machine paper pencil
letter picture music song dance movie theater museum library church hospital bank hotel kitchen
bedroom floor wall roof corner village farm field cloud rain snow wind storm sun moon star sky
summer winter spring autumn night evening noon dinner lunch breakfast bread butter cheese milk
coffee tea sugar salt pepper soup rice corn bean potato tomato onion carrot egg meat chicken fish
shirt coat hat shoe dress glove button pocket ring watch clock phone camera radio lamp candle
blanket pillow basket bottle cup plate bowl spoon knife fork box bag key rope chain wheel stone
""".split()

KEY_WORDS = """
tiger lion zebra horse camel eagle falcon otter beaver badger rabbit turtle salmon shark whale dolphin
panda koala moose bison donkey goose parrot pigeon lizard spider beetle hornet walrus ferret llama gecko
apple banana cherry grape lemon mango melon peach pear plum apricot papaya kiwi lime fig guava
ruby emerald sapphire topaz amber pearl copper silver cobalt nickel zinc iron jade onyx quartz opal
""".split()

N_FILLER = 256
N_VALUES = 100
N_IDS = 256


def _filler_words() -> list[str]:
    taken = set(STRUCTURE_WORDS) | set(KEY_WORDS)
    out: list[str] = []
    for w in _FILLER_CANDIDATES:
        if w not in taken and w not in out:
            out.append(w)
    if len(out) < N_FILLER:
        raise AssertionError(f"only {len(out)} filler words; need {N_FILLER}")
    return out[:N_FILLER]


def _id_words() -> list[str]:
    """Random 4-character hexadecimal ids with at least one letter (so none reads as a number)."""
    rng = random.Random(20240601)
    out: list[str] = []
    while len(out) < N_IDS:
        w = "".join(rng.choice("0123456789abcdef") for _ in range(4))
        if not w.isdigit() and w not in out:
            out.append(w)
    return out


FILLER_WORDS = _filler_words()
VALUE_WORDS = [str(i) for i in range(N_VALUES)]  # the magic numbers 0..99
ID_WORDS = _id_words()

# Word-level vocabulary in id order: specials, structure, filler, keys, values, ids.
VOCAB: list[str] = SPECIAL_TOKENS + STRUCTURE_WORDS + FILLER_WORDS + KEY_WORDS + VALUE_WORDS + ID_WORDS

if len(set(VOCAB)) != len(VOCAB):
    raise AssertionError("vocabulary ranges overlap")
