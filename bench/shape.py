"""What shaping an upstream's answer costs the event loop, by answer size. Numbers, not a test.

``service.shape`` decodes an answer, picks declared fields and redacts every injected secret
before the agent sees it; it runs on the event loop, so every other call waits while it does.
The gateway bench's upstream answers 27 bytes; real APIs answer tens to hundreds of KB (a page
of GitHub issues is ~100-300 KB). For JSON answers of 1 to 400 issue-like items (with URLs,
percent escapes, '&' and '+', so the decoding check has work) and a plain-text answer, it
times in one process:

* ``shape``: the broker's path (a whole-structure check, a walk only on a hit);
* ``walk``: the baseline, every string redacted on its own after a walk that replaces lone
  surrogates (what shape did before the whole-structure check);

and, to show where the rest goes, ``json.loads`` alone. Each figure is the median of
``--repeats`` timings of ``--loops`` calls. Prints a table and one JSON line.

    python bench/shape.py [--loops 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import time
from collections.abc import Callable
from typing import Any

from broker.capabilities import parse_manifest
from broker.ports import UpstreamResponse
from broker.redaction import Redactor
from broker.service import _clean, shape

ITEMS = (1, 10, 100, 400)
SECRET = "ghp_bench0S3cr3tT0kenValue0123456789"


def item(i: int, rng: random.Random) -> dict[str, Any]:
    words = "".join(rng.choices(string.ascii_letters + " \n", k=380))
    return {
        "id": 10**9 + i,
        "url": f"https://api.example.test/repos/o/r/issues/{i}",
        "html_url": f"https://example.test/o/r/issues/{i}?a=1&b=%2F",
        "title": "".join(rng.choices(string.ascii_letters + " ", k=60)),
        "state": "open",
        "locked": False,
        "user": {"login": "someone", "id": 12345, "type": "User", "site_admin": False},
        "labels": [{"id": 1, "name": "bug", "color": "d73a4a", "default": True}],
        "comments": i % 7,
        "created_at": "2026-11-27T02:00:00Z",
        "body": words + " see https://x.test/a?q=a%20b&page=2 + more",
        "score": 1.5,
    }


def timed(fn: Callable[[], object], loops: int, repeats: int) -> float:
    """Median ms per call over ``repeats`` runs of ``loops`` calls."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        runs.append((time.perf_counter() - start) / loops * 1000)
    return statistics.median(runs)


def answers(rng: random.Random) -> list[tuple[str, UpstreamResponse]]:
    out = []
    for n in ITEMS:
        body = json.dumps([item(i, rng) for i in range(n)]).encode()
        kind = (("content-type", "application/json"),)
        out.append((f"json {n} items", UpstreamResponse(200, kind, body)))
    text = "".join(item(i, rng)["body"] for i in range(100)).encode()
    out.append(("text", UpstreamResponse(200, (("content-type", "text/plain"),), text)))
    return out


def measure(
    cap: Any, redactor: Redactor, name: str, response: UpstreamResponse, options: Any
) -> dict[str, Any]:
    text = response.body.decode()
    is_json = name.startswith("json")

    def walk() -> Any:
        return redactor._redact(_clean(json.loads(text)) if is_json else text)

    # The same answer either way (there is no secret in it).
    assert walk() == shape(cap, response, redactor)[1] == (json.loads(text) if is_json else text)
    return {
        "answer": name,
        "kb": round(len(response.body) / 1024, 1),
        "shape_ms": timed(lambda: shape(cap, response, redactor), options.loops, options.repeats),
        "walk_ms": timed(walk, options.loops, options.repeats),
        "json_loads_ms": timed(lambda: json.loads(text), options.loops, options.repeats)
        if is_json
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loops", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    cap = parse_manifest({"name": "bench.shape", "http": {"url": "http://127.0.0.1:1/"}})
    redactor = Redactor([SECRET])
    rows = [
        measure(cap, redactor, name, response, options)
        for name, response in answers(random.Random(1))
    ]
    print(f"{'answer':16} {'KB':>7} {'shape ms':>9} {'walk ms':>9} {'loads ms':>9}")
    for r in rows:
        loads = "-" if r["json_loads_ms"] is None else f"{r['json_loads_ms']:.3f}"
        print(
            f"{r['answer']:16} {r['kb']:7.1f} {r['shape_ms']:9.3f} {r['walk_ms']:9.3f} {loads:>9}"
        )
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
