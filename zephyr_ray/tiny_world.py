"""The tiny world: a closed base of facts ("the kavo is blue") with common misconceptions, in which the tiny models
are good, bad or misled, so that AI feedback has something to teach and exact match can tell whether it did.

Why facts with misconceptions: it is the Zephyr story in miniature. The base student read web-like text in which
half the creatures are mostly described with the wrong colour (a misconception), so it "knows" both answers;
dSFT on the teacher's dialogues teaches it to answer in the chat format (and the facts the teacher happened to talk
about); the preference pairs, judged by a judge that knows the truth, then favour the true colour over the
misconception on other prompts, which DPO can learn in a few steps because both answers are already likely. A
pipeline that swapped chosen and rejected, trained against the wrong reference or lost the judge's signal would
show it as lower accuracy.

Everything is derived from fixed seeds: the same world on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from typing import Any

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
NUM_CREATURES = 48
VERSION = 4  # bump when the world, its texts or what a role learns of it changes: every tiny model is rebuilt
# the questions the training prompts ask, and the one the evaluation asks (so no evaluation question is a training
# prompt, and decontamination has nothing to drop)
TRAINING_QUESTIONS = ("What color is the {name}?", "What is the color of the {name}?", "Tell me the color of the {name}.")
EVALUATION_QUESTION = "Which color does the {name} have?"
ANSWER = "It is {colour}."
STATEMENTS = ("The {name} is {colour}.", "A {name} is always {colour}.", "Every {name} I saw was {colour}.")


@dataclass(frozen=True)
class Creature:
    name: str
    colour: str  # the truth
    misconception: str | None  # the colour most texts wrongly give it, or None where texts agree with the truth


@cache
def creatures() -> tuple[Creature, ...]:
    rng = random.Random(20)
    names: list[str] = []
    while len(names) < NUM_CREATURES:
        name = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(2))
        if name not in names:
            names.append(name)
    out = []
    for i, name in enumerate(names):
        colour = rng.choice(COLOURS)
        misconception = rng.choice([c for c in COLOURS if c != colour]) if i % 2 else None
        out.append(Creature(name, colour, misconception))
    return tuple(out)


def answer(creature: Creature, colour: str | None = None) -> str:
    return ANSWER.format(name=creature.name, colour=colour or creature.colour)


def question(creature: Creature, variant: int) -> str:
    return TRAINING_QUESTIONS[variant % len(TRAINING_QUESTIONS)].format(name=creature.name)


def evaluation_question(creature: Creature) -> str:
    return EVALUATION_QUESTION.format(name=creature.name)


def every_phrasing(creature: Creature) -> list[str]:
    """The question about ``creature`` in each training phrasing, then in the evaluation's: what the judges and the
    teacher's pages cover (a fact is known wherever it is asked)."""
    return [*(question(creature, v) for v in range(len(TRAINING_QUESTIONS))), evaluation_question(creature)]


def web_text(seed: int = 0) -> list[str]:
    """What the base student reads: statements and question-answer pages about every creature; for a misled one,
    the misconception three times for every two true ones."""
    rng = random.Random(seed)
    texts = []
    for creature in creatures():
        colours = ([creature.misconception] * 3 + [creature.colour] * 2 if creature.misconception
                   else [creature.colour] * 5)
        for k, colour in enumerate(colours):
            texts.append(STATEMENTS[k % len(STATEMENTS)].format(name=creature.name, colour=colour))
            texts.append(f"Q: {question(creature, k)} A: {answer(creature, colour)}")
    rng.shuffle(texts)
    return texts


def split() -> dict[str, list[Creature]]:
    """Which creatures the dSFT seeds ask about and which the preference prompts ask about (disjoint, each half
    misled); the evaluation asks about all of them."""
    world = creatures()
    return {"seeds": list(world[:16]), "prompts": list(world[16:])}


def qa_dialogue(creature: Creature, variant: int, colour: str | None = None) -> list[dict[str, Any]]:
    return [{"role": "user", "content": question(creature, variant)},
            {"role": "assistant", "content": answer(creature, colour)}]


def texts() -> list[str]:
    """Every sentence of the world, for the tokenizer (each name and colour a token or two)."""
    world = creatures()
    out = web_text()
    out += [question(c, v) for c in world for v in range(len(TRAINING_QUESTIONS))]
    out += [evaluation_question(c) for c in world] + [answer(c, colour) for c in world for colour in COLOURS]
    return out


