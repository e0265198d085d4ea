"""The CQL tokenizer behind the statement classifier (:mod:`.classifier`).

Tokenizes properly -- comments, quoted identifiers, ``''``-escaped and ``$$``
strings, named and positional bind markers, bracket depth -- so the classifier
can read the few clauses it cares about without a full CQL grammar.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "CLOSING",
    "TOK_BIND",
    "TOK_BLOB",
    "TOK_IDENT",
    "TOK_NUMBER",
    "TOK_OP",
    "TOK_QIDENT",
    "TOK_STRING",
    "TOK_UUID",
    "TOK_WORD",
    "ParseError",
    "Token",
    "tokenize",
]

# token kinds
TOK_IDENT, TOK_QIDENT, TOK_STRING, TOK_NUMBER, TOK_UUID, TOK_BLOB, TOK_BIND, TOK_OP, TOK_WORD = range(9)

_TOKEN_RE = re.compile(
    r"""
     (?P<ws>\s+)
    |(?P<comment>(?:--|//)[^\n]*|/\*.*?\*/)
    |(?P<badcomment>/\*)
    |(?P<string>'(?:[^']|'')*')
    |(?P<dollar>\$\$.*?\$\$)
    |(?P<qident>"(?:[^"]|"")*")
    |(?P<uuid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![\w-]))
    |(?P<blob>0[xX][0-9a-fA-F]*(?!\w))
    |(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?!\w))
    |(?P<word>\d\w*)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<named>:(?:[A-Za-z_][A-Za-z0-9_]*|"(?:[^"]|"")*"))
    |(?P<qmark>\?)
    |(?P<op><=|>=|!=|\+=|-=|[-+*/%=<>(),;.\[\]{}:&|])
    """,
    re.VERBOSE | re.DOTALL,
)

_OPEN: Final = {"(": ")", "[": "]", "{": "}"}
CLOSING: Final = {")", "]", "}"}
_TERM_END_WORDS: Final = frozenset({"true", "false", "null", "nan", "infinity"})


class ParseError(Exception):
    pass


class Token:
    __slots__ = ("bind", "depth", "end", "kind", "start", "val")

    def __init__(self, kind: int, val: str, start: int, end: int, depth: int, bind: int = -1) -> None:
        self.kind = kind
        self.val = val
        self.start = start
        self.end = end
        self.depth = depth
        self.bind = bind

    def __repr__(self) -> str:  # debugging aid only
        return f"Token({self.kind}, {self.val!r}, d={self.depth})"


def _ends_term(t: Token | None) -> bool:
    if t is None:
        return False
    if t.kind in (TOK_STRING, TOK_NUMBER, TOK_UUID, TOK_BLOB, TOK_BIND, TOK_WORD):
        return True
    if t.kind == TOK_OP:
        return t.val in CLOSING
    return t.kind == TOK_IDENT and t.val in _TERM_END_WORDS


def tokenize(src: str) -> list[Token]:
    toks: list[Token] = []
    stack: list[str] = []
    pos = 0
    nbind = 0
    n = len(src)
    while pos < n:
        m = _TOKEN_RE.match(src, pos)
        if m is None:
            raise ParseError(f"unexpected character {src[pos]!r} at offset {pos}")
        kind = m.lastgroup
        start, end = m.start(), m.end()
        pos = end
        text = m.group()
        depth = len(stack)
        if kind == "ws" or kind == "comment":
            continue
        if kind == "badcomment":
            raise ParseError("unterminated /* comment")
        if kind == "ident":
            toks.append(Token(TOK_IDENT, text.lower(), start, end, depth))
        elif kind == "qident":
            toks.append(Token(TOK_QIDENT, text[1:-1].replace('""', '"'), start, end, depth))
        elif kind == "string":
            toks.append(Token(TOK_STRING, text[1:-1].replace("''", "'"), start, end, depth))
        elif kind == "dollar":
            toks.append(Token(TOK_STRING, text[2:-2], start, end, depth))
        elif kind == "number":
            toks.append(Token(TOK_NUMBER, text, start, end, depth))
        elif kind == "word":  # duration literals such as 1h30m: opaque, but a term
            toks.append(Token(TOK_WORD, text, start, end, depth))
        elif kind == "uuid":
            toks.append(Token(TOK_UUID, text, start, end, depth))
        elif kind == "blob":
            toks.append(Token(TOK_BLOB, text, start, end, depth))
        elif kind == "qmark":
            toks.append(Token(TOK_BIND, "", start, end, depth, nbind))
            nbind += 1
        elif kind == "named":
            if _ends_term(toks[-1] if toks else None):
                # `{'k':true}`: the colon is a map separator, not a bind marker
                toks.append(Token(TOK_OP, ":", start, start + 1, depth))
                pos = start + 1
                continue
            name = text[1:]
            name = name[1:-1].replace('""', '"') if name.startswith('"') else name.lower()
            toks.append(Token(TOK_BIND, name, start, end, depth, nbind))
            nbind += 1
        else:  # op
            if text in _OPEN:
                stack.append(_OPEN[text])
            elif text in CLOSING:
                if not stack or stack.pop() != text:
                    raise ParseError(f"unbalanced {text!r} at offset {start}")
                depth = len(stack)
            toks.append(Token(TOK_OP, text, start, end, depth))
    if stack:
        raise ParseError(f"unclosed {stack[-1]!r}")
    return toks
