"""WebShop's text-mode pages: state, available actions, transitions and rendering.

Pages (the ``web_agent_site`` templates of the text env; text mode = visible strings joined
by " [SEP] "):

* search:  ``WebShop [SEP] Instruction: [SEP] <goal> [SEP] Search``
* results: ``Instruction: [SEP] <goal> [SEP] Back to Search [SEP] Page n (Total results: N)
  [SEP] [< Prev [SEP]] Next > [SEP] <ASIN> [SEP] <Title> [SEP] <price> …`` (10 per page of
  the top 50; "< Prev" from page 2 on, "Next >" always, past the last page the list is empty)
* item:    ``Instruction: [SEP] <goal> [SEP] Back to Search [SEP] < Prev [SEP] <option name>
  [SEP] <value> … [SEP] <Title> [SEP] Price: <price> [SEP] Rating: N.A. [SEP] Description
  [SEP] Features [SEP] Reviews [SEP] Buy Now``
* description / features / reviews: ``… Back to Search [SEP] < Prev [SEP] <content>``

Available actions follow ``get_available_actions``: ``has_search_bar`` (search page only, unless
``search_anywhere``, which mirrors the text env's acceptance of ``search[…]`` on any page) and
``clickables``: lowercase button texts and ASIN links in page order, then option values.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .loader import Product
from .search import SearchEngine

SEP = " [SEP] "
PER_PAGE = 10
SUB_PAGES = ("description", "features", "reviews")
ITEM_BUTTONS = ("description", "features", "reviews", "buy now")


@dataclass(frozen=True)
class PageState:
    """Where the shopper is; every transition returns a new state."""

    page: str = "search"   # search | results | item | description | features | reviews | done
    query: str = ""
    results: tuple[str, ...] = ()     # ranked ASINs of the last search (at most 50)
    page_num: int = 1
    asin: str | None = None           # the item being viewed
    options: dict[str, str] = field(default_factory=dict)  # option name -> chosen value

    def page_asins(self) -> tuple[str, ...]:
        start = (self.page_num - 1) * PER_PAGE
        return self.results[start:start + PER_PAGE]


def clickables(state: PageState, products: dict[str, Product]) -> list[str]:
    """Lowercase texts ``click[…]`` accepts on the current page."""
    if state.page in ("search", "done"):
        return []
    out = ["back to search"]
    if state.page == "results":
        if state.page_num > 1:
            out.append("< prev")
        out.append("next >")
        out.extend(a.lower() for a in state.page_asins())
        return out
    out.append("< prev")
    if state.page == "item":
        out.extend(ITEM_BUTTONS)
        for values in products[state.asin].options.values():
            out.extend(v for v in values if v not in out)
    return out


def admissible_actions(state: PageState, products: dict[str, Product],
                       search_anywhere: bool = False) -> list[str]:
    """verl-agent's list: "search[<your query>]" when a search bar is up, then each click."""
    head = ["search[<your query>]"] if (search_anywhere or state.page == "search") else []
    return head + [f"click[{c}]" for c in clickables(state, products)]


def do_search(state: PageState, query: str, engine: SearchEngine) -> PageState:
    return PageState(page="results", query=query, results=tuple(engine.search(query)))


def do_click(state: PageState, target: str, products: dict[str, Product]) -> PageState:
    """The page after clicking ``target`` (already checked to be a clickable)."""
    if target == "back to search":
        return PageState()
    if state.page == "results":
        if target == "next >":
            return replace(state, page_num=state.page_num + 1)
        if target == "< prev":
            return replace(state, page_num=state.page_num - 1)
        asin = next(a for a in state.page_asins() if a.lower() == target)
        return replace(state, page="item", asin=asin, options={})
    if state.page in SUB_PAGES:  # only "< prev" is left here
        return replace(state, page="item")
    if target == "< prev":
        return replace(state, page="results", asin=None, options={})
    if target in SUB_PAGES:
        return replace(state, page=target)
    name = option_owner(products[state.asin], target)
    if name is not None:
        return replace(state, options={**state.options, name: target})
    return state  # "buy now" is handled by the game


def option_owner(product: Product, value: str) -> str | None:
    """The option a click on ``value`` sets: the last option listing it (WebShop keeps the last
    radio button of a repeated value in its text -> clickable map)."""
    owners = [name for name, values in product.options.items() if value in values]
    return owners[-1] if owners else None


def render(state: PageState, instruction: str, products: dict[str, Product]) -> str:
    """The text-mode observation of ``state``."""
    if state.page == "search":
        return SEP.join(["WebShop", "Instruction:", instruction, "Search"])
    parts = ["Instruction:", instruction, "Back to Search"]
    if state.page == "results":
        parts.append(f"Page {state.page_num} (Total results: {len(state.results)})")
        if state.page_num > 1:
            parts.append("< Prev")
        parts.append("Next >")
        for asin in state.page_asins():
            product = products[asin]
            parts.extend([asin, product.title, product.price_tag])
        return SEP.join(parts)
    product = products[state.asin]
    parts.append("< Prev")
    if state.page == "item":
        for name, values in product.options.items():
            parts.extend([name, *values])
        parts.extend([product.title, f"Price: {product.price_tag}", "Rating: N.A.",
                      "Description", "Features", "Reviews", "Buy Now"])
    elif state.page == "description":
        parts.append(product.description)
    elif state.page == "features":
        parts.extend(product.bullets)
    return SEP.join(p for p in parts if p)
