"""The disk tier's directory, checked once at start-up (lmcache.v1.storage_backend.local_disk).

- missing: created (0700 for the parts we create: cached KV reveals prompts);
- cannot be created, or cannot be listed and read: a ConfigError naming local_disk;
- read-only (permissions or a read-only mount): one line, and the tier serves what
  is there and stores nothing;
- owned by another user, or writable by everyone without the sticky bit: a warning
  (whoever can write it can plant or replace chunk files; see docs/configuration.md).
"""

from __future__ import annotations

import logging
import os
import stat

logger = logging.getLogger("lmcache.v1.storage_backend.local_disk")


def _refuse(path: str, problem: str) -> None:
    from lmcache.v1.config import ConfigError

    raise ConfigError(
        f"lmcache config: local_disk={path!r} {problem}; accepted: a directory this process can read and write "
        "(or one it can read, for a tier that only serves what is there)"
    )


def prepare(path: str) -> bool:
    """Check (or create) the directory; True if chunks can be stored in it."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        _refuse(path, "exists and is not a directory")
    except OSError as exc:
        _refuse(path, f"cannot be created ({exc.strerror})")
    try:
        st = os.stat(path)
        with os.scandir(path) as entries:
            next(entries, None)
    except NotADirectoryError:
        _refuse(path, "is not a directory")
    except OSError as exc:
        _refuse(path, f"cannot be read ({exc.strerror})")
    if not stat.S_ISDIR(st.st_mode):
        _refuse(path, "is not a directory")
    _warn_if_shared(path, st)
    if not os.access(path, os.W_OK | os.X_OK):
        logger.warning("disk tier: %s is read-only for this process: chunks already there are served, "
                       "nothing new is stored (make it writable, or point local_disk elsewhere)", path)
        return False
    return True


def _warn_if_shared(path: str, st: os.stat_result) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        logger.warning("disk tier: %s is owned by uid %d, not by this process (uid %d): that user can read the "
                       "cached KV and plant or replace chunk files; use a directory of your own, or set "
                       "chunk_secret (docs/configuration.md, Security)", path, st.st_uid, me)
    elif st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        logger.warning("disk tier: %s is writable by every user: anyone can plant or replace chunk files; "
                       "chmod o-w it, or set chunk_secret (docs/configuration.md, Security)", path)
