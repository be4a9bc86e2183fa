"""The agent's backup commands and answers: typed values, marshmallow schemas, envelopes.

* :mod:`commands.model`: one class per Java class, each command mapped to one engine
  request and making its own answer;
* :mod:`commands.schemas`: the wire form of each (Java names and types, GSON's rules);
* :mod:`commands.envelope`: the GSON envelope, loaded and dumped.
"""

from commands.envelope import EnvelopeError, Problem, dump, load_answers, load_commands
from commands.model import (
    Answer,
    BackupAnswer,
    BackupStorageStatsAnswer,
    Command,
    DeleteBackupCommand,
    GetBackupStorageStatsCommand,
    RebaseBackupCommand,
    RestoreBackupCommand,
    TakeBackupCommand,
)

__all__ = [
    "Answer",
    "BackupAnswer",
    "BackupStorageStatsAnswer",
    "Command",
    "DeleteBackupCommand",
    "EnvelopeError",
    "GetBackupStorageStatsCommand",
    "Problem",
    "RebaseBackupCommand",
    "RestoreBackupCommand",
    "TakeBackupCommand",
    "dump",
    "load_answers",
    "load_commands",
]
