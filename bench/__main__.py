"""`python -m bench NAME [ARGS...]`: run one benchmark module's `main()` with ARGS; no NAME lists them.

NAME is a module of this package, with or without its `bench_` prefix, or the start of its name
before `_` (`card` -> bench_card, `fuzz` -> fuzz_cards). `all` runs every `bench_*` module in turn
with default arguments.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(_HERE)]) if not m.name.startswith("_"))


def resolve(name: str) -> str | None:
    names = modules()
    for candidate in (name, f"bench_{name}"):
        if candidate in names:
            return candidate
    starts = [m for m in names if m.startswith(f"{name}_")]
    return starts[0] if len(starts) == 1 else None


def _summary(mod: str) -> str:
    try:
        spec = importlib.util.find_spec(f"bench.{mod}")
        src = Path(spec.origin).read_text() if spec and spec.origin else ""
    except (ImportError, OSError):
        return ""
    doc = src.split('"""')[1].strip().splitlines()[0] if src.lstrip().startswith('"""') else ""
    return doc


def run(mod: str, args: list[str]) -> int:
    module = importlib.import_module(f"bench.{mod}")
    main = getattr(module, "main", None)
    if main is None:
        print(f"bench.{mod} has no main()", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [f"python -m bench {mod}", *args]
    try:
        params = inspect.signature(main).parameters
        rv = main(args) if params else main()
    finally:
        sys.argv = saved
    return int(rv) if isinstance(rv, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__.strip().splitlines()[0])
        for m in modules():
            print(f"  {m:<20} {_summary(m)}")
        return 0
    if argv[0] == "all":
        rc = 0
        for m in modules():
            if m.startswith("bench_"):
                print(f"== {m}", flush=True)
                rc |= run(m, [])
        return rc
    mod = resolve(argv[0])
    if mod is None:
        print(f"no benchmark named {argv[0]!r}; have: {', '.join(modules())}", file=sys.stderr)
        return 2
    return run(mod, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
