"""Run only the journal and the CQL listeners of a walcar config (no admin, no drain).

Used by run.py when `walcar run` cannot serve a cql listener yet; otherwise run.py
benchmarks the real `walcar run`. Usage: python bench/cql/front.py CONFIG
"""

from __future__ import annotations

import signal
import sys

import trio

from sidecar import config as config_mod
from sidecar import logs
from sidecar.ingress import Ingress
from sidecar.log.service import open_journal
from sidecar.protocols.cql.server import serve_cql


async def main(path: str) -> None:
    config = config_mod.load(path)
    logs.configure(config.sidecar.log_level)
    stop = trio.Event()
    async with open_journal(config, connect_retry=10.0) as journal:
        ingress = Ingress(config, journal)
        async with trio.open_nursery() as nursery:
            for listener in config.listeners:
                if listener.protocol == "cql":
                    await nursery.start(serve_cql, listener, ingress, config, stop)
            print("ready", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    stop.set()
                    break


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
