"""What a check found, and how the findings are printed (text for people, JSON for scripts)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
# SKIP: a check that did not apply or was not asked for (says why); it does not change the exit code.
EXIT_CODES = {OK: 0, SKIP: 0, WARN: 1, FAIL: 2}


@dataclass
class Finding:
    check: str  # "group.name", e.g. "tiers.disk"
    status: str  # OK / WARN / FAIL / SKIP
    fact: str  # what the check saw
    fix: str = ""  # what to do about it (empty when nothing is to be done)


def exit_code(findings: list[Finding]) -> int:
    return max((EXIT_CODES[f.status] for f in findings), default=0)


def summary(findings: list[Finding]) -> str:
    counts = {s: sum(f.status == s for f in findings) for s in (OK, WARN, FAIL, SKIP)}
    verdict = {0: "healthy", 1: "works, with warnings", 2: "broken"}[exit_code(findings)]
    return f"{verdict}: {counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failures, {counts[SKIP]} skipped"


def render_text(findings: list[Finding], seconds: float) -> str:
    lines = []
    group = None
    width = max((len(f.check) for f in findings), default=0)
    for f in findings:
        head = f.check.split(".", 1)[0]
        if head != group:
            group = head
            lines.append(f"[{group}]")
        lines.append(f"  {f.status:<4}  {f.check:<{width}}  {f.fact}")
        if f.fix and f.status in (WARN, FAIL):
            lines.append(f"        {'':<{width}}  fix: {f.fix}")
    lines.append("")
    lines.append(f"lmcache doctor: {summary(findings)} ({seconds:.1f} s); exit code {exit_code(findings)}")
    return "\n".join(lines)


def render_json(findings: list[Finding], seconds: float) -> str:
    return json.dumps({
        "exit_code": exit_code(findings),
        "summary": summary(findings),
        "seconds": round(seconds, 2),
        "checks": [asdict(f) for f in findings],
    })
