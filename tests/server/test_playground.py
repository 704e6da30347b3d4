"""The playground (`/playground/`), driven in a real browser against a real server.

Chromium (Debian's, `/usr/bin/chromium`, or `$SONAR_LLM_CHROMIUM`) through Playwright, one
browser for the module; the servers are real uvicorn servers on the tiny random-weight bundle.
Without a browser the browser tests skip and say why; the plain HTTP tests still run.
`SONAR_LLM_SCREENSHOT=docs/playground.png` saves the README's screenshot from the first test.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import ENDLESS, Live, metric, start_live, wait_until
from fastapi.testclient import TestClient

from models.pipeline import SonarLLMPipeline
from models.sonar_codec import sonar_languages

CHROMIUM = os.environ.get("SONAR_LLM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
KEY = "playground-test-key"
PROMPT = "The cat sat on the mat. It was warm. Then the dog came in."
# What the browser asks for (the tiny bundle's decoder is random: bound its sentences).
SETTINGS = {"max_sentences": 3, "max_tokens": 32}
TIMEOUT_MS = 60_000  # the machine is shared: generous, never asserted on
RUNNING = "sonar_llm_num_requests_running"


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (uv sync installs it)"
    if not Path(CHROMIUM).exists():
        return (
            f"no Chromium at {CHROMIUM}: `apt-get install -y chromium`, or set "
            "SONAR_LLM_CHROMIUM to a Chromium executable"
        )
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _browser_missing()
    if reason is not None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(pipe: SonarLLMPipeline) -> Iterator[Live]:
    live = start_live(pipe)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def keyed_server(pipe: SonarLLMPipeline) -> Iterator[Live]:
    live = start_live(pipe, api_key=[KEY])
    yield live
    live.stop()


class Console:
    """What the page reported: console errors and uncaught exceptions."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def unexpected(self, allowed: str | None = None) -> list[str]:
        return [e for e in self.errors if allowed is None or not re.search(allowed, e)]


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., tuple[Any, Console]]]:
    """`open_page(live)`: a fresh browser context (empty localStorage) on the server's `/`."""
    contexts: list[Any] = []

    def make(live: Live, width: int = 1280) -> tuple[Any, Console]:
        context = browser.new_context(viewport={"width": width, "height": 900})
        contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        console = Console()
        page.on(
            "console",
            lambda m: console.errors.append(m.text) if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: console.errors.append(f"uncaught: {e}"))
        page.goto(live.url + "/")  # a browser's `/` lands on the playground
        return page, console

    yield make
    for context in contexts:
        context.close()


