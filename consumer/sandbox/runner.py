"""The process inside a local sandbox: runs one execution's node code, one request at a time.

Started as `python -I runner.py LIMITS_JSON` by consumer/sandbox/local.py and speaks a private
protocol on the file descriptors it inherited as stdin/stdout: 4-byte big-endian length, then a JSON
object. Before any node code runs it applies its resource limits and points fds 0, 1 and 2 at
/dev/null, so node code can neither read the protocol nor corrupt it by printing (print() output is
captured per node through sys.stdout/sys.stderr instead).

Standard library only: it must start fast and must not import the project.
"""

import base64
import io
import json
import linecache
import os
import re
import resource
import struct
import sys
import time
import traceback

_HEADER = struct.Struct(">I")


class OutputLimitExceeded(Exception):
    pass


class CappedWriter(io.TextIOBase):
    """sys.stdout/sys.stderr for node code: keeps what is printed, up to a cap."""

    def __init__(self, name: str, cap: int) -> None:
        self.name = name
        self.cap = cap
        self.parts: list[str] = []
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.size += len(text)
        if self.size > self.cap:
            raise OutputLimitExceeded(f"{self.name} exceeded the output limit of {self.cap} bytes")
        self.parts.append(text)
        return len(text)

    def value(self) -> str:
        return "".join(self.parts)


def _apply_limits(limits: dict) -> None:
    def cap(which: int, value: int | None) -> None:
        if value is not None:
            resource.setrlimit(which, (value, value))

    cap(resource.RLIMIT_CORE, 0)
    if limits.get("memory_bytes"):
        cap(resource.RLIMIT_AS, int(limits["memory_bytes"]))
    if limits.get("cpu_seconds"):
        cap(resource.RLIMIT_CPU, int(limits["cpu_seconds"]))
    if limits.get("open_files"):
        cap(resource.RLIMIT_NOFILE, int(limits["open_files"]))
    if limits.get("processes"):
        cap(resource.RLIMIT_NPROC, int(limits["processes"]))
    if limits.get("file_bytes"):
        cap(resource.RLIMIT_FSIZE, int(limits["file_bytes"]))


def _first_unserialisable(value: object, path: str) -> str | None:
    try:
        json.dumps(value, allow_nan=False)
        return None
    except (TypeError, ValueError):
        pass
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a key {key!r} that is not a string"
            found = _first_unserialisable(item, f"{path}[{key!r}]")
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _first_unserialisable(item, f"{path}[{i}]")
            if found:
                return found
    return f"{path} is not JSON-serialisable ({type(value).__name__})"


# A surrogate escape in JSON text that is not half of a pair: a high one not followed by a low one, or a
# low one not after a high one. (An escaped backslash before "ud800" matches too: the walk then finds
# nothing, a false alarm that only costs the walk.)
_LONE_SURROGATE = re.compile(
    r"\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f][0-9a-f]{2})|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f][0-9a-f]{2}"
)