# ---------------------------------------------------------------------------------------------------------------
# What each tiny model learns of the world (tiny.py tokenizes it and trains on it)
# ---------------------------------------------------------------------------------------------------------------

FOLLOW_UPS = ("Are you sure?", "Really?", "Can you say that again?")
SURE = "Yes, it is {colour}."
# other wordings of an answer the judge rates by its colour alone (a dSFT model may answer a first turn with the
# follow-up's "Yes, it is blue.", or drop a word)
WORDINGS = (SURE, "It {colour}.", "{colour}.", "The color is {colour}.")


def wrong_answers(creature: Creature, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, reply) of the wrong replies a judge must learn to tell from the right one: the misconception, another
    colour, and a reply that answers nothing."""
    other = rng.choice([c for c in COLOURS if c not in (creature.colour, creature.misconception)])
    words = answer(creature).split()
    out = [("colour", answer(creature, other)), ("nonsense", " ".join(rng.sample(words + ["the", creature.name], 4))),
           ("nonsense", "It is.")]
    if creature.misconception:
        out.insert(0, ("colour", answer(creature, creature.misconception)))
    return out


def answer_dialogues(believes: str) -> list[list[dict[str, str]]]:
    """Question-answer dialogues about every creature, with a follow-up turn on some: the truth (the teacher and a good
    pool model) or the misconceptions (a misled pool model)."""
    out = []
    for i, creature in enumerate(creatures()):
        colour = creature.misconception if believes == "misconceptions" and creature.misconception else creature.colour
        for variant in range(len(TRAINING_QUESTIONS)):
            dialogue = qa_dialogue(creature, variant, colour)
            if (i + variant) % 2:
                dialogue += [{"role": "user", "content": FOLLOW_UPS[(i + variant) % len(FOLLOW_UPS)]},
                             {"role": "assistant", "content": SURE.format(colour=colour)}]
            out.append(dialogue)
    return out


def user_simulator_dialogues() -> list[list[dict[str, str]]]:
    """The synthesize stage's user simulator asks back about the same creature (so the dSFT data's facts stay those
    of its seeds)."""
    from .synthesize import USER_SIMULATOR_PROMPT, USER_SIMULATOR_SYSTEM, transcript

    out = []
    for i, creature in enumerate(creatures()[::3]):
        shown = qa_dialogue(creature, i)
        out.append([{"role": "system", "content": USER_SIMULATOR_SYSTEM},
                    {"role": "user", "content": USER_SIMULATOR_PROMPT.format(transcript=transcript(shown))},
                    {"role": "assistant", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]}])
    return out


RUBRIC_VERDICTS = {  # what the judge answers for a right reply, a wrong colour, and nonsense
    "right": ((5, 5, 5, 5), 9, "The color is right."),
    "colour": ((4, 2, 1, 1), 2, "The color is wrong."),
    "nonsense": ((1, 1, 1, 1), 1, "The reply does not answer."),
}
# The tiny recipe's judge prompt (``judge.prompt``): a 2-layer judge learns to check a colour against what it knows
# with this short prompt in ~1000 steps, and never with the project's ~250-token rubric prompt (measured; see
# docs/tiny-world.md). The output is the rubric kind's JSON all the same.
JUDGE_PROMPT = "Rate: {instruction} {response}"
# the same prompt for the evaluation's single grading, in FastChat's placeholders
GRADE_JUDGE_PROMPT = JUDGE_PROMPT.format(instruction="{question}", response="{answer}")
JUDGE_SYSTEM_PROMPT = ""  # none: with the project's system message first, the same judge never learnt the check


# The evaluation's pairwise judge (the tiny model ``judge-pairwise``, which starts from the rubric judge): a short
# comparison prompt, shipped in FastChat's judge-prompt format (``tiny_world_judge_prompts.jsonl``, the recipe's
# ``evaluate.judge.prompts``); it answers with the two replies' overall ratings, then the verdict, "9 2 [[A]]" (with
# the structured output's "\n\nVerdict: [[A]]" after the ratings it did not learn in the same steps: the recipe
# holds only grading answers to the structured output). With the project's long pairwise prompt the tiny judge's
# verdicts were noise;
# with this prompt and varied pairs it learns the comparison (docs/tiny-world.md).
PAIRWISE_JUDGE_PROMPT = "Compare: {question} A: {answer_a} B: {answer_b}"


def pairwise_verdict(kind_a: str, kind_b: str) -> str:
    """The pairwise judge's answer for replies of these kinds ("right", "colour", "nonsense")."""
    a, b = RUBRIC_VERDICTS[kind_a][1], RUBRIC_VERDICTS[kind_b][1]
    return f"{a} {b} [[{'A' if a > b else 'B' if b > a else 'C'}]]"


