"""A small ESCI release in the official schema, with the oddities of the real one.

40 examples over 10 queries (4 each, labels E, S, C, I in turn):
- queries 0-7 are "us", query 8 is "es", query 9 is "jp";
- small_version is 1 for every query except 6 and 7 (large_version is 1 everywhere);
- split: queries 0-3, 6, 8 are train, 4, 5, 7, 9 test;
- the product of example 105 (query 1, "us") is missing from the products file;
- the "es" query reuses the product ids of query 0 with other titles (the join needs the locale);
- product descriptions are missing (None) on query 2, bullets carry HTML, one description is long.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

LOCALES = ["us"] * 8 + ["es", "jp"]
SMALL = [1, 1, 1, 1, 1, 1, 0, 0, 1, 1]
SPLIT = ["train", "train", "train", "train", "test", "test", "train", "test", "train", "test"]
MISSING_PRODUCT = 105  # example_id whose product is not in the products file
LONG_DESCRIPTION = "<p>" + "Very long description sentence. " * 60 + "</p>"
# counts with locale="us": 32 us examples, 8 of them not small, 1 without a product
US_SMALL = {"kept": 23, "train_pool": 15, "test": 8, "dropped_locale": 8, "dropped_not_small": 8, "missing": 1}


def product_id(q: int, k: int) -> str:
    return f"B0{(0 if q == 8 else q):02d}{k}"  # query 8 ("es") reuses query 0's ids


def example_rows() -> list[dict]:
    rows = []
    for q in range(10):
        for k in range(4):
            rows.append({
                "example_id": 100 + 4 * q + k, "query": f"query {q} words", "query_id": 1000 + q,
                "product_id": product_id(q, k), "product_locale": LOCALES[q], "esci_label": "ESCI"[k],
                "small_version": SMALL[q], "large_version": 1, "split": SPLIT[q],
            })
    return rows


def product_rows() -> list[dict]:
    rows = []
    for q in range(10):
        for k in range(4):
            if 100 + 4 * q + k == MISSING_PRODUCT:
                continue
            rows.append({
                "product_id": product_id(q, k),
                "product_title": f"{'Producto' if q == 8 else 'Product'} {q}-{k} &amp; more",
                "product_description": (None if q == 2 else LONG_DESCRIPTION if (q, k) == (0, 0)
                                        else f"<b>Desc</b> of {q}-{k}"),
                "product_bullet_point": f"<li>Bullet <i>one</i></li>\n  Bullet   two &gt; three\n" if k < 2 else None,
                "product_brand": "" if k == 3 else f"Brand{q}",
                "product_color": None if k % 2 else "Red",
                "product_locale": LOCALES[q],
            })
    return rows


def write_esci(folder: str | Path, examples: list[dict] | None = None, products: list[dict] | None = None) -> Path:
    """Write the two official parquet files into `folder` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples = example_rows() if examples is None else examples
    products = product_rows() if products is None else products
    pd.DataFrame(examples).to_parquet(folder / "shopping_queries_dataset_examples.parquet")
    pd.DataFrame(products).to_parquet(folder / "shopping_queries_dataset_products.parquet")
    return folder


def joined_rows() -> list[dict]:
    """The fixture already joined (as a hub copy would be), products missing from the join left out."""
    products = {(p["product_locale"], p["product_id"]): p for p in product_rows()}
    examples = [e for e in example_rows() if e["example_id"] != MISSING_PRODUCT]
    return [{**e, **products[(e["product_locale"], e["product_id"])]} for e in examples]
