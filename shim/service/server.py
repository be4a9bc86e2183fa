"""The running service: its listeners, its scheduler, and an orderly stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import TracebackType

from aiohttp import web

from shim import operations
from shim.service.app import make_app
from shim.service.config import ServiceConfig, UnixListener, bind_tcp_socket, bind_unix_socket
from shim.service.jobs import Runner, Scheduler

log = logging.getLogger(__name__)


class Service:
    """The socket service: ``async with Service(config) as service: ...`` or :func:`serve`."""

    def __init__(self, config: ServiceConfig, *, runner: Runner = operations.run) -> None:
        self.config = config
        self._engine = runner
        self.scheduler: Scheduler | None = None
        self._web: web.AppRunner | None = None
        self._unix: UnixListener | None = None
        self.tcp_address: tuple[str, int] | None = None
        """Where the TCP listener listens (its real port when 0 was asked for)."""

    async def start(self) -> None:
        """Check and bind the listeners (or refuse, saying why), then serve."""
        config = self.config
        unix = bind_unix_socket(config.socket_path)
        tcp: socket.socket | None = None
        try:
            if config.tcp is not None:
                tcp = bind_tcp_socket(config.tcp)
            self.scheduler = Scheduler(
                max_backups=config.max_backups,
                keep_finished=config.keep_finished_jobs,
                runner=self._engine,
                command_timeout=config.command_timeout,
            )
            app = make_app(
                self.scheduler,
                token=config.token,
                max_body_bytes=config.max_body_bytes,
                generation=config.generation,
            )
            self._web = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._web.setup()
            await web.SockSite(self._web, unix.sock).start()
            if tcp is not None:
                await web.SockSite(self._web, tcp).start()
                host, port = tcp.getsockname()[:2]
                self.tcp_address = (host, port)
        except BaseException:
            unix.remove()
            unix.sock.close()
            if tcp is not None:
                tcp.close()
            raise
        self._unix = unix
        log.info(
            "listening on %s%s (at most %d backups at once)",
            config.socket_path,
            f" and {config.tcp.host}:{self.tcp_address[1]}"
            if config.tcp is not None and self.tcp_address
            else "",
            config.max_backups,
        )

    async def stop(self) -> None:
        """Refuse new jobs, abort those in flight (each cleans up), close the listeners."""
        if self.scheduler is not None:
            await self.scheduler.shutdown()
        if self._web is not None:
            await self._web.cleanup()
            self._web = None
        if self._unix is not None:
            self._unix.remove()
            self._unix = None
        log.info("stopped")

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(config: ServiceConfig) -> None:
    """Run the service until SIGTERM or SIGINT, then stop it in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Service(config):
        await stop.wait()
        log.info("signal received: stopping")
