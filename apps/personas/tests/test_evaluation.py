"""`manage.py eval_personas` on the real offline model: only its structure is asserted
(the model's quality is what it reports, not what this test checks)."""

import json

from django.core.management import call_command

from apps.personas.demo import DEMO_PERSONAS
from apps.personas.evaluation import answer_judge


def test_the_report_covers_every_demo_persona_with_short_replies(tmp_path):
    out = tmp_path / "eval.json"

    call_command("eval_personas", "--prompts", "1", "--out", str(out), "--url", "")

    report = json.loads(out.read_text())["personas"]
    assert [p["slug"] for p in report] == [p["slug"] for p in DEMO_PERSONAS]
    for persona in report:
        assert persona["prompts"] == len(persona["answers"]) == 1
        for rate in ("in_character_rate", "refusal_rate", "echo_rate"):
            assert 0 <= persona[rate] <= 1
        assert 1 <= persona["max_sentences"] <= 2  # the local kind's cut
        assert all(a["reply"].strip() and a["words"] > 0 for a in persona["answers"])


def test_answers_are_judged_by_character_words_refusals_and_echoes():
    in_character = answer_judge(slug="captain-rex", name="Captain Rex", prompt="Hi!",
                                reply="Ahoy, matey! The sea is calm.")  # fmt: skip
    refusal = answer_judge(slug="sage", name="Sage", prompt="Hi!",
                           reply="I'm sorry, but I cannot help with that.")  # fmt: skip
    echo = answer_judge(slug="ada", name="Ada", prompt="How are you today?",
                        reply="How are you today? I am fine")  # fmt: skip

    assert (in_character.in_character, in_character.refused, in_character.sentences) == (
        True,
        False,
        2,
    )
    assert (refusal.in_character, refusal.refused) == (False, True)
    assert (echo.echoed, echo.sentences, echo.words) == (True, 2, 7)
