"""The search page in a real headless Chromium (Debian's chromium + chromium-driver, Selenium).

Screenshots of the main states go to test-artifacts/browser/ (git-ignored) for a person to see.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, ServerProcess, coco_images

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = REPO / "test-artifacts" / "browser"
TOKEN = "browser-test-token-0123456789abcdef"
HOSTILE = '<img src=x onerror="window.pwned=1">'
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium and chromium-driver are not installed (make test installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="clipsearch-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: webdriver.Chrome, condition, what: str, timeout: float = 60) -> object:
    """Poll `condition`; an element the page replaced mid-check just means "check again"."""
    try:
        return WebDriverWait(driver, timeout, ignored_exceptions=(
            StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(ARTIFACTS / "failure.png"))
        status = driver.find_element(By.ID, "status").text
        raise AssertionError(f"timed out waiting for {what}; status: {status!r}") from None


def shot(driver: webdriver.Chrome, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def result_ids(driver: webdriver.Chrome) -> list[str]:
    """The result cards' ids, read in one script so a re-render cannot go stale between them."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.card')].map(c => c.dataset.id)")


def thumbnails_loaded(driver: webdriver.Chrome) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll('.card img.thumb')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length")


PHOTOS = 8


@pytest.fixture(scope="module")
def photos_server(server: ServerProcess) -> ServerProcess:
    from clipsearch import Client

    files = coco_images(PHOTOS)
    with Client(server.address) as client:
        client.upsert("browser-photos", ids=[f.name for f in files], images=files,
                      metadata=[{"path": f.name, "rank": i,
                                 "taken": f"2020-0{1 + i % 9}-15T12:00:00Z",
                                 "caption": HOSTILE if i == 0 else f"photo {i}"}
                                for i, f in enumerate(files)])
    return server