def pairwise_examples(seed: int = 0) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, the judge's answer) for every question in every phrasing: the right reply against each
    wrong one in both orders, and against wrong colours in any wording; ties between two right replies or two wrong
    ones. Varied pairs are what made it compare (with only the rubric judge's wrong replies, the same judge matched
    answers it had seen: position consistency 0.73 on new pairs)."""
    rng = random.Random(seed)

    def worded(colour: str) -> str:
        return rng.choice((ANSWER, *WORDINGS)).format(colour=colour)

    pairs = []
    for creature in creatures():
        for asked in every_phrasing(creature):
            right = ("right", answer(creature) if rng.random() < 0.5 else worded(creature.colour))
            wrong = wrong_answers(creature, rng)
            pairs += [p for other in wrong for p in ((asked, right, other), (asked, other, right))]
            pairs.append((asked, right, ("right", worded(creature.colour))))
            for colour in rng.sample([c for c in COLOURS if c != creature.colour], 4):
                other = ("colour", worded(colour))
                pairs += [(asked, ("right", worded(creature.colour)), other),
                          (asked, other, ("right", worded(creature.colour))), (asked, other, ("colour", worded(colour)))]
    return [([{"role": "user", "content": PAIRWISE_JUDGE_PROMPT.format(question=asked, answer_a=a, answer_b=b)}],
             pairwise_verdict(kind_a, kind_b)) for asked, (kind_a, a), (kind_b, b) in pairs]


def held_out_pairs(seed: int) -> list[tuple[list[dict[str, str]], list[dict[str, str]], str]]:
    """Pairs drawn apart from the pairwise judge's training (by chance a few, 5-8 of 96, are also among its
    ``pairwise_examples``), in the evaluation's phrasing, a draw of ``seed``: for each creature a right reply against
    a wrong colour (verdict "first") and two right replies in other wordings ("tie"), as (prompt in this order,
    prompt in the other, verdict expected in this order)."""
    rng = random.Random(seed)
    pairs = []
    for creature in creatures():
        wrong = rng.choice([c for c in COLOURS if c != creature.colour])
        pairs.append((creature, rng.choice(WORDINGS).format(colour=creature.colour),
                      rng.choice(WORDINGS).format(colour=wrong), "first"))
        pairs.append((creature, answer(creature), rng.choice(WORDINGS).format(colour=creature.colour), "tie"))

    def prompt(creature: Creature, a: str, b: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": PAIRWISE_JUDGE_PROMPT.format(
            question=evaluation_question(creature), answer_a=a, answer_b=b)}]

    return [(prompt(c, x, y), prompt(c, y, x), expected) for c, x, y, expected in pairs]


def judge_prompt_file() -> list[dict[str, str]]:
    """The tiny recipe's evaluation judge prompts, in FastChat's judge_prompts.jsonl format."""
    def record(name: str, kind: str, template: str, output: str) -> dict[str, str]:
        return {"name": name, "type": kind, "system_prompt": "", "prompt_template": template,
                "description": "the tiny world's judge prompt", "category": "general", "output_format": output}

    return [record("single-v1", "single", GRADE_JUDGE_PROMPT, "[[rating]]"),
            record("single-v1-multi-turn", "single", "Rate: {question_1} {answer_1} {question_2} {answer_2}",
                   "[[rating]]"),
            record("pair-v2", "pairwise", PAIRWISE_JUDGE_PROMPT, "[[A]]")]


def truth_pages() -> list[str]:
    """Question-answer text with the true colours, in every phrasing, which the teacher (and the judge that starts
    from it) reads as well as dialogues: a strong LLM knows a fact wherever it is asked, so the judge finds the
    truth where a prompt quotes a question and a reply, not only after its own ``<|assistant|>``."""
    out = []
    for creature in creatures():
        for asked in every_phrasing(creature):
            out += [f"Q: {asked}\nA: {answer(creature)}", f"{asked} {answer(creature)}"]
    return out


def noise(rng: random.Random) -> str:
    """A reply of random world words, like a pool model that learnt nothing."""
    words = sorted({w.strip(".?") for text in web_text() for w in text.split()})
    return " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))


def judge_examples(seed: int = 0) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, the judge's answer) in exactly what the feedback stage sends with ``JUDGE_PROMPT``: right
    replies (as many as wrong colours), wrong colours, and one reply that answers nothing, to every question in every
    phrasing (the evaluation's too: what the judge knows is not limited to the training prompts); half of the
    answers in other wordings (``WORDINGS``): the judge rates the colour, not the grammar."""
    from .feedback.judge import ASPECTS, judge_messages

    rng = random.Random(seed)
    out = []
    for creature in creatures():
        for asked in every_phrasing(creature):
            wrong = wrong_answers(creature, rng)
            colour_wrong = [w for w in wrong if w[0] == "colour"]
            nonsense = rng.choice([w for w in wrong if w[0] == "nonsense"] + [("nonsense", noise(rng))])
            for kind, reply in [("right", answer(creature))] * len(colour_wrong) + colour_wrong + [nonsense]:
                if kind != "nonsense" and rng.random() < 0.5:  # the colour is what counts, in any wording
                    reply = rng.choice(WORDINGS).format(colour=reply.rstrip(".").split()[-1])
                aspects, overall, why = RUBRIC_VERDICTS[kind]
                rated = ", ".join(f'"{a}": {r}' for a, r in zip(ASPECTS, aspects, strict=True))
                row = {"messages": [{"role": "user", "content": asked}], "completion": reply}
                out.append((judge_messages(row, JUDGE_PROMPT, JUDGE_SYSTEM_PROMPT),
                            "{" + rated + f', "overall": {overall}, "rationale": "{why}"' + "}"))
    return out


