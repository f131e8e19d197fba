"""Run a parse of untrusted bytes in a forked child with address-space, CPU and wall-clock limits.

A parser bug (a header-driven allocation, a decompression bomb, an endless loop, a native crash) then costs
one short-lived child, never the API process or a worker. The child sends its JSON-able result back through a
pipe; any exception it raises comes back as :class:`SandboxError` with a stable ``code``, except
:class:`Rejected`, which carries the parser's own verdict (an HTTP status, a code and a message) unchanged.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import select
import signal
import time
from collections.abc import Callable
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")


class Rejected(ValueError):  # noqa: N818 - a verdict, not a failure of the sandbox
    """Raised by a sandboxed function to refuse its input with a documented code."""

    def __init__(self, code: str, detail: str, status: int = 422) -> None:
        super().__init__(detail)
        self.code, self.detail, self.status = code, detail, status


class SandboxError(RuntimeError):
    """The child exceeded a limit or died: ``code`` is ``parse_limit_exceeded`` or ``parse_failed``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def _child(fn: Callable[..., Any], args: tuple[Any, ...], write_fd: int, memory_bytes: int, cpu_seconds: int) -> None:
    """In the child: cap memory above what the fork inherited, cap CPU, run, report, exit without cleanup."""
    status = 0
    try:
        faulthandler.disable()  # a crash here is reported by the parent, not dumped by the child
        with open("/proc/self/statm") as f:
            inherited = int(f.read().split()[0]) * PAGE
        resource.setrlimit(resource.RLIMIT_AS, (inherited + memory_bytes, inherited + memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        try:
            out: dict[str, Any] = {"ok": fn(*args)}
        except Rejected as exc:
            out = {"rejected": [exc.status, exc.code, exc.detail]}
        except MemoryError:
            out = {"limit": "the parser needed more memory than allowed"}
        except RecursionError:
            out = {"limit": "the input nests too deeply"}
        except Exception as exc:  # noqa: BLE001 - any other parser exception is reported, never raised here
            out = {"failed": type(exc).__name__}
        data = json.dumps(out).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(write_fd, view):]
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        status = 1
    finally:
        os._exit(status)


def run_limited(fn: Callable[..., Any], *args: Any, memory_bytes: int, cpu_seconds: int, timeout: float) -> Any:
    """``fn(*args)`` in a forked child; its return value must be JSON-serialisable.

    Raises :class:`Rejected` when ``fn`` rejected its input, :class:`SandboxError` when the child ran out of
    memory, CPU or time (``parse_limit_exceeded``) or failed otherwise (``parse_failed``).
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        _child(fn, args, write_fd, memory_bytes, cpu_seconds)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            block = os.read(read_fd, 65536)
            if not block:
                break
            chunks.append(block)
    finally:
        os.close(read_fd)
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, wait_status = os.waitpid(pid, 0)
    if timed_out:
        raise SandboxError("parse_limit_exceeded", f"parsing took longer than {timeout:g} s")
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            raise SandboxError("parse_limit_exceeded", f"parsing used more than {cpu_seconds} s of CPU")
        raise SandboxError("parse_failed", f"the parser crashed ({signal.Signals(sig).name})")
    try:
        out = json.loads(b"".join(chunks))
    except ValueError:
        raise SandboxError("parse_failed", "the parser ended without an answer") from None
    if "ok" in out:
        return out["ok"]
    if "rejected" in out:
        status, code, detail = out["rejected"]
        raise Rejected(code, detail, status)
    if "limit" in out:
        raise SandboxError("parse_limit_exceeded", out["limit"])
    raise SandboxError("parse_failed", f"the parser failed ({out.get('failed')})")
