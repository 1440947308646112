"""The conversation page in a real browser against a real server.

Headless Debian Chromium driven by Playwright (sync API), with Chromium's fake
microphone playing a test clip, against the `live_daphne` server on the test
database. Screenshots are written to reports/screenshots/ (not tracked);
`make screenshots` copies them over the README's docs/screenshots/.

Every test collects the page's console errors and uncaught exceptions and asserts
there were none; the happy paths also assert that the page's error area stayed empty.
"""

import re
import wave
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from apps.accounts.models import User
from apps.accounts.tests.factories import usage_set
from apps.conversations.models import Conversation, Message
from apps.personas.demo import demo_seed
from tests.audio import AUDIO_DIR, manifest, word_error_rate

ROOT = Path(__file__).resolve().parents[3]
SCREENSHOTS = ROOT / "reports" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CLIP = "speechbrain_spk1_snt1.wav"  # "THE CHILD ALMOST HURT THE SMALL DOG", 2.9 s
TURN_TIMEOUT_MS = 60_000
DESKTOP = {"width": 1280, "height": 800}
MOBILE = {"width": 375, "height": 800}

pytestmark = pytest.mark.timeout(400)


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_mic_wav(tmp_path_factory) -> Path:
    """The clip as Chromium's fake capture device plays it: 16 kHz mono 16-bit,
    0.5 s of silence before, 20 s after (the server VAD needs trailing silence to end
    the utterance, and the long tail keeps a looping device from speaking again
    before the test has switched hands-free off)."""
    with wave.open(str(AUDIO_DIR / CLIP)) as clip:
        rate, frames = clip.getframerate(), clip.readframes(clip.getnframes())
        assert (rate, clip.getnchannels(), clip.getsampwidth()) == (16000, 1, 2)
    path = tmp_path_factory.mktemp("mic") / "mic.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * (rate // 2) + frames + b"\0\0" * (rate * 20))
    return path


@pytest.fixture(scope="module")
def chromium(fake_mic_wav):
    # Playwright's sync API keeps an asyncio loop running in this thread, so Django
    # takes the test's (plain, sequential) ORM calls for calls from async code.
    with pytest.MonkeyPatch.context() as patch, sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                "--disable-quic",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                # %noloop: play the file once, then silence
                f"--use-file-for-fake-audio-capture={fake_mic_wav}%noloop",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        yield browser
        browser.close()


class ConsoleErrors(list):
    """Console errors and uncaught exceptions of a page; none are ignored."""

    def watch(self, page: Page) -> None:
        page.on("console", self.console)
        page.on("pageerror", lambda exc: self.append(f"uncaught: {exc}"))

    def console(self, msg) -> None:
        if msg.type != "error":
            return
        self.append(f"console: {msg.text} at {msg.location}")


@pytest.fixture
def page(chromium, live_daphne, live_worker, transactional_db):
    demo_seed()
    context = chromium.new_context(base_url=live_daphne.url, viewport=DESKTOP)
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors = ConsoleErrors()
    errors.watch(page)
    yield page
    context.close()
    assert list(errors) == [], "the browser reported errors"


# --- steps ----------------------------------------------------------------------------


def sign_up(page: Page, username: str) -> User:
    page.goto("/accounts/signup/")
    page.fill("#id_username", username)
    page.fill("#id_email", f"{username}@example.com")
    page.fill("#id_password1", "a-long-test-passphrase-42")
    page.fill("#id_password2", "a-long-test-passphrase-42")
    page.click("button[type=submit]")
    expect(page.get_by_role("button", name=re.compile(r"Log out"))).to_be_visible()
    return User.objects.get(username=username)


def talk_to(page: Page, slug: str) -> Conversation:
    page.goto("/")
    page.click(f"button[data-persona='{slug}']")
    page.wait_for_url(re.compile(r"/conversations/[0-9a-f-]{36}/$"))
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    expect(page.locator("#log li.msg.assistant[data-seq='1']")).to_be_visible()  # the greeting
    conversation_id = page.url.rstrip("/").rsplit("/", 1)[1]
    return Conversation.objects.get(pk=conversation_id)


