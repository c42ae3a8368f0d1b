"""Why a reduction failed: the data (remembered) or the environment (retried by the next run)."""

from __future__ import annotations

import errno

ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.ENOMEM, errno.EAGAIN,
                                errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENFILE, errno.EMFILE})


def error_kind(err: BaseException) -> str:
    """``environment`` for failures of the machine (space, I/O, memory, network), else ``data``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MemoryError) or (isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS):
            return "environment"
        err = err.__cause__ or err.__context__
    return "data"