def _generate_via_api(live: Live, headers: dict[str, str] | None = None, **body: Any) -> Any:
    with live.client(headers=headers or {}) as c:
        r = c.post("/generate", json={"prompt": PROMPT, **SETTINGS, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _fill_settings(page: Any, **settings: Any) -> None:
    page.get_by_role("textbox", name="Prompt").fill(settings.pop("prompt", PROMPT))
    page.get_by_role("spinbutton", name="Max sentences").fill(str(settings["max_sentences"]))
    page.get_by_role("spinbutton", name="Max tokens").fill(str(settings["max_tokens"]))
    if "eos_threshold" in settings:
        page.get_by_role("spinbutton", name="EOS threshold").fill(str(settings["eos_threshold"]))


def _languages_loaded(page: Any) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#source-lang-name")).to_have_text("English")


def _sentences(page: Any) -> list[str]:
    items = page.get_by_role("list", name="Output").get_by_role("listitem")
    return [t.strip() for t in items.locator(".text").all_inner_texts()]


def test_generate_shows_the_apis_sentences_one_by_one(
    open_page: Callable[..., tuple[Any, Console]], server: Live
) -> None:
    from playwright.sync_api import expect

    page, console = open_page(server)
    assert page.url == server.url + "/playground/"
    _languages_loaded(page)
    expect(page.locator("#status-model")).to_contain_text("sonar-llm-demo")
    expect(page.locator("#status-device")).to_contain_text("cpu")
    expect(page.locator("#status-running")).to_have_text("0")
    _fill_settings(page, **SETTINGS)
    # When each list item appears, as the user sees it.
    page.evaluate(
        """() => {
            window.arrivals = [];
            const list = document.getElementById("output");
            new MutationObserver((records) => {
                for (const r of records)
                    for (const n of r.addedNodes)
                        if (n.nodeName === "LI") window.arrivals.push(performance.now());
            }).observe(list, {childList: true});
        }"""
    )
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#finish")).to_contain_text("finish_reason", timeout=TIMEOUT_MS)

    expected = _generate_via_api(server, return_embeddings=True)
    n = len(expected["sentences"])
    assert n >= 1
    assert _sentences(page) == expected["sentences"]
    assert f"finish_reason: {expected['finish_reason']}" in page.locator("#finish").inner_text()
    arrivals = page.evaluate("window.arrivals")
    assert len(arrivals) == n
    assert all(b > a for a, b in itertools.pairwise(arrivals)), arrivals
    metas = page.get_by_role("list", name="Output").locator(".meta").all_inner_texts()
    assert all(re.fullmatch(r"\+\d+\.\d\d s · \d+ tokens", m) for m in metas), metas
    # The map: every prompt sentence (from /embed) and every generated one (from the stream).
    prompt_n = len(expected["prompt_sentences"])
    expect(page.get_by_role("img")).to_have_attribute(
        "aria-label", f"Similarity map of {prompt_n} prompt and {n} generated sentences"
    )
    page.get_by_role("img").hover(position={"x": 40, "y": 40})
    expect(page.locator("#map-detail")).to_contain_text("P1 · P1: 1.000")

    expect(page.locator("#status-running")).to_have_text("0")
    shot = os.environ.get("SONAR_LLM_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=shot, full_page=True)
    assert console.unexpected() == []


def test_stop_cancels_the_request_on_the_server(
    open_page: Callable[..., tuple[Any, Console]], server: Live
) -> None:
    from playwright.sync_api import expect

    page, console = open_page(server)
    _languages_loaded(page)
    cancelled = metric(server.metrics(), "sonar_llm_cancelled_total")
    _fill_settings(page, **ENDLESS)
    page.get_by_role("button", name="Generate").click()
    output = page.get_by_role("list", name="Output").get_by_role("listitem")
    expect(output.first).to_be_visible()
    wait_until(lambda: metric(server.metrics(), RUNNING) == 1, 30, "the request to run")
    expect(page.locator("#status-running")).to_have_text("1")
    page.get_by_role("button", name="Stop").click()

    wait_until(lambda: metric(server.metrics(), RUNNING) == 0, 30, "the running gauge to drop")
    assert metric(server.metrics(), "sonar_llm_cancelled_total") == cancelled + 1
    expect(page.locator("#status-running")).to_have_text("0")
    expect(page.get_by_role("status")).to_contain_text("Stopped after")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    shown = output.count()
    page.wait_for_timeout(500)
    assert output.count() == shown, "sentences kept arriving after Stop"
    assert console.unexpected() == []


def test_a_picked_target_language_reaches_the_request(
    open_page: Callable[..., tuple[Any, Console]], server: Live
) -> None:
    from playwright.sync_api import expect

    page, console = open_page(server)
    _languages_loaded(page)
    options = page.locator("#languages option")
    assert options.count() == len(sonar_languages())
    target = page.get_by_role("combobox", name="Target language")
    target.fill("french")  # by name, any case
    target.press("Tab")
    expect(target).to_have_value("fra_Latn")
    expect(page.locator("#target-lang-name")).to_have_text("French")
    source = page.get_by_role("combobox", name="Source language")
    source.fill("ENG_LATN")  # by code, any case
    source.press("Tab")
    expect(source).to_have_value("eng_Latn")
    _fill_settings(page, max_sentences=2, max_tokens=32)

    with page.expect_request(lambda r: r.url.endswith("/generate")) as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert body["target_lang"] == "fra_Latn" and body["source_lang"] == "eng_Latn"
    expect(page.locator("#finish")).to_contain_text("finish_reason", timeout=TIMEOUT_MS)
    expected = _generate_via_api(server, max_sentences=2, target_lang="fra_Latn")
    assert _sentences(page) == expected["sentences"]

    target.fill("Klingon")
    target.press("Tab")
    expect(target).to_have_attribute("aria-invalid", "true")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("status")).to_contain_text("Pick the source and target languages")
    assert console.unexpected() == []


def test_chat_sends_the_conversation_and_summarize_the_document(
    open_page: Callable[..., tuple[Any, Console]], server: Live
) -> None:
    from playwright.sync_api import expect

    page, console = open_page(server)
    _languages_loaded(page)
    page.get_by_role("radio", name="Chat").check()
    _fill_settings(page, prompt="Hello there. How are you?", max_sentences=1, max_tokens=32)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#finish")).to_contain_text("finish_reason", timeout=TIMEOUT_MS)
    reply = " ".join(_sentences(page))
    conversation = page.get_by_role("list", name="Conversation").get_by_role("listitem")
    expect(conversation).to_have_text(["You: Hello there. How are you?", f"Model: {reply}"])

    page.get_by_role("textbox", name="Prompt").fill("Tell me more.")
    with page.expect_request(lambda r: r.url.endswith("/generate")) as sent:
        page.get_by_role("button", name="Generate").click()
    assert sent.value.post_data_json["prompt"] == [
        "Hello there. How are you?",
        reply,
        "Tell me more.",
    ]
    expect(conversation).to_have_count(4, timeout=TIMEOUT_MS)

    page.get_by_role("radio", name="Summarize").check()
    _fill_settings(page, max_sentences=1, max_tokens=32)
    with page.expect_request(lambda r: r.url.endswith("/summarize")) as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert body["document"] == PROMPT and body["num_sentences"] == 1
    expect(page.locator("#finish")).to_contain_text("finish_reason", timeout=TIMEOUT_MS)
    with server.client() as c:
        r = c.post("/summarize", json={"document": PROMPT, "num_sentences": 1, "max_tokens": 32})
    assert _sentences(page) == r.json()["sentences"]
    assert console.unexpected() == []


def test_with_an_api_key(open_page: Callable[..., tuple[Any, Console]], keyed_server: Live) -> None:
    from playwright.sync_api import expect

    page, console = open_page(keyed_server)
    status = page.get_by_role("status")
    expect(status).to_have_text(
        "This server needs an API key: enter it in the API key field and save it."
    )
    page.get_by_role("textbox", name="API key").fill("wrong")
    page.get_by_role("button", name="Save key").click()
    expect(status).to_contain_text("refused this API key")

    page.get_by_role("textbox", name="API key").fill(KEY)
    page.get_by_role("button", name="Save key").click()
    _languages_loaded(page)
    expect(status).to_have_text("")
    page.reload()  # the key stays in the browser
    _languages_loaded(page)
    expect(page.get_by_role("textbox", name="API key")).to_have_value(KEY)

    _fill_settings(page, max_sentences=2, max_tokens=32)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#finish")).to_contain_text("finish_reason", timeout=TIMEOUT_MS)
    expected = _generate_via_api(
        keyed_server, headers={"Authorization": f"Bearer {KEY}"}, max_sentences=2
    )
    assert _sentences(page) == expected["sentences"]
    # The browser itself logs each refused request (401) as an error; nothing else may appear.
    assert console.unexpected(allowed=r"status of 401 \(Unauthorized\)") == []


# ----- every screen: a desktop and a phone ----------------------------------------------------
WIDTHS = pytest.mark.parametrize("width", [1280, 390], ids=["desktop", "phone"])


@WIDTHS
def test_the_page_fits_the_screen(
    open_page: Callable[..., tuple[Any, Console]], server: Live, width: int
) -> None:
    page, console = open_page(server, width)
    _languages_loaded(page)
    from playwright.sync_api import expect

    expect(page.locator("#status-model")).to_contain_text("sonar-llm-demo")
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for element in (page.locator("#status-model"), page.get_by_role("button", name="Save key")):
        box = element.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, box
    shot = os.environ.get("SONAR_LLM_PHONE_SCREENSHOT")
    if shot and width < 600:
        page.screenshot(path=shot, full_page=True)
    assert console.unexpected() == []


@WIDTHS
def test_generate_without_a_working_key_says_so(
    open_page: Callable[..., tuple[Any, Console]], keyed_server: Live, width: int
) -> None:
    from playwright.sync_api import expect

    page, console = open_page(keyed_server, width)
    status = page.get_by_role("status")
    expect(status).to_contain_text("needs an API key")
    page.evaluate("document.getElementById('message').textContent = ''")
    page.get_by_role("button", name="Generate").click()
    expect(status).to_have_text(
        "This server needs an API key: enter it in the API key field and save it."
    )
    page.get_by_role("textbox", name="API key").fill("wrong")
    page.get_by_role("button", name="Save key").click()
    expect(status).to_contain_text("refused this API key")
    page.evaluate("document.getElementById('message').textContent = ''")
    page.get_by_role("button", name="Generate").click()
    expect(status).to_have_text("The server refused this API key: check the API key field.")
    # The browser's own validation blocks the next submit: its finding replaces the old message.
    page.get_by_role("spinbutton", name="Seed").fill("-1")
    page.get_by_role("button", name="Generate").click()
    expect(status).to_contain_text("Seed: ")
    expect(status).not_to_contain_text("API key")
    assert console.unexpected(allowed=r"status of 401 \(Unauthorized\)") == []


@WIDTHS
def test_a_refused_field_is_named_once(
    open_page: Callable[..., tuple[Any, Console]], server: Live, width: int
) -> None:
    from playwright.sync_api import expect

    page, console = open_page(server, width)
    _languages_loaded(page)
    _fill_settings(page, max_sentences=1, max_tokens=32)
    page.get_by_role("spinbutton", name="Seed").fill(str(2**70))
    page.get_by_role("button", name="Generate").click()
    status = page.get_by_role("status")
    expect(status).to_contain_text("seed: ")
    assert "seed: seed" not in status.inner_text()
    assert console.unexpected(allowed=r"status of 400 \(Bad Request\)") == []


@WIDTHS
def test_the_summarize_hint_counts_the_sentences(
    open_page: Callable[..., tuple[Any, Console]], server: Live, width: int
) -> None:
    from playwright.sync_api import expect

    page, _ = open_page(server, width)
    page.get_by_role("radio", name="Summarize").check()
    hint = page.locator("#mode-hint")
    page.get_by_role("spinbutton", name="Max sentences").fill("3")
    expect(hint).to_contain_text("summarised in 3 sentences")
    page.get_by_role("spinbutton", name="Max sentences").fill("1")
    expect(hint).to_contain_text("summarised in one sentence")
    assert "Max sentences sentences" not in hint.inner_text()


@WIDTHS
def test_after_stop_the_map_has_the_prompt_rows(
    open_page: Callable[..., tuple[Any, Console]], server: Live, width: int
) -> None:
    from playwright.sync_api import expect

    page, console = open_page(server, width)
    _languages_loaded(page)
    _fill_settings(page, **ENDLESS)
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("list", name="Output").get_by_role("listitem").first).to_be_visible()
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    with server.client() as c:
        prompt = c.post("/segment", json={"text": PROMPT}).json()["sentences"]
    expect(page.get_by_role("img")).to_have_attribute(
        "aria-label", re.compile(rf"^Similarity map of {len(prompt)} prompt and \d+ generated")
    )
    assert console.unexpected() == []


@WIDTHS
def test_the_language_hint_follows_the_typing(
    open_page: Callable[..., tuple[Any, Console]], server: Live, width: int
) -> None:
    from playwright.sync_api import expect

    page, _ = open_page(server, width)
    _languages_loaded(page)
    source = page.get_by_role("combobox", name="Source language")
    source.fill("French")  # still focused: no change event yet
    expect(page.locator("#source-lang-name")).to_have_text("French")
    expect(source).to_have_value("French")
    source.fill("Fren")
    expect(source).to_have_attribute("aria-invalid", "true")
    source.fill("french")
    source.press("Tab")
    expect(source).to_have_value("fra_Latn")
    expect(page.locator("#source-lang-name")).to_have_text("French")


# ----- the routes behind it, without a browser ----------------------------------------------
def test_a_browser_is_sent_to_the_playground_and_api_clients_see_no_change(
    api: Callable[..., TestClient],
) -> None:
    client = api(api_key=[KEY])
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    r = client.get("/", headers=html, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/playground/"
    # An API client at `/` gets what it got before the playground: 401 without a key, else 404.
    assert client.get("/").status_code == 401
    r = client.get("/", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert client.post("/", headers=html, json={}).status_code == 401
    # The page and its files load without a key: the page asks for it.
    page = client.get("/playground", headers=html)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="playground.js"' in page.text
    for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
        r = client.get(f"/playground/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    # Nothing is fetched from elsewhere at run time: no absolute URL in any of the files.
    url = re.compile(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}")
    for name in ("", "playground.js", "playground.css"):
        assert not url.search(client.get(f"/playground/{name}").text), name


def test_languages_lists_every_sonar_language_with_its_name(
    api: Callable[..., TestClient],
) -> None:
    client = api(api_key=[KEY])
    assert client.get("/v1/languages").status_code == 401
    r = client.get("/v1/languages", headers={"X-API-Key": KEY})
    assert r.status_code == 200
    rows = r.json()["data"]
    assert {row["code"] for row in rows} == set(sonar_languages())
    names = {row["code"]: row["name"] for row in rows}
    assert names["eng_Latn"] == "English" and names["zho_Hant"] == "Chinese (Traditional)"
    assert all(name and name != code for code, name in names.items())
    assert [row["name"] for row in rows] == sorted(names.values())


def test_generate_takes_a_conversation_as_a_list_of_turns(
    api: Callable[..., TestClient],
) -> None:
    client = api()
    turns = ["Hello there. How are you?", "Fine, thanks."]
    body = {"prompt": turns, "return_embeddings": True, "max_sentences": 1, "max_tokens": 32}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [s for s in got["prompt_sentences"] if s != "Begin of text."] == [
        "Hello there.",
        "How are you?",
        "Fine, thanks.",
    ]
    # The same conversation as one text gives the same sentences.
    same = client.post("/generate", json={**body, "prompt": " ".join(turns)}).json()
    assert same["sentences"] == got["sentences"]
    assert same["prompt_sentences"] == got["prompt_sentences"]
    for bad in ([], [""], ["  "]):
        r = client.post("/generate", json={**body, "prompt": bad})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text
    # Without return_embeddings the answer is unchanged: no prompt sentences.
    plain = client.post("/generate", json={**body, "return_embeddings": False}).json()
    assert plain["prompt_sentences"] is None


def test_static_files_ship_in_the_wheel() -> None:
    """pyproject's hatch config packages server/, and the page's files are inside it."""
    import tomllib

    from server.api.app import STATIC_DIR

    root = Path(__file__).resolve().parents[2]
    wheel = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    assert "server" in wheel["targets"]["wheel"]["packages"]
    assert STATIC_DIR.is_relative_to(root / "server")
    assert {"index.html", "playground.js", "playground.css"} <= {
        p.name for p in STATIC_DIR.iterdir()
    }