def send_text(page: Page, text: str) -> None:
    page.fill("#text-input", text)
    page.click("#send")


def stored_texts(page: Page) -> list[tuple[int, str]]:
    return page.eval_on_selector_all(
        "#log li.msg[data-seq]",
        "items => items.map(li => [Number(li.dataset.seq), li.querySelector('.text').textContent])",
    )


def assert_each_message_once(page: Page, conversation: Conversation) -> None:
    shown = stored_texts(page)
    seqs = [seq for seq, _ in shown]
    assert seqs == sorted(set(seqs)), f"a seq shown twice or out of order: {seqs}"
    assert len({text for _, text in shown}) == len(shown), f"a text shown twice: {shown}"
    stored = list(
        Message.objects.filter(conversation=conversation)
        .exclude(text="")
        .order_by("seq")
        .values_list("seq", "text")
    )
    assert [tuple(item) for item in shown] == stored
    assert page.locator("#log li.msg.partial, #log li.msg.streaming").count() == 0


def wait_until_stored_and_shown(page: Page, *, count: int) -> None:
    expect(page.locator("#log li.msg[data-seq]")).to_have_count(count, timeout=TURN_TIMEOUT_MS)
    page.wait_for_function(
        "() => !document.querySelector('#log li.msg.streaming')", timeout=TURN_TIMEOUT_MS
    )


# Records every status the page goes through in window.__states.
RECORD_STATES = """() => {
  const status = document.getElementById('status');
  window.__states = [];
  new MutationObserver(() => window.__states.push(status.dataset.state))
    .observe(status, {attributes: true, attributeFilter: ['data-state']});
}"""


def assert_no_error_shown(page: Page) -> None:
    """The page's error area (#errors, role=alert) is empty, and so hidden."""
    errors = page.locator("#errors")
    expect(errors.locator(".error")).to_have_count(0)
    expect(errors).to_be_empty()
    expect(errors).to_be_hidden()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for label, size in (("desktop", DESKTOP), ("mobile", MOBILE)):
        page.set_viewport_size(size)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name} scrolls sideways at {size['width']} px"
        page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


# --- tests ------------------------------------------------------------------------------


def test_hands_free_voice_turn_is_transcribed_answered_and_spoken(page):
    # given a new account talking to Ada (piper voice)
    sign_up(page, "voice-user")
    page.goto("/")
    screenshot(page, "gallery")
    conversation = talk_to(page, "ada")

    # when hands-free streams the fake microphone
    page.click("#handsfree")
    expect(page.locator("#handsfree")).to_have_attribute("aria-pressed", "true")
    heard = page.locator("#log li.msg.user[data-seq][data-source='voice']")
    expect(heard).to_have_count(1, timeout=90_000)
    page.click("#handsfree")  # stop streaming: the clip has been heard
    expect(page.locator("#handsfree")).to_have_attribute("aria-pressed", "false")

    # then the final transcript is close to the reference
    said = heard.locator(".text").text_content()
    reference = manifest()[CLIP]["reference_transcript"]
    wer = word_error_rate([reference], [said])
    assert wer < 0.35, f"WER {wer:.2f}: heard {said!r} for {reference!r}"
    assert page.evaluate("window.parleyStats.framesSent") > 20

    # and Ada replies (the offline echo stand-in is labelled), and the reply is played
    user_seq = int(heard.get_attribute("data-seq"))
    reply = page.locator(f"#log li.msg.assistant[data-seq='{user_seq + 1}']")
    expect(reply).to_be_visible(timeout=TURN_TIMEOUT_MS)
    if "(echo)" in reply.text_content():
        expect(page.locator("#echo-note")).to_be_visible()
        expect(page.locator("#echo-note")).to_contain_text(
            "Offline echo stand-in: no language model configured"
        )
    page.wait_for_function("() => window.parleyStats.samplesQueued > 0", timeout=TURN_TIMEOUT_MS)

    # and the latency readout shows the turn's stages
    page.click("#latency-toggle")
    expect(page.locator("#latency")).to_be_visible()
    row = page.locator("#latency-rows tr").first
    expect(row).to_contain_text("voice")
    expect(row.locator("td").nth(2)).to_have_text(re.compile(r"^\d+ \(\+\d+\)$"))
    expect(row.locator("td").nth(0)).to_have_text(re.compile(r"^\d+$"))
    assert_each_message_once(page, conversation)
    assert_no_error_shown(page)
    screenshot(page, "conversation")

    # and the history lists the conversation
    page.goto("/conversations/")
    expect(page.locator(".history li")).to_have_count(1)
    expect(page.locator(".history li").first).to_contain_text("Ada")
    screenshot(page, "history")
    page.click(".history li a:has-text('Ada')")
    expect(page.locator(".transcript li.msg.user")).to_contain_text(said)