def _first_lone_surrogate(value: object, path: str) -> str | None:
    """Where `value` holds a lone surrogate (text decoded with surrogateescape, say), which JSON text cannot
    carry: json.dumps escapes one all the same, and the worker's parser refuses the reply."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{path} holds a lone surrogate (U+{ord(value[exc.start]):04X}), which JSON cannot carry"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _first_lone_surrogate(key, f"{path} has a key that") or _first_lone_surrogate(
                item, f"{path}[{key!r}]"
            )
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _first_lone_surrogate(item, f"{path}[{i}]")
            if found:
                return found
    return None


def _node_traceback(exc: BaseException) -> str:
    # Only the frames of node code: the runner's own frames tell the user nothing.
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<node ")]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)


def _compile(code: str, filename: str, mode: str):
    # Registered with linecache so tracebacks show the node's source lines.
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    return compile(code, filename, mode)


class Runner:
    def __init__(self, proto_in: io.BufferedReader, proto_out: io.BufferedWriter, limits: dict) -> None:
        self.proto_in = proto_in
        self.proto_out = proto_out
        self.output_cap = int(limits.get("output_bytes") or 1 << 20)
        self.context_cap = int(limits.get("context_bytes") or 16 << 20)
        # json and base64 preloaded: NOVA's executor imported them above every node's code, and NOVA's
        # workflows use them without importing.
        self.globals: dict = {"__name__": "__nova_node__", "__builtins__": __builtins__, "json": json, "base64": base64}
        self.sources: dict[str, list[str]] = {}

    def _read_exact(self, size: int) -> bytes | None:
        chunks = []
        while size:
            chunk = self.proto_in.read(size)
            if not chunk:
                return None
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def read(self) -> dict | None:
        header = self._read_exact(_HEADER.size)
        if header is None:
            return None
        payload = self._read_exact(_HEADER.unpack(header)[0])
        return None if payload is None else json.loads(payload)

    def send(self, message: dict, context_json: str | None = None) -> None:
        text = json.dumps(message, separators=(",", ":"))
        if context_json is not None:
            # The context is already encoded (to measure and check it): splice it in, not again.
            text = f'{text[:-1]},"context":{context_json}}}'
        payload = text.encode()
        self.proto_out.write(_HEADER.pack(len(payload)) + payload)
        self.proto_out.flush()

    def serve(self) -> None:
        self.send({"ready": True, "pid": os.getpid()})
        while True:
            request = self.read()
            if request is None:
                return
            op = request.get("op")
            if op == "init":
                os.environ.update(request.get("env") or {})
                self.send({"ok": True})
            elif op in ("action", "evaluate"):
                response = self.run_node(request)
                self.send(response, response.pop("context_json", None))
            else:
                self.send({"ok": False, "error": _error("ProtocolError", f"unknown op {op!r}", "", "protocol")})

    def run_node(self, request: dict) -> dict:
        node_id = request["node_id"]
        out, err = CappedWriter("stdout", self.output_cap), CappedWriter("stderr", self.output_cap)
        # Put back whatever was there, not sys.__stdout__: the tests run this class in their own process.
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        started = time.perf_counter()
        try:
            response = self._execute(request, node_id)
        except OutputLimitExceeded as exc:
            response = {
                "ok": False,
                "error": _error("OutputLimitExceeded", f"node '{node_id}': {exc}", "", "limit:output"),
            }
        except MemoryError:
            response = {
                "ok": False,
                "error": _error("MemoryError", f"node '{node_id}' exceeded the memory limit", "", "limit:memory"),
            }
        except BaseException as exc:
            # Node code may raise anything, SystemExit included: it ends the node, not the runner.
            error = _error(type(exc).__name__, str(exc), _node_traceback(exc), "exception")
            # Its classes, for the worker's retry policies (a policy may name a base class).
            error["bases"] = _class_names(type(exc))
            response = {"ok": False, "error": error}
        finally:
            sys.stdout, sys.stderr = saved
        response["stdout"] = out.value()
        response["stderr"] = err.value()
        response["duration_ms"] = (time.perf_counter() - started) * 1000
        return response

    def _execute(self, request: dict, node_id: str) -> dict:
        filename = f"<node {node_id}>"
        self.globals["context"] = request.get("context") or {}
        if request["op"] == "evaluate":
            value = eval(_compile(request["code"], filename, "eval"), self.globals)
            # A bool or a string picks the decision's branch; None lets the worker read the key the
            # expression may have set (NOVA's way); anything else counts by its truth.
            if value is not None and not isinstance(value, bool | str):
                value = bool(value)
            reply = self._context_reply(node_id)
            if reply["ok"]:
                reply["value"] = value
            return reply
        exec(_compile(request["code"], filename, "exec"), self.globals)
        return self._context_reply(node_id)

    def _context_reply(self, node_id: str) -> dict:
        """The context node code left, encoded once, or the error that stops it from leaving."""
        context = self.globals.get("context")
        if not isinstance(context, dict):
            return {
                "ok": False,
                "error": _error(
                    "TypeError",
                    f"node '{node_id}' left context as {type(context).__name__}, not a dict",
                    "",
                    "serialization",
                ),
            }
        try:
            encoded = json.dumps(context, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError):
            problem = _first_unserialisable(context, "context") or "context is not JSON-serialisable"
            return {"ok": False, "error": _error("TypeError", problem, "", "serialization")}
        size = len(encoded)
        if size > self.context_cap:
            return {
                "ok": False,
                "error": _error(
                    "ContextTooLarge",
                    f"node '{node_id}' left a context of {size} bytes (limit {self.context_cap})",
                    "",
                    "limit:context",
                ),
            }
        # Every surrogate is escaped (the text is ASCII): the context is walked for a lone one only when the
        # text shows one, not for pairs (characters past U+FFFF, such as emoji), which are fine.
        # The substring test first: the pattern, tried at every position, cost 19 us on a 0.6 KB context.
        lone = "\\ud" in encoded and _LONE_SURROGATE.search(encoded)
        problem = _first_lone_surrogate(context, "context") if lone else None
        if problem:
            return {"ok": False, "error": _error("UnicodeEncodeError", problem, "", "serialization")}
        return {"ok": True, "context_json": encoded}


def _error(type_: str, message: str, tb: str, reason: str) -> dict:
    return {"type": type_, "message": message, "traceback": tb, "reason": reason}


def _class_names(cls: type) -> list:
    """An exception class and its bases as Python names them: `imaplib.IMAP4.abort`, builtins bare
    (`ConnectionError`); `object` left out, at most 32."""
    names = []
    for klass in cls.__mro__[:-1][:32]:
        module = getattr(klass, "__module__", None) or "builtins"
        qualname = getattr(klass, "__qualname__", None) or klass.__name__
        names.append(qualname if module == "builtins" else f"{module}.{qualname}")
    return names


def run_once(request_path: str, limits: dict) -> None:
    """One node, one process (remote sandboxes): the request is a file, the response one stdout line."""
    with open(request_path, "rb") as f:
        request = json.loads(f.read())
    os.unlink(request_path)
    proto_out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _apply_limits(limits)
    runner = Runner(open(os.devnull, "rb"), open(os.devnull, "wb"), limits)
    response = runner.run_node(request)
    context_json = response.pop("context_json", None)
    text = json.dumps(response, separators=(",", ":"))
    if context_json is not None:
        text = f'{text[:-1]},"context":{context_json}}}'
    proto_out.write(text + "\n")
    proto_out.flush()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--once":
        run_once(sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
        return
    serve_stdio(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})


def serve_stdio(limits: dict) -> None:
    """Serve the protocol on stdin/stdout: a process of its own, or a fork of the fork server (zygote.py)."""
    # Keep the protocol on private descriptors, then close the standard ones to node code.
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _apply_limits(limits)
    _forget_main_file()
    Runner(proto_in, proto_out, limits).serve()


def _forget_main_file() -> None:
    """Children that node code starts with multiprocessing's spawn (or forkserver) method import the parent's
    __main__ again from its file: this program's (the fork server's or the runner's), which node code does not
    need and the sandbox may not even see (an install under /tmp, hidden by the sandbox's private /tmp: the
    children died at start, and the pool waited for them until the node's time limit). Without a file or a
    spec, the children import nothing of it."""
    main_module = sys.modules.get("__main__")
    if main_module is not None:
        main_module.__dict__.pop("__file__", None)
        main_module.__spec__ = None


if __name__ == "__main__":
    main()
