"""Run only the journal and the memcached listeners of a walcar config (no admin, no drain).

Used by run.py when `walcar run` cannot serve a memcached listener yet; otherwise
run.py benchmarks the real `walcar run`. Usage: python bench/memcached/front.py CONFIG
"""

from __future__ import annotations

import signal
import sys

import trio

from sidecar import config as config_mod
from sidecar import logs
from sidecar.ingress import Ingress
from sidecar.log.service import open_journal
from sidecar.protocols.memcache.server import serve_memcached


async def main(path: str) -> None:
    config = config_mod.load(path)
    logs.configure(config.sidecar.log_level)
    stop = trio.Event()
    async with open_journal(config, connect_retry=10.0) as journal:
        ingress = Ingress(config, journal)
        async with trio.open_nursery() as nursery:
            for listener in config.listeners:
                if listener.protocol == "memcached":
                    await nursery.start(serve_memcached, listener, ingress, config, stop)
            print("ready", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    stop.set()
                    break


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
