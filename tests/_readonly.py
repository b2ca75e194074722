"""Run the CLI in a forked child for which a folder with mode 0o555 really is read-only, even as root.

Tests may run as root, whom file modes do not stop (CAP_DAC_OVERRIDE). The child drops that capability (and
its relatives) before it runs the command, so the kernel refuses its writes exactly as it would a user's.
A fork, not a subprocess: the command starts with everything the test session already imported.
"""

from __future__ import annotations

import ctypes
import os
import sys
import traceback
from pathlib import Path

# CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
_DAC_CAPS = (1 << 1) | (1 << 2) | (1 << 3)
CANNOT_PROVE = 77  # the child could still write to the read-only folder: nothing to test here


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_dac_override() -> None:
    """Irreversible for the calling process: only ever called in the forked child."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _Header(0x20080522, 0), (_Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective &= ~_DAC_CAPS & 0xFFFFFFFF
    data[0].permitted &= ~_DAC_CAPS & 0xFFFFFFFF
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def cli_in_child(argv: list, read_only: Path, logs: Path) -> tuple[int, str]:
    """`synthpert ARGV` in a forked child that cannot write to ``read_only`` (chmod 0o555 here); returns
    (exit code, stderr). Exit code CANNOT_PROVE: the folder stayed writable (skip the test)."""
    read_only.chmod(0o555)
    err = logs / "stderr.txt"
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stdout, sys.stderr = open(os.devnull, "w"), os.fdopen(2, "w", buffering=1)
            drop_dac_override()
            if _writable(read_only):
                code = CANNOT_PROVE
            else:
                from synthpert.cli.main import main

                sys.argv = ["synthpert", *map(str, argv)]
                main()
                code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    read_only.chmod(0o755)  # so that pytest can remove it
    return os.waitstatus_to_exitcode(status), err.read_text()
