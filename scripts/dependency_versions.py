#!/usr/bin/env python3
"""Print the installed version of each runtime dependency of llm-proxy, in the interpreter that
runs this (so a test run says which versions it tested)."""

import re
from importlib.metadata import PackageNotFoundError, requires, version


def _installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    names = sorted({m.group(0) for r in requires("llm-proxy") or () if "extra ==" not in r
                    if (m := re.match(r"[A-Za-z0-9_.-]+", r))}, key=str.lower)
    print("  " + ", ".join(f"{name} {_installed(name)}" for name in names))


if __name__ == "__main__":
    main()
