"""PEFT's module patterns, matched in linear time (no regex is ever compiled from a config).

PEFT reads `rank_pattern` / `alpha_pattern` keys and a string `target_modules` as Python
regexes. A key like ``(a|a)+$`` makes Python's backtracking engine run for hours while it
holds the GIL, so a hostile adapter folder or card header could stall a node. Here a pattern
is parsed into a small program and run as a Thompson NFA: time is O(len(pattern) *
len(module path)) whatever the pattern.

The subset is what PEFT configs use in practice: literal characters, ``.``, escapes (``\\.``,
``\\d``, ``\\w``, ``\\s`` and their negations, escaped punctuation), character classes
(``[a-z_]``, ``[^.]``), groups (``(...)``, ``(?:...)``, ``(?P<name>...)``), alternation,
``*``, ``+``, ``?``, ``{m}``, ``{m,}``, ``{m,n}`` (also lazy: laziness never changes whether
a path matches) and the anchors ``^`` and ``$``. Anything else (backreferences,
lookaround, inline flags, possessive repeats, ``\\b``, ...) is refused by name with
`PatternError`, as is a pattern longer than `MAX_PATTERN_LEN` or one whose program would
exceed `MAX_PROGRAM`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MAX_PATTERN_LEN = 512
MAX_PROGRAM = 4_000
_MAX_DEPTH = 50
_MAX_REPEAT = 100
_MAX_CACHED_STEPS = 4096

Pred = Callable[[str], bool]


class PatternError(ValueError):
    """A pattern is malformed (``invalid``) or uses a feature outside the supported subset."""

    def __init__(self, pattern: str, why: str, *, invalid: bool = False) -> None:
        self.pattern, self.why, self.invalid = pattern, why, invalid
        super().__init__(why)


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


_CLASS_ESCAPES: dict[str, Pred] = {
    "d": str.isdecimal,
    "D": lambda c: not c.isdecimal(),
    "w": _is_word,
    "W": lambda c: not _is_word(c),
    "s": str.isspace,
    "S": lambda c: not c.isspace(),
}
_LITERAL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}


# AST nodes: ("pred", fn) | ("cat", [n...]) | ("alt", [n...]) | ("rep", n, lo, hi|None)
#            | ("bol",) | ("eol",)
Node = tuple


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p, self.i = pattern, 0
        self.names: set[str] = set()

    def fail(self, why: str, *, invalid: bool = False) -> PatternError:
        return PatternError(self.p, why, invalid=invalid)

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self) -> Node:
        node = self.alt(0)
        if self.i != len(self.p):  # only an unbalanced ')' stops the top level early
            raise self.fail(f"unbalanced parenthesis at position {self.i}", invalid=True)
        return node

    def alt(self, depth: int) -> Node:
        if depth > _MAX_DEPTH:
            raise self.fail(f"groups nested deeper than {_MAX_DEPTH}")
        branches = [self.cat(depth)]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat(depth))
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self, depth: int) -> Node:
        items: list[Node] = []
        while (c := self.peek()) is not None and c not in "|)":
            atom = self.atom(depth)
            items.append(self.quantified(atom))
        return ("cat", items)

    def quantified(self, atom: Node) -> Node:
        c = self.peek()
        if c is None:
            return atom
        if c in "*+?":
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and (bounds := self.bounds()) is not None:
            lo, hi = bounds
        else:
            return atom
        if atom[0] in ("bol", "eol"):
            raise self.fail("a repeat of an anchor (^ or $)")
        nxt = self.peek()
        if nxt == "?":
            self.i += 1  # lazy: same set of matches
        elif nxt == "+":
            raise self.fail("possessive repeats (*+, ++, ?+)")
        after = self.peek()
        if (after is not None and after in "*+?") or (after == "{" and self.bounds(dry=True)):
            raise self.fail(f"multiple repeat at position {self.i}", invalid=True)
        return ("rep", atom, lo, hi)

    def bounds(self, *, dry: bool = False) -> tuple[int, int | None] | None:
        """`{m}`, `{m,}`, `{m,n}` at self.i (or None: Python reads such a `{` as a literal)."""
        j = self.p.find("}", self.i)
        if j < 0:
            return None
        body = self.p[self.i + 1 : j]
        lo_s, comma, hi_s = body.partition(",")
        if not (lo_s.isdigit() or (comma and lo_s == "")) or (hi_s and not hi_s.isdigit()):
            return None
        if not lo_s.isascii() or not hi_s.isascii():
            return None
        lo = int(lo_s) if lo_s else 0
        hi = (int(hi_s) if hi_s else None) if comma else lo
        if hi is not None and hi < lo:
            raise self.fail("min repeat greater than max repeat", invalid=True)
        if max(lo, hi or 0) > _MAX_REPEAT:
            raise self.fail(f"a counted repeat above {_MAX_REPEAT}")
        if not dry:
            self.i = j + 1
        return lo, hi

    def atom(self, depth: int) -> Node:
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i):
                end = self.p.find(">", self.i)
                name = self.p[self.i + 3 : end] if end > 0 else ""
                if not name.isidentifier() or name in self.names:
                    raise self.fail(f"a bad or repeated group name {name!r}", invalid=True)
                self.names.add(name)
                self.i = end + 1
            elif self.peek() == "?":
                raise self.fail("lookaround, inline flags, comments or conditionals ((?...))")
            inner = self.alt(depth + 1)
            if self.peek() != ")":
                raise self.fail("missing ), unterminated subpattern", invalid=True)
            self.i += 1
            return inner
        if c in "*+?":
            raise self.fail(f"nothing to repeat at position {self.i - 1}", invalid=True)
        if c == "{" and self.bounds(dry=True) is not None:
            raise self.fail(f"nothing to repeat at position {self.i - 1}", invalid=True)
        if c == ".":
            return ("pred", lambda ch: ch != "\n")
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == "[":
            return ("pred", self.klass())
        if c == "\\":
            pred = self.escape(in_class=False)
            return ("pred", pred)
        return ("pred", _eq(c))

    def escape(self, *, in_class: bool) -> Pred:
        if self.i >= len(self.p):
            raise self.fail("bad escape (end of pattern)", invalid=True)
        e = self.p[self.i]
        self.i += 1
        if e in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[e]
        if e in _LITERAL_ESCAPES:
            return _eq(_LITERAL_ESCAPES[e])
        if e.isascii() and e.isalnum():
            if in_class and e == "b":
                return _eq("\b")
            raise self.fail(f"the escape \\{e} (backreferences, \\b, \\A, \\Z, \\x, \\u, ...)")
        return _eq(e)

    def klass(self) -> Pred:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        parts: list[Pred] = []
        first = True
        while True:
            if self.i >= len(self.p):
                raise self.fail("unterminated character set", invalid=True)
            c = self.p[self.i]
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "[" and self.p.startswith(("[:", "[=", "[."), self.i):
                raise self.fail("POSIX classes or set operations inside [...]")
            self.i += 1
            if c == "\\":
                pred = self.escape(in_class=True)
                parts.append(pred)
                continue
            lo = c
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                hi = self.p[self.i]
                self.i += 1
                if hi == "\\":
                    raise self.fail("an escape as a range end inside [...]")
                if hi < lo:
                    raise self.fail(f"bad character range {lo}-{hi}", invalid=True)
                parts.append(_between(lo, hi))
            else:
                parts.append(_eq(lo))
        if negate:
            return lambda ch: not any(p(ch) for p in parts)
        return lambda ch: any(p(ch) for p in parts)


def _eq(c: str) -> Pred:
    return lambda ch: ch == c


def _between(lo: str, hi: str) -> Pred:
    return lambda ch: lo <= ch <= hi


# Program: list of instructions
#   ("char", pred, next) | ("split", a, b) | ("bol", next) | ("eol", next) | ("match",)
@dataclass(frozen=True)
class Pattern:
    """A compiled pattern; `fullmatch(s)` says whether all of `s` matches (linear time)."""

    source: str
    prog: tuple[tuple, ...]
    # (states, char) -> next states, for positions where no anchor can fire (a lazy DFA):
    # module paths share long prefixes, so most steps become one lookup. Bounded in size.
    _steps: dict[tuple[frozenset[int], str], frozenset[int]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def fullmatch(self, s: str) -> bool:
        prog, steps, end = self.prog, self._steps, len(s)
        current = frozenset(_closure(prog, [0], 0, end))
        for pos, ch in enumerate(s):
            if not current:
                return False
            inner = 0 < pos + 1 < end  # the next position is neither the start nor the end
            nxt = steps.get((current, ch)) if inner else None
            if nxt is None:
                step = [ins[2] for pc in current if (ins := prog[pc])[0] == "char" and ins[1](ch)]
                nxt = frozenset(_closure(prog, step, pos + 1, end))
                if inner and len(steps) < _MAX_CACHED_STEPS:
                    steps[(current, ch)] = nxt
            current = nxt
        return any(prog[pc][0] == "match" for pc in current)


def _closure(prog: tuple[tuple, ...], pcs: Iterable[int], pos: int, end: int) -> list[int]:
    """The instructions reachable from `pcs` without reading a character, at `pos` of `end`."""
    seen: set[int] = set()
    out: list[int] = []
    stack = list(pcs)[::-1]
    while stack:
        pc = stack.pop()
        if pc in seen:
            continue
        seen.add(pc)
        ins = prog[pc]
        kind = ins[0]
        if kind == "split":
            stack.append(ins[2])
            stack.append(ins[1])
        elif kind == "jmp":
            stack.append(ins[1])
        elif kind == "bol":
            if pos == 0:
                stack.append(ins[1])
        elif kind == "eol":
            if pos == end:
                stack.append(ins[1])
        else:
            out.append(pc)
    return out


class _Compiler:
    def __init__(self, source: str) -> None:
        self.source = source
        self.prog: list[list] = []

    def emit(self, *ins: object) -> int:
        if len(self.prog) >= MAX_PROGRAM:
            raise PatternError(self.source, f"a pattern whose program exceeds {MAX_PROGRAM} steps")
        self.prog.append(list(ins))
        return len(self.prog) - 1

    def node(self, n: Node) -> None:
        """Append code for `n`; it falls through to whatever is emitted next."""
        kind = n[0]
        if kind == "pred":
            pc = self.emit("char", n[1], None)
            self.prog[pc][2] = pc + 1
        elif kind in ("bol", "eol"):
            pc = self.emit(kind, None)
            self.prog[pc][1] = pc + 1
        elif kind == "cat":
            for item in n[1]:
                self.node(item)
        elif kind == "alt":
            jumps = []
            branches = n[1]
            for b in branches[:-1]:
                split = self.emit("split", None, None)
                self.prog[split][1] = split + 1
                self.node(b)
                jumps.append(self.emit("jmp", None))
                self.prog[split][2] = len(self.prog)
            self.node(branches[-1])
            for j in jumps:
                self.prog[j][1] = len(self.prog)
        elif kind == "rep":
            _, inner, lo, hi = n
            for _ in range(lo):
                self.node(inner)
            if hi is None:  # star: L1: split L2, L3; L2: inner; jmp L1; L3:
                split = self.emit("split", None, None)
                self.prog[split][1] = split + 1
                self.node(inner)
                self.emit("jmp", split)
                self.prog[split][2] = len(self.prog)
            else:
                splits = []
                for _ in range(hi - lo):
                    split = self.emit("split", None, None)
                    self.prog[split][1] = split + 1
                    splits.append(split)
                    self.node(inner)
                for s in splits:
                    self.prog[s][2] = len(self.prog)


def compile_pattern(pattern: str, *, max_len: int = MAX_PATTERN_LEN) -> Pattern:
    """Parse and compile a PEFT pattern (`PatternError` naming what is malformed or unsupported)."""
    if not isinstance(pattern, str):
        raise PatternError(str(pattern), "a pattern must be a string", invalid=True)
    if len(pattern) > max_len:
        raise PatternError(pattern[:40] + "...", f"a pattern longer than {MAX_PATTERN_LEN} characters")
    ast = _Parser(pattern).parse()
    c = _Compiler(pattern)
    c.node(ast)
    c.emit("match")
    return Pattern(pattern, tuple(tuple(i) for i in c.prog))


@functools.lru_cache(maxsize=512)
def peft_key_pattern(key: str) -> Pattern:
    """PEFT's rank_pattern / alpha_pattern rule for `key`: ``re.match(rf"(.*\\.)?({key})$", path)``."""
    inner = compile_pattern(key)  # validates the key alone, so errors name it
    del inner
    wrapped = rf"(?:.*\.)?(?:{key})$"
    return compile_pattern(wrapped, max_len=MAX_PATTERN_LEN + len(wrapped) - len(key))


def is_plain_path(key: str) -> bool:
    """A dotted module path with no pattern syntax besides the dots (matched as a suffix)."""
    return bool(key) and all(c.isalnum() or c in "_-." for c in key) and ".." not in key


def suffix_matches(path: str, key: str) -> bool:
    """`key` (a plain dotted path) names `path` or a dotted suffix of it."""
    return path == key or path.endswith("." + key)


__all__ = [
    "MAX_PATTERN_LEN",
    "MAX_PROGRAM",
    "Pattern",
    "PatternError",
    "compile_pattern",
    "is_plain_path",
    "peft_key_pattern",
    "suffix_matches",
]
