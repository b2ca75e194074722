"""User-facing errors: one exception type for user mistakes, and the scrubbing of secrets from messages."""

from __future__ import annotations

import errno
import re

# What the machine, not the code, got wrong (a full, read-only or forbidden disk): the user frees space or
# fixes permissions and reruns. The CLI reports these without a traceback.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                            getattr(errno, "EDQUOT", errno.ENOSPC)})


class SynthpertError(Exception):
    """A problem the user can fix (bad input, bad config, missing file). The message names it."""


_KEYLIKE = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*]{6,}")


def scrub(text: str, secret: str | None) -> str:
    """Remove the key (and anything that looks like one) from text bound for a message or log."""
    if secret and len(secret) >= 4 and secret != "EMPTY":
        text = text.replace(secret, "***")
    return _KEYLIKE.sub("***", text)