def test_typed_message_round_trip(page):
    # given
    sign_up(page, "typing-user")
    conversation = talk_to(page, "captain-rex")

    # when
    send_text(page, "What is seven times eight?")

    # then the message is shown as the user's, and a reply follows it
    mine = page.locator("#log li.msg.user[data-seq='2']")
    expect(mine).to_have_text(re.compile("What is seven times eight"))
    expect(mine).to_have_attribute("data-source", "text")
    expect(page.locator("#text-input")).to_have_value("")
    reply = page.locator("#log li.msg.assistant[data-seq='3']")
    expect(reply).to_be_visible(timeout=TURN_TIMEOUT_MS)
    expect(reply.locator(".text")).not_to_be_empty()
    assert_each_message_once(page, conversation)
    assert_no_error_shown(page)


def test_reconnect_mid_reply_shows_each_message_once(page):
    # given a reply streaming token by token (the echo stand-in repeats ~50 words)
    sign_up(page, "reconnect-user")
    conversation = talk_to(page, "ada")
    page.evaluate(RECORD_STATES)
    long_text = " ".join(f"word{i}" for i in range(50)) + " the end"
    send_text(page, long_text)

    # when the socket drops while the reply streams
    page.wait_for_selector("#log li.msg.assistant.streaming", timeout=TURN_TIMEOUT_MS)
    was_streaming = page.evaluate(
        """() => {
          const streaming = Boolean(document.querySelector('#log li.msg.streaming'));
          window.parley.socket.close(4000);
          return streaming;
        }"""
    )
    assert was_streaming

    # then the page reconnects, resumes, and every stored turn is shown exactly once
    page.wait_for_function("() => window.__states.includes('reconnecting')")
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=30_000)
    reply = page.locator("#log li.msg.assistant[data-seq='3']")
    expect(reply).to_contain_text("the end", timeout=TURN_TIMEOUT_MS)
    wait_until_stored_and_shown(page, count=3)
    assert_each_message_once(page, conversation)

    # and an idle reconnect, then a reload, replay nothing twice
    page.evaluate("window.parley.socket.close(4000)")
    page.wait_for_function("() => window.parley.state !== 'live'")
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=30_000)
    assert_each_message_once(page, conversation)
    assert_no_error_shown(page)  # a dropped socket is not an error: the page resumes
    page.reload()
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    expect(page.locator("#log li.msg[data-seq]")).to_have_count(3)
    assert_each_message_once(page, conversation)
    assert_no_error_shown(page)


def test_quota_exceeded_shows_a_readable_error(page):
    # given an account that has used its reply tokens
    user = sign_up(page, "quota-user")
    User.objects.filter(pk=user.pk).update(tokens_quota=1)  # read when the socket opens
    usage_set(user, tokens=5)
    talk_to(page, "ada")

    # when
    send_text(page, "Are you still there?")

    # then the reason is shown in the alert region, and nothing was sent on
    errors = page.locator("#errors")
    expect(errors).to_be_visible()
    expect(errors.locator(".error")).to_have_count(1)
    expect(errors.locator(".error")).to_be_visible()
    expect(errors.locator(".error")).to_contain_text("used today's reply tokens")
    expect(errors.locator(".error")).to_have_attribute("data-code", "quota_exceeded")
    expect(page.locator("#errors[role='alert']")).to_have_count(1)
    expect(page.locator("#log li.msg[data-seq]")).to_have_count(1)  # the greeting only
    expect(page.locator("#status")).to_have_attribute("data-state", "live")


