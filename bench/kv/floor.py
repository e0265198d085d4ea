"""The KV benchmark's floor: an HTTP server answering every request with a constant JSON write answer.

It reads the request body (as the KV API does) and answers the bytes walcar answers a durable
write with, on the same hypercorn configuration as walcar's KV listener — so the difference to
walcar is the cost of the write itself.

    python bench/kv/floor.py PORT [--server hypercorn-trio|walcar-trio|hypercorn-asyncio]

`hypercorn-trio` is hypercorn's own `serve` on trio (the floor issue 24 measured),
`walcar-trio` walcar's KV serving code (its connection server on h11, sidecar/protocols/kv/server.py),
`hypercorn-asyncio` hypercorn's `serve` on asyncio (issue 24 item 3's question).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sidecar.http import JSON, Receive, Scope, Send, hypercorn_config, respond, serve_lifespan

ANSWER = b'{"durable":"true","visible":false,"message":"","sequence":1,"duplicate":false}'


async def constant(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    while (await receive()).get("more_body", False):
        pass
    await respond(send, 200, ANSWER, JSON)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("--server", choices=["hypercorn-trio", "walcar-trio", "hypercorn-asyncio"],
                        default="hypercorn-trio")
    args = parser.parse_args()
    config = hypercorn_config(f"127.0.0.1:{args.port}", graceful_timeout=1.0)
    if args.server == "hypercorn-asyncio":
        import asyncio

        from hypercorn.asyncio import serve as serve_asyncio

        asyncio.run(serve_asyncio(constant, config))  # type: ignore[arg-type]
        return
    import trio

    if args.server == "hypercorn-trio":
        from hypercorn.trio import serve

        trio.run(serve, constant, config)
        return
    trio.run(_walcar, config)


async def _walcar(config: Any) -> None:
    import trio

    from sidecar.config import Listener, validate
    from sidecar.ingress import Ingress
    from sidecar.protocols.kv.server import serve_kv

    listener = Listener(protocol="kv", bind=config.bind[0])
    sidecar_config = validate({"sidecar": {"nats_url": "nats://127.0.0.1:1"}, "listeners": [], "namespaces": {}})
    ingress = Ingress(sidecar_config, None)  # type: ignore[arg-type]  # the constant app never writes
    await serve_kv(constant, config, listener, sidecar_config, ingress, trio.Event())


if __name__ == "__main__":
    main()
