"""The one masking rule for secrets that travel inside values the shim logs or prints.

Ceph sources carry their key (``rbd:pool/image:...:id=admin:key=AQB...``, or a
``keyring=`` path); CIFS mount options carry passwords (those are masked by
:func:`shim.nas.redact_options` before they are ever shown). :func:`redact` masks the
``rbd:`` secrets in any text; the log handlers apply it to every line (``shim.log``), and
the one-line error on stdout goes through it too (``shim.contract``).
"""

from __future__ import annotations

import logging
import re

MASK = "***"

_RBD_SECRET = re.compile(r"(^|[:\s,'\"])(key|keyring|secret)=([^:\s,'\"]*)")


def redact(text: str) -> str:
    """``text`` with the value of every ``key=``, ``keyring=`` and ``secret=`` option of a
    colon-separated source string replaced by ``***``."""
    return _RBD_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}={MASK}", text)


class RedactingFilter(logging.Filter):
    """A handler filter that masks secrets in each record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keep the record; mask its message (and the exception text)."""
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def public_source(source: str) -> str:
    """What may be recorded of a disk source (on the NAS, in a manifest): an ``rbd:`` source
    as ``rbd:<pool>/<image>`` only (its options carry the monitors' key), others as they are.
    """
    if source.startswith("rbd:"):
        return "rbd:" + source[len("rbd:") :].split(":", 1)[0]
    return source