def test_search_page(browser: webdriver.Chrome, photos_server: ServerProcess) -> None:
    d = browser
    d.get(photos_server.http_url + "/?collection=browser-photos")
    wait(d, lambda d: f"browser-photos ({PHOTOS})" in d.find_element(By.ID, "collection").text,
         "the collection picker with its count")
    wait(d, lambda d: len(result_ids(d)) == PHOTOS, "the first items before any query")

    # search as you type: thumbnails appear with scores
    d.find_element(By.TAG_NAME, "body").send_keys("/")
    assert d.switch_to.active_element.get_attribute("id") == "query"
    d.switch_to.active_element.send_keys("a dog playing on the grass")
    wait(d, lambda d: d.find_element(By.ID, "status").text == f"{PHOTOS} results",
         "the search results")
    wait(d, lambda d: thumbnails_loaded(d) == PHOTOS, "every thumbnail to load")
    assert all(s.text.replace(".", "").replace("-", "").isdigit()
               for s in d.find_elements(By.CSS_SELECTOR, ".card .score"))
    shot(d, "search")

    # metadata is shown as text, never run as HTML
    first = coco_images(1)[0].name
    card = d.find_element(By.CSS_SELECTOR, f'.card[data-id="{first}"]')
    card.send_keys(Keys.ENTER)  # keyboard: a result is a button
    wait(d, lambda d: d.find_element(By.ID, "detail").is_displayed(), "the detail panel")
    values = [dd.text for dd in d.find_elements(By.CSS_SELECTOR, "#detail-metadata dd")]
    assert HOSTILE in values
    assert d.execute_script("return window.pwned") is None
    assert not d.find_elements(By.CSS_SELECTOR, "#detail-metadata img, .card .hover img")
    shot(d, "detail")

    # more like this: a search by the item's id finds the item itself first
    d.find_element(By.ID, "more-like-this").click()
    wait(d, lambda d: result_ids(d)[:1] == [first] and "results" in
         d.find_element(By.ID, "status").text, "the more-like-this results")
    assert "Like" in d.find_element(By.ID, "query-label").text
    d.find_element(By.ID, "clear-query").click()

    # drop an image: the same photo comes back first
    dropped = coco_images(3)[2]
    d.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const file = new File([bytes], arguments[1], {type: 'image/jpeg'});
        const data = new DataTransfer();
        data.items.add(file);
        for (const type of ['dragenter', 'dragover', 'drop']) {
          window.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true,
                                                    cancelable: true}));
        }""", base64.b64encode(dropped.read_bytes()).decode(), dropped.name)
    wait(d, lambda d: result_ids(d)[:1] == [dropped.name], "the image search results")
    assert d.find_element(By.ID, "query-label").text == dropped.name
    assert d.find_element(By.ID, "drop").get_attribute("hidden") is not None
    shot(d, "image-drop")

    # pick an image with the file chooser
    picked = coco_images(5)[4]
    d.find_element(By.ID, "image-file").send_keys(str(picked))
    wait(d, lambda d: result_ids(d)[:1] == [picked.name], "the picked image's results")

    # filter: a number range on the metadata
    d.find_element(By.CSS_SELECTOR, "#filters summary").click()
    d.find_element(By.ID, "add-filter").click()
    row = d.find_element(By.CSS_SELECTOR, ".filter-row")
    key, op, low, high = row.find_elements(By.CSS_SELECTOR, "input, select")
    key.send_keys("rank")
    op.send_keys("number between")
    low.send_keys("1")
    high.send_keys("3")
    d.find_element(By.ID, "apply-filters").click()
    expected = sorted(f.name for f in coco_images(PHOTOS)[1:4])
    wait(d, lambda d: sorted(result_ids(d)) == expected, "the filtered results")
    shot(d, "filter")

    # a filter that matches nothing says so
    high.clear()
    high.send_keys("-5")
    d.find_element(By.ID, "apply-filters").click()
    wait(d, lambda d: d.find_element(By.ID, "status").text == "No results.", "'No results.'")
    d.find_element(By.ID, "clear-filters").click()
    wait(d, lambda d: len(result_ids(d)) == PHOTOS, "the results without filters")

    # filter: a time range (the picker's local time; photos were taken mid-month at noon)
    d.find_element(By.ID, "add-filter").click()
    row = d.find_element(By.CSS_SELECTOR, ".filter-row")
    key, op = row.find_elements(By.CSS_SELECTOR, "input, select")[:2]
    key.send_keys("taken")
    d.execute_script("""
        const [op, from] = arguments[0].querySelectorAll('select, input[aria-label="Value"]');
        op.value = 'time';
        op.dispatchEvent(new Event('change'));
        from.value = '2020-03-01T00:00';""", row)
    d.find_element(By.ID, "apply-filters").click()
    expected = sorted(f.name for f in coco_images(PHOTOS)[2:])  # taken in March or later
    wait(d, lambda d: sorted(result_ids(d)) == expected, "the time-filtered results")
    d.find_element(By.ID, "clear-filters").click()
    wait(d, lambda d: len(result_ids(d)) == PHOTOS, "the results without filters")

    # readable on a phone: no sideways scrolling, two columns of results
    d.set_window_size(390, 844)
    try:
        overflow = d.execute_script(
            "const width = document.documentElement.clientWidth;"
            "return [document.documentElement.scrollWidth - width,"
            " ...[...document.querySelectorAll('.card')].map("
            "  c => Math.ceil(c.getBoundingClientRect().right) - width)];")
        assert max(overflow) <= 0, overflow
        shot(d, "phone")
    finally:
        d.set_window_size(1280, 900)


@pytest.fixture(scope="module")
def secured(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("browser-auth") / "data",
                         env={"CLIPSEARCH_AUTH_TOKENS": TOKEN}).start()
    yield proc
    assert proc.stop() == 0, proc.log()


def test_token_login(browser: webdriver.Chrome, secured: ServerProcess) -> None:
    d = browser
    d.get(secured.http_url + "/")
    wait(d, lambda d: d.find_element(By.ID, "login").is_displayed(), "the sign-in form")
    shot(d, "login")
    d.find_element(By.ID, "token").send_keys("not-the-right-token-0123456789")
    d.find_element(By.ID, "token").send_keys(Keys.ENTER)
    wait(d, lambda d: d.find_element(By.ID, "login-error").text == "invalid bearer token",
         "the wrong token to be refused")
    d.find_element(By.ID, "token").send_keys(TOKEN + Keys.ENTER)
    wait(d, lambda d: "no collections yet" in d.find_element(By.ID, "status").text,
         "the empty-server state after signing in")
    assert d.execute_script("return sessionStorage.getItem('clipsearch.token')") == TOKEN
    assert not d.find_element(By.ID, "login").is_displayed()

    from clipsearch import Client

    files = coco_images(2)
    with Client(f"127.0.0.1:{secured.port}", token=TOKEN) as client:
        client.upsert("private", ids=[f.name for f in files], images=files)
    d.refresh()  # the token is still there for this tab
    wait(d, lambda d: len(result_ids(d)) == 2, "the collection's items")
    wait(d, lambda d: thumbnails_loaded(d) == 2, "thumbnails fetched with the token")
    shot(d, "signed-in")


def test_load_more_and_items_without_pictures(browser: webdriver.Chrome,
                                              photos_server: ServerProcess) -> None:
    from clipsearch import Client

    texts = [f"caption number {i}" for i in range(30)]
    with Client(photos_server.address) as client:
        client.upsert("browser-texts", ids=[f"t{i:02d}" for i in range(30)], texts=texts,
                      metadata=[{"n": i} for i in range(30)])
    d = browser
    d.get(photos_server.http_url + "/?collection=browser-texts")
    wait(d, lambda d: "browser-texts (30)" in d.find_element(By.ID, "collection").text,
         "the text collection")
    d.find_element(By.ID, "query").send_keys("caption")
    wait(d, lambda d: len(result_ids(d)) == 24 and d.find_element(By.ID, "more").is_displayed(),
         "a first page of 24 with 'Load more'")
    d.find_element(By.ID, "more").click()
    wait(d, lambda d: len(result_ids(d)) == 30, "all 30 after 'Load more'")
    assert sorted(result_ids(d)) == [f"t{i:02d}" for i in range(30)]
    wait(d, lambda d: not d.find_element(By.ID, "more").is_displayed(), "'Load more' to go")
    # text items have no thumbnail: their id stands in for the picture
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card .nothumb")) == 30,
         "placeholders for items without a picture")
    shot(d, "load-more")


def test_long_ids_keep_their_end_and_filter_keys_are_offered(
        browser: webdriver.Chrome, photos_server: ServerProcess) -> None:
    """Issue 18: ids made from paths were cut at the end, so all looked alike; and the filter's
    key field gave no hint of the keys the items have."""
    from clipsearch import Client

    files = coco_images(2)
    ids = [f"datasets/coco/images/train2017/{f.name}" for f in files]  # alike but for the end
    with Client(photos_server.address) as client:
        client.upsert("browser-paths", ids=ids, images=files,
                      metadata=[{"album": "x", "exif": {"camera": "X100"}}, {"year": 2020}])
    d = browser
    d.get(photos_server.http_url + "/?collection=browser-paths")
    wait(d, lambda d: sorted(result_ids(d)) == sorted(ids), "the items with long ids")
    labels = d.execute_script("""
        return [...document.querySelectorAll('.card')].map(card => {
          const label = card.querySelector('.id'), head = label.querySelector('.head');
          const tail = label.querySelector('.tail').getBoundingClientRect();
          const box = label.getBoundingClientRect();
          return {id: card.dataset.id, title: label.title, text: label.textContent,
                  tail: label.querySelector('.tail').textContent,
                  cut: head.scrollWidth > head.clientWidth,
                  tailShown: tail.width > 0 && tail.left >= box.left - 0.5
                             && tail.right <= box.right + 0.5};
        })""")
    for label in labels:
        assert label["title"] == label["text"] == label["id"], label  # the whole id is there
        assert label["cut"] and label["tailShown"], label  # cut before its end, which shows
        assert label["id"].endswith(label["tail"]) and len(label["tail"]) >= 8, label
    shot(d, "long-ids")

    d.find_element(By.CSS_SELECTOR, "#filters summary").click()
    d.find_element(By.ID, "add-filter").click()
    key = d.find_element(By.CSS_SELECTOR, ".filter-row input")
    assert key.get_attribute("list") == "filter-keys"
    offered = ("return [...document.querySelectorAll('#filter-keys option')]"
               ".map(o => o.value)")
    assert d.execute_script(offered) == ["album", "exif", "exif.camera", "year"]
    key.send_keys("exif.camera")  # the suggested key filters as any typed one does
    d.find_element(By.CSS_SELECTOR, ".filter-row input[aria-label='Value']").send_keys("X100")
    d.find_element(By.ID, "apply-filters").click()
    wait(d, lambda d: result_ids(d) == [ids[0]], "the items with that key's value")
    d.find_element(By.ID, "clear-filters").click()

    # another collection offers its own keys
    d.execute_script("const s = document.getElementById('collection');"
                     "s.value = 'browser-photos'; s.dispatchEvent(new Event('change'));")
    wait(d, lambda d: d.execute_script(offered) == ["caption", "path", "rank", "taken"],
         "the other collection's keys")