def test_push_to_talk_with_the_space_bar(page):
    # given
    sign_up(page, "ptt-user")
    conversation = talk_to(page, "sage")

    # when Space is held (focus on the page, not a control) until the words are in
    page.locator("h1").click()
    page.keyboard.down("Space")
    expect(page.locator("#talk")).to_have_attribute("aria-pressed", "true")
    heard = page.locator("#log li.msg.user[data-seq][data-source='voice']")
    expect(heard).to_have_count(1, timeout=90_000)
    page.keyboard.up("Space")

    # then
    expect(page.locator("#talk")).to_have_attribute("aria-pressed", "false")
    page.wait_for_function(
        "() => document.getElementById('conversation').dataset.capturing === 'no'"
    )
    reference = manifest()[CLIP]["reference_transcript"]
    said = heard.locator(".text").text_content()
    assert word_error_rate([reference], [said]) < 0.35, said
    reply = page.locator("#log li.msg.assistant[data-seq='3']")
    expect(reply).to_be_visible(timeout=TURN_TIMEOUT_MS)
    wait_until_stored_and_shown(page, count=3)
    assert_each_message_once(page, conversation)
    assert_no_error_shown(page)


def test_stop_button_silences_the_reply_at_once(page):
    # given a long reply being spoken
    sign_up(page, "stop-user")
    conversation = talk_to(page, "ada")
    sentences = " ".join(f"This is sentence number {i} of a long message." for i in range(1, 7))
    send_text(page, sentences)
    page.wait_for_function("() => window.parley.player.playing", timeout=TURN_TIMEOUT_MS)
    expect(page.locator("#stop")).to_be_enabled()

    # when
    page.click("#stop")

    # then playback stops at once and the reply is marked as cut short
    assert page.evaluate("window.parley.player.playing") is False
    assert page.evaluate("window.parleyStats.stops") == 1
    expect(page.locator("#stop")).to_be_disabled()
    expect(
        page.locator("#log li.msg.assistant.interrupted, #log li.msg.assistant.cut")
    ).to_have_count(1, timeout=TURN_TIMEOUT_MS)
    wait_until_stored_and_shown(page, count=3)
    assert page.evaluate("window.parley.player.playing") is False
    assert_each_message_once(page, conversation)
    assert_no_error_shown(page)  # a stop is not an error


def test_a_refused_microphone_is_explained_and_typing_still_works(page):
    # given a browser that refuses the microphone (as when the user clicks "Block")
    page.add_init_script(
        """navigator.mediaDevices.getUserMedia = () =>
             Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));"""
    )
    sign_up(page, "no-mic-user")
    conversation = talk_to(page, "ada")

    # when
    page.click("#handsfree")

    # then the reason and the way out are shown, and hands-free is off again
    errors = page.locator("#errors")
    expect(errors).to_contain_text("Microphone access is blocked")
    expect(errors).to_contain_text("You can still type below")
    expect(page.locator("#handsfree")).to_have_attribute("aria-pressed", "false")
    send_text(page, "Typing instead")
    expect(page.locator("#log li.msg.user[data-seq='2']")).to_contain_text("Typing instead")
    wait_until_stored_and_shown(page, count=3)
    assert_each_message_once(page, conversation)
    errors.get_by_role("button", name=re.compile("Dismiss")).click()
    expect(errors.locator(".error")).to_have_count(0)
    expect(errors).to_be_hidden()


def test_the_offline_model_is_named_and_its_limits_said(page):
    # given a persona answered by the offline model (the `local` kind)
    from apps.conversations.context import persona_remember
    from apps.personas.models import Persona

    ada = Persona.objects.get(slug="ada")
    ada.llm_kind = "local"
    ada.save(update_fields=["llm_kind"])
    persona_remember(persona=ada)  # running processes see it on the next socket
    sign_up(page, "smallmodel")

    # when a conversation opens
    talk_to(page, "ada")

    # then the page says which model answers and that it is small, not that it echoes
    note = page.locator("#small-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("SmolLM2-135M-Instruct")
    expect(note).to_contain_text("often wrong on facts")
    expect(page.locator("#echo-note")).to_be_hidden()
