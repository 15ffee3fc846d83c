"""Whether a user (not this process: nginx's workers run as another) may use a path, from its
mode bits, owner and group; os.access answers for this process only."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gids: frozenset[int]


def user_named(name: str, group: str | None = None) -> User:
    entry = pwd.getpwnam(name)
    gids = {entry.pw_gid, *os.getgrouplist(name, entry.pw_gid)}
    if group:
        gids.add(grp.getgrnam(group).gr_gid)
    return User(name, entry.pw_uid, frozenset(gids))


def current_user() -> User:
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a container's uid without a passwd entry
        name = str(os.geteuid())
    return User(name, os.geteuid(), frozenset({os.getegid(), *os.getgroups()}))


def allowed(user: User, path: Path, want: str) -> bool:
    """Whether `user` may `want` ("r", "w", "x" or a mix) `path` itself, from its mode and owner
    (os.access answers for this process only). Root may do anything but run a non-executable file."""
    info = os.stat(path)
    if user.uid == 0:
        return "x" not in want or stat.S_ISDIR(info.st_mode) or bool(info.st_mode & 0o111)
    if info.st_uid == user.uid:
        shift = 6
    elif info.st_gid in user.gids:
        shift = 3
    else:
        shift = 0
    bits = {"r": 4, "w": 2, "x": 1}
    return all(info.st_mode >> shift & bits[c] for c in want)


def usable(user: User, path: Path, want: str) -> str | None:
    """None when `user` can reach `path` (x on every folder above) and `want` it; else the reason."""
    path = path.resolve()
    for above in reversed(path.parents):
        if not above.exists():
            return f"{above} does not exist"
        if not allowed(user, above, "x"):
            return f"{above} is closed to {user.name} (no x)"
    if not path.exists():
        return f"{path} does not exist"
    if not allowed(user, path, want):
        return f"{path} is not {'/'.join({'r': 'readable', 'w': 'writable', 'x': 'searchable'}[c] for c in want)} for {user.name}"
    return None
