"""Fixtures shared by several test files."""

import builtins
import errno
import io
import os

import pytest


@pytest.fixture
def deny_access(monkeypatch):
    """``deny_access(path)``: from now on, opening ``path`` and looking inside it (if it is a
    directory) raise PermissionError, as after ``chmod 000`` for a user who is not root.

    Simulated by patching open and os.stat, because the tests also run as root, who may read
    anything whatever its mode.
    """
    denied = []
    real_open, real_os_open, real_stat = io.open, os.open, os.stat

    def refused(path) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return False
        path = os.path.abspath(os.fspath(path))
        return any(path == d for d in denied) or any(path.startswith(d + os.sep) for d in denied)

    def guarded_open(file, *args, **kwargs):
        if refused(file):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    def guarded_os_open(file, *args, **kwargs):  # llama_np opens files with os.open (open_regular)
        if refused(file):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_os_open(file, *args, **kwargs)

    def guarded_stat(path, *args, **kwargs):
        if not isinstance(path, int) and any(
                os.path.abspath(os.fspath(path)).startswith(d + os.sep) for d in denied):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "stat", guarded_stat)
    return lambda path: denied.append(os.path.abspath(os.fspath(path)))
