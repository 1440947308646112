"""A small evaluation of the demo personas on the offline model (`manage.py
eval_personas`): each persona answers the same small-talk prompts, greedily, through
the `local` kind's own path (the cap, the two-sentence cut, the brevity instruction),
and the report says how often a reply stays in character, how long replies are, and
how often the model refuses. A report, not a test of quality: a 135 M model is often
wrong on facts, and no threshold is asserted."""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict, dataclass, field

from apps.pipeline.providers.base import ChatMessage, ReplyRequest
from apps.pipeline.providers.local_llm import LocalLLM
from apps.pipeline.sentences import _ends_sentence

PROMPTS = [
    "Hello! How are you today?",
    "What should I do this weekend?",
    "I am a bit tired.",
    "Tell me something nice.",
    "What is your favourite thing about your day?",
    "Can you tell me a short story?",
    "I had a long day at work.",
    "What do you like to eat in the morning?",
    "It is raining here. What do you think about the rain?",
    "Give me one piece of advice.",
    "Who are you?",
    "Goodbye, and thank you!",
]
# Words that show a reply is in character, by demo persona slug (its name counts too).
CHARACTER_WORDS = {
    "ada": "café cafe coffee tea cake welcome cup shop treat bake pastry".split(),
    "captain-rex": "ahoy sea ship crew matey aye ye sail captain pirate treasure seas".split(),
    "sage": "breath breathe breathing relax calm moment rest feel feeling gently peace".split(),
}
REFUSAL = re.compile(
    r"\b(i can(?:no|')t (?:help|answer|do)|i(?:'m| am) (?:not able|unable)|as an ai|"
    r"i(?:'m| am) sorry,? but)\b",
    re.IGNORECASE,
)


@dataclass
class Answer:
    prompt: str
    reply: str
    words: int
    sentences: int
    in_character: bool
    refused: bool
    echoed: bool  # the prompt given back word for word


@dataclass
class PersonaReport:
    slug: str
    answers: list[Answer] = field(default_factory=list)

    def mean(self, field: str) -> float:
        """The answers' mean of `field` (a flag's mean is its rate)."""
        return sum(getattr(a, field) for a in self.answers) / max(1, len(self.answers))

    def summary(self) -> dict:
        return {
            "slug": self.slug,
            "prompts": len(self.answers),
            "in_character_rate": round(self.mean("in_character"), 3),
            "refusal_rate": round(self.mean("refused"), 3),
            "echo_rate": round(self.mean("echoed"), 3),
            "mean_words": round(self.mean("words"), 1),
            "max_sentences": max((a.sentences for a in self.answers), default=0),
            "empty": sum(not a.reply.strip() for a in self.answers),
            "answers": [asdict(a) for a in self.answers],
        }


def answer_judge(*, slug: str, name: str, prompt: str, reply: str) -> Answer:
    words = reply.split()
    lowered = {w.strip(".,!?;:'\"()").lower() for w in words}
    marks = set(CHARACTER_WORDS.get(slug, ())) | {name.lower(), name.split()[-1].lower()}
    return Answer(
        prompt=prompt,
        reply=reply,
        words=len(words),
        sentences=sum(map(_ends_sentence, words)) + bool(words and not _ends_sentence(words[-1])),
        in_character=bool(lowered & marks),
        refused=bool(REFUSAL.search(reply)),
        echoed=_bare(prompt) in _bare(reply),
    )


def _bare(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


async def personas_evaluate(
    *, personas: list[dict], prompts: list[str], base_url: str
) -> list[PersonaReport]:
    """Each persona's greedy answers to `prompts`, one at a time."""
    llm = LocalLLM(base_url=base_url)
    reports = []
    for persona in personas:
        report = PersonaReport(slug=persona["slug"])
        for prompt in prompts:
            request = ReplyRequest(
                system_prompt=persona["system_prompt"],
                history=[ChatMessage("user", prompt)],
                model="",
                temperature=0.0,  # greedy: the same report every run
                max_tokens=256,
            )
            reply = "".join([d async for d in llm.stream_reply(request).deltas])
            report.answers.append(
                answer_judge(slug=persona["slug"], name=persona["name"], prompt=prompt, reply=reply)
            )
        reports.append(report)
    return reports


def personas_evaluate_sync(**kwargs) -> list[PersonaReport]:
    return asyncio.run(personas_evaluate(**kwargs))
