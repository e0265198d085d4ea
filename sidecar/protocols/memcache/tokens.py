"""Tokens of a memcached command line, sans I/O: numbers within memcached's ranges, and meta
flags (proto_text.c's rules), used by `codec.RequestParser`.
"""

from __future__ import annotations

import binascii
from typing import Final

U32_MAX: Final = 0xFFFFFFFF
U64_MAX: Final = 0xFFFFFFFFFFFFFFFF
I32_MIN: Final = -(2**31)
I32_MAX: Final = 2**31 - 1

BAD_FORMAT: Final = "bad command line format"

# --------------------------------------------------------------------------- numbers


def parse_uint(token: bytes, limit: int) -> int | None:
    """Unsigned decimal up to ``limit`` (memcached's safe_strtoul/strtoull), else None.

    isdigit() first so int() never sees signs, spaces or underscores."""
    if not token.isdigit():
        return None
    if len(token) > 20:
        token = token.lstrip(b"0") or b"0"
        if len(token) > 20:
            return None
    value = int(token)
    return value if value <= limit else None


def parse_int32(token: bytes) -> int | None:
    """Signed 32-bit decimal (memcached's safe_strtol), else None."""
    if token[:1] == b"-":
        magnitude = parse_uint(token[1:], -I32_MIN)
        return None if magnitude is None else -magnitude
    return parse_uint(token, I32_MAX)


# --------------------------------------------------------------------------- meta flags

# How the parser validates each meta flag's token (memcached's _meta_flag_preparse).
# Every meta command accepts every known flag; unknown ones are an error.
_PLAIN, _BASE64, _TTL, _CLIENT_FLAGS, _CAS, _MODE, _INITIAL, _DELTA = range(8)
_FLAG_KINDS: Final[dict[int, int]] = {
    **{ord(c): _PLAIN for c in "lOPLkstcfvhuqI"},
    ord("b"): _BASE64,
    ord("N"): _TTL,
    ord("T"): _TTL,
    ord("R"): _TTL,
    ord("F"): _CLIENT_FLAGS,
    ord("C"): _CAS,
    ord("M"): _MODE,
    ord("J"): _INITIAL,
    ord("D"): _DELTA,
}
_BAD_TOKEN: Final = "bad token in command line format"
_CHR: Final = tuple(chr(i) for i in range(256))


def _flag_token_error(kind: int, token: bytes) -> str | None:
    """Validate a numeric/mode token; the message is memcached's for that flag."""
    if kind == _TTL:
        return None if parse_int32(token) is not None else _BAD_TOKEN
    if kind == _CLIENT_FLAGS:
        return None if parse_uint(token, U32_MAX) is not None else BAD_FORMAT
    if kind == _CAS:
        return None if parse_uint(token, U64_MAX) is not None else _BAD_TOKEN
    if kind == _MODE:
        return None if len(token) == 1 else "incorrect length for M token"
    if kind == _INITIAL:
        return None if parse_uint(token, U64_MAX) is not None else "invalid numeric initial value"
    return None if parse_uint(token, U64_MAX) is not None else "invalid numeric delta value"


def _decode_key(key: bytes) -> bytes | None:
    try:
        decoded = binascii.a2b_base64(key, strict_mode=True)
    except binascii.Error:
        return None
    return decoded or None


def parse_meta_flags(tokens: list[bytes], key: bytes) -> tuple[dict[str, bytes], bytes, str | None]:
    """Parse meta flag tokens into {flag: token}; returns (flags, key, error message).

    The key comes back base64-decoded when ``b`` is present. Like memcached, a
    duplicate or unknown flag stops at once, other errors are reported after the scan
    (last one wins)."""
    flags: dict[str, bytes] = {}
    error: str | None = None
    for token in tokens:
        code = token[0]
        flag = _CHR[code]
        if code >= 127 or flag in flags:
            return flags, key, "duplicate flag"
        kind = _FLAG_KINDS.get(code)
        if kind is None:
            return flags, key, "invalid flag"
        rest = token[1:]
        flags[flag] = rest
        if kind == _PLAIN:
            continue
        if kind == _BASE64:
            decoded = _decode_key(key)
            if decoded is None:
                error = "error decoding key"
            else:
                key = decoded
            continue
        problem = _flag_token_error(kind, rest)
        if problem is not None:
            # A bad F sets no message of its own in memcached: an earlier one stands.
            error = (error or problem) if kind == _CLIENT_FLAGS else problem
    return flags, key, error


