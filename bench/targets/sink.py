"""The benchmark's upstream application: hypercorn on trio, answering 200 to every request.

    python bench/targets/sink.py PORT

Reads the whole body (as an application applying it would) and nothing more, so what
is measured is the client side: walcar's drain, or httpx posting directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from sidecar.http import hypercorn_config, respond, serve_http, serve_lifespan


async def app(scope: dict, receive, send) -> None:
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    while (await receive()).get("more_body"):
        pass
    await respond(send, 200, b"{}")


def main() -> None:
    trio.run(serve_http, app, hypercorn_config(f"127.0.0.1:{sys.argv[1]}", 0.5), trio.Event())


if __name__ == "__main__":
    main()
