"""A real browser opens a shared link and lands on the same head and gate state (fixtures of test_browser)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest

from tests.test_browser import ARTIFACTS, app_url, home, page, running_app  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.browser


def test_a_shared_link_opens_the_same_gate_state_and_head_in_a_real_browser(app_url, page):  # noqa: F811
    page.set_viewport_size({"width": 1400, "height": 1800})
    page.goto(f"{app_url}/?page=gates&closed=0:6-3:1&head=1.8&sentence=a+dull+film")  # L0H1, L0H2, L3H0 closed
    page.get_by_text("kept 69/72 heads").wait_for(timeout=300_000)  # the same pruned model
    grid = page.locator(".js-plotly-plot").first
    closed = ("() => Array.from(document.querySelector('.js-plotly-plot')?._fullData?.[1]?.customdata ?? [])"
              ".map(c => Array.from(c).join('.'))")
    page.wait_for_function(f"({closed})().length === 3", timeout=60_000)
    assert sorted(page.evaluate(closed)) == ["0.1", "0.2", "3.0"]  # the grid's closed (✕) cells
    assert grid.is_visible() and not page.locator('[data-testid="stException"]').count()
    query = parse_qs(urlparse(page.url).query)  # the browser's URL is the view's link again
    assert (query["page"], query["closed"], query["head"], query["sentence"]) == (["gates"], ["0:6-3:1"], ["1.8"],
                                                                                ["a dull film"])
    page.get_by_role("button", name="Link to this view").click()
    shown = page.locator('[data-testid="stPopoverBody"] code').inner_text()
    assert "page=gates" in shown and "closed=0%3A6-3%3A1" in shown and "head=1.8" in shown
    (ARTIFACTS / "teaching").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "teaching" / "shared_link_gates.png"))


def test_a_deep_link_to_a_fresh_server_opens_the_page_inside_the_app(home, page):  # noqa: F811
    """The first request of a new server names a page's own URL: it must run inside app.py's navigation (the
    sidebar's titles, presenter mode), not alone as a file of a `pages/` folder would."""
    with running_app(home) as url:
        page.goto(f"{url}/tour")
        page.get_by_text("1. A sentence goes in").wait_for(timeout=120_000)
        sidebar = page.locator('[data-testid="stSidebar"]')
        sidebar.get_by_text("Presenter mode").wait_for(timeout=30_000)
        assert sidebar.get_by_text("Guided tour").count() and not sidebar.get_by_text("tour", exact=True).count()