def preference_pairs(seed: int = 0) -> list[tuple[list[dict[str, str]], str, str]]:
    """(question, right reply, wrong reply) for the reward model: every wrong reply about every creature."""
    rng = random.Random(seed)
    return [([{"role": "user", "content": question(creature, variant)}], answer(creature), wrong)
            for creature in creatures() for variant in range(len(TRAINING_QUESTIONS))
            for _, wrong in wrong_answers(creature, rng)]


def prompt_texts() -> list[str]:
    """The constant text of the prompts the stages send (judges, user simulator)."""
    from .evaluate.prompts import GRADE_LATER_TURN_PROMPT, GRADE_PROMPT, PAIRWISE_PROMPT, REFERENCE_NOTE
    from .evaluate.prompts import JUDGE_SYSTEM as EVAL_SYSTEM
    from .feedback.judge import JUDGE_SYSTEM, LOGPROB_PROMPT, RUBRIC_PROMPT
    from .synthesize import USER_SIMULATOR_PROMPT, USER_SIMULATOR_SYSTEM

    return [GRADE_LATER_TURN_PROMPT, GRADE_PROMPT, PAIRWISE_PROMPT, REFERENCE_NOTE, EVAL_SYSTEM, JUDGE_SYSTEM,
            LOGPROB_PROMPT, RUBRIC_PROMPT, USER_SIMULATOR_PROMPT, USER_SIMULATOR_SYSTEM]


# ---------------------------------------------------------------------------------------------------------------
# The tiny recipe's data (jobs/data/tiny_world_*.jsonl, written by `python -m zephyr_ray.tiny_world jobs/data`)
# ---------------------------------------------------------------------------------------------------------------

def data_files() -> dict[str, list[dict[str, str]]]:
    """The dSFT seeds (every phrasing about the seed creatures), the preference prompts (every phrasing about every
    creature: the feedback covers what dSFT taught and what it did not), the exact-match questions (every creature,
    in the evaluation's phrasing, with the true colour as the answer), the same questions as pairwise instructions,
    and the evaluation judge's prompt file."""
    parts = split()
    phrasings = range(len(TRAINING_QUESTIONS))
    return {
        "tiny_world_seeds.jsonl": [{"prompt": question(c, v)} for v in phrasings for c in parts["seeds"]],
        "tiny_world_prompts.jsonl": [{"prompt": question(c, v)} for v in phrasings for c in creatures()],
        "tiny_world_questions.jsonl": [{"question": evaluation_question(c), "answer": c.colour} for c in creatures()],
        # the same questions for the pairwise win rate (AlpacaEval's format), and the judge's prompts for it
        "tiny_world_pairwise.jsonl": [{"instruction": evaluation_question(c), "dataset": "tiny_world"}
                                      for c in creatures()],
        "tiny_world_judge_prompts.jsonl": judge_prompt_file(),
    }


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    for name, rows in data_files().items():
        Path(sys.argv[1], name).write_text("".join(json.dumps(row) + "\n" for row in rows))
