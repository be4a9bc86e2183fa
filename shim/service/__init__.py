"""The socket service: CloudStack's backup commands as JSON over a local socket.

``POST /v1/commands`` takes a GSON envelope of commands (:mod:`commands`), runs each
through :mod:`shim.operations` exactly as the drop-in would, and answers the envelope of
answers; ``?async=1`` answers with a job to follow (``/v1/jobs/{id}``: state, progress,
answers; ``DELETE`` aborts). ``/v1/health`` and ``/v1/openapi.json`` describe it. Run it
with ``scripts/serve``; :mod:`shim.service.client` sends envelopes by hand.
"""

from shim.service.config import ServiceConfig, StartupRefused, TcpAddress
from shim.service.jobs import Job, JobState, Progress, Scheduler
from shim.service.server import Service, serve

__all__ = [
    "Job",
    "JobState",
    "Progress",
    "Scheduler",
    "Service",
    "ServiceConfig",
    "StartupRefused",
    "TcpAddress",
    "serve",
]
