"""What our commands print: tables, progress phases, the last-line JSON, and vLLM's own
output sent to a log file (used by the demo, the benchmarks and the doctor alike)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence


def cache_dir() -> Path:
    """~/.cache/lmcache (or under XDG_CACHE_HOME): models, logs and phase times kept between runs."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmcache"


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]], say: Callable[[str], None] = print) -> None:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    say("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    say("  ".join("-" * w for w in widths))
    for r in rows:
        say("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def emit_result(result: dict) -> None:
    """The LAST line a benchmark prints: one JSON object that scripts and CI read."""
    print(json.dumps(result, sort_keys=False), flush=True)


# --- reading at a glance: vLLM's output to a log file, our progress to the console --------

class Console:
    """Where our own lines go: the terminal (or pipe) this command was started on, even while
    file descriptors 1 and 2 point at vLLM's log (see quiet_vllm)."""

    stream = sys.stdout

    @classmethod
    def say(cls, msg: str = "", end: str = "\n") -> None:
        cls.stream.write(msg + end)
        cls.stream.flush()

    @classmethod
    def is_tty(cls) -> bool:
        return cls.stream.isatty()


def log_path(command: str) -> Path:
    """A new log file for `command` under ~/.cache/lmcache/logs/."""
    base = cache_dir() / "logs"
    base.mkdir(parents=True, exist_ok=True)
    return base / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextlib.contextmanager
def quiet_vllm(command: str, verbose: bool, tail_lines: int = 40):
    """Everything written to stdout/stderr inside (vLLM's log lines, its worker processes',
    C++ prints, warnings) goes to a log file; Console.say still reaches the terminal. If the
    block fails, the log's last lines are shown. With verbose, nothing is redirected."""
    if verbose:
        yield None
        return
    path = log_path(command)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_out), "w", buffering=1)
    previous = Console.stream
    Console.stream = console
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    Console.say(f"(vLLM's own output goes to {path}; --verbose shows it here)")
    failed = True
    try:
        yield path
        failed = False
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        Console.stream = previous
        console.close()
        if failed:
            lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
            Console.say(f"--- last {len(lines)} lines of {path} ---")
            Console.say("\n".join(lines))


def _phase_times_file() -> Path:
    return cache_dir() / "phase_seconds.json"


def _past_seconds(key: str) -> float | None:
    try:
        return float(json.loads(_phase_times_file().read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember_seconds(key: str, seconds: float) -> None:
    path = _phase_times_file()
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
        known[key] = round(seconds, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known))
    except (OSError, ValueError):
        pass  # an ETA is a nicety


def eta_text(elapsed: float, done: float, total: float) -> str:
    """`12 s elapsed, about 30 s left` (no estimate before anything is done)."""
    text = f"{elapsed:.0f} s elapsed"
    if 0 < done < total:
        text += f", about {elapsed / done * (total - done):.0f} s left"
    return text


class Phase:
    """`[i/n] what ...`, then while it runs the elapsed time and an ETA (from the last run of
    the same phase, `eta_key`), on one rewritten line on a terminal or a line every
    `every` seconds elsewhere; at the end `done (x s)`."""

    def __init__(self, index: int, total: int, what: str, eta_key: str | None = None, every: float = 30.0):
        self.label = f"[{index}/{total}] {what}"
        self.eta_key, self.every = eta_key, every
        self._stop = threading.Event()

    def _tick(self) -> None:
        expected = _past_seconds(self.eta_key) if self.eta_key else None
        tty = Console.is_tty()
        while not self._stop.wait(1.0 if tty else self.every):
            elapsed = time.perf_counter() - self.start
            text = eta_text(elapsed, elapsed, expected) if expected and elapsed < expected else f"{elapsed:.0f} s elapsed"
            Console.say(f"\r      {text}   " if tty else f"      ... {text}", end="" if tty else "\n")

    def __enter__(self):
        self.start = time.perf_counter()
        expected = _past_seconds(self.eta_key) if self.eta_key else None
        Console.say(f"{self.label} ..." + (f" (about {expected:.0f} s last time)" if expected is not None else ""))
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stop.set()
        self._ticker.join()
        seconds = time.perf_counter() - self.start
        if Console.is_tty():
            Console.say("\r" + " " * 40 + "\r", end="")
        if exc_type is None:
            Console.say(f"      done ({seconds:.1f} s)")
            if self.eta_key:
                _remember_seconds(self.eta_key, seconds)
