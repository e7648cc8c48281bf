"""Each benchmark owns one marked section of RESULTS.md and replaces only that section,
so reruns update their own figures and leave the others alone."""

from __future__ import annotations

import os


def markers(script: str) -> tuple[str, str]:
    return f"<!-- {script}:begin -->", f"<!-- {script}:end -->"


def write_section(path: str, script: str, section: str) -> None:
    begin, end = markers(script)
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):].lstrip("\n")
    else:
        text = text.rstrip() + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)
