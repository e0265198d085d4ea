"""The CQL codec's byte bounds (issue 18): frame sizes, the pre-auth limit, inflated sizes checked first."""

from __future__ import annotations

import struct

import lz4.block
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.protocols.cql.frames import (
    CLIENT_FRAME_LENGTH,
    FLAG_COMPRESSION,
    HEADER_LENGTH,
    PREAUTH_FRAME_LENGTH,
    Frame,
    FrameDecoder,
    LZ4Compression,
    Opcode,
    SnappyCompression,
    encode_frame,
    snappy_length,
)
from sidecar.protocols.cql.messages import Query, QueryParameters, encode_request
from sidecar.protocols.cql.types import CqlProtocolError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LZ4 = LZ4Compression()
MiB = 1024 * 1024


def header(length: int, stream: int = 7, flags: int = 0, opcode: int = Opcode.QUERY) -> bytes:
    return struct.pack(">BBhBi", 4, flags, stream, opcode, length)


def client_decoder() -> FrameDecoder:
    return FrameDecoder(max_frame_length=CLIENT_FRAME_LENGTH, preauth_frame_length=PREAUTH_FRAME_LENGTH,
                        compression=LZ4)


def test_before_authentication_only_small_frames_pass_judged_by_the_header_alone() -> None:
    decoder = client_decoder()
    with pytest.raises(CqlProtocolError) as info:
        list(decoder.feed(header(200 * MiB)))  # nothing of the body sent: refused at once
    assert info.value.fatal and info.value.stream == 7
    assert "Request is too big" in info.value.message and "authenticated" in info.value.message
    assert decoder.buffered == HEADER_LENGTH  # nothing more was buffered, nor will be
    decoder = client_decoder()
    with pytest.raises(CqlProtocolError):
        list(decoder.feed(header(PREAUTH_FRAME_LENGTH + 1)))
    small = encode_request(Query("SELECT 1", QueryParameters(1)), 3)
    assert [f.stream for f in client_decoder().feed(small)] == [3]


def test_once_authenticated_frames_up_to_cassandras_default_pass_and_larger_are_refused() -> None:
    decoder = client_decoder()
    decoder.authenticated()
    body = b"q" * (2 * MiB)
    (frame,) = list(decoder.feed(encode_frame(Frame(4, 0, 1, Opcode.QUERY, body))))
    assert frame.body == body
    with pytest.raises(CqlProtocolError) as info:
        list(decoder.feed(header(CLIENT_FRAME_LENGTH + 1)))
    assert info.value.fatal
    assert info.value.message == (f"Request is too big: length {CLIENT_FRAME_LENGTH + 1} exceeds maximum "
                                  f"allowed length {CLIENT_FRAME_LENGTH}")


def test_pending_length_names_the_frame_still_arriving() -> None:
    decoder = client_decoder()
    decoder.authenticated()
    data = encode_frame(Frame(4, 0, 2, Opcode.QUERY, b"x" * 100_000))
    assert list(decoder.feed(data[:HEADER_LENGTH + 10])) == []
    assert decoder.pending_length == 100_000
    assert [f.stream for f in decoder.feed(data[HEADER_LENGTH + 10:])] == [2]
    assert decoder.pending_length == 0


def test_a_compressed_body_claiming_more_than_the_limit_is_refused_before_inflating() -> None:
    # 1 MiB of lz4 that would inflate to 255 MiB: the claim alone is refused (the rest is garbage,
    # so an attempt to inflate would say "corrupt", not "claims").
    bomb = struct.pack(">I", 255 * MiB) + b"\xff" * 64
    decoder = client_decoder()
    decoder.authenticated()
    events = decoder.feed(encode_frame(Frame(4, FLAG_COMPRESSION, 9, Opcode.QUERY, bomb)))
    with pytest.raises(CqlProtocolError, match="claims 267386880 uncompressed bytes") as info:
        next(events)
    assert info.value.stream == 9 and not info.value.fatal
    # Before authentication the limit is the small one, inflated size included.
    real = LZ4.compress(b"a" * (PREAUTH_FRAME_LENGTH + 1))
    assert len(real) < PREAUTH_FRAME_LENGTH
    with pytest.raises(CqlProtocolError, match="over the frame limit of 65536"):
        list(client_decoder().feed(encode_frame(Frame(4, FLAG_COMPRESSION, 1, Opcode.STARTUP, real))))


def test_snappy_length_is_read_from_the_preamble_and_checked_first() -> None:
    assert snappy_length(b"\x00") == 0
    assert snappy_length(b"\x7f") == 127
    assert snappy_length(b"\x80\x01") == 128
    assert snappy_length(b"\xfe\xff\xff\xff\x0f") == 2**32 - 2
    for bad in (b"", b"\x80", b"\xff\xff\xff\xff\xff\x01"):
        with pytest.raises(CqlProtocolError):
            snappy_length(bad)
    # Refused on the claim alone: the snappy library is never reached (it need not even be installed).
    with pytest.raises(CqlProtocolError, match="claims"):
        SnappyCompression().decompress(b"\x80\x80\x80\x80\x01rest", max_length=MiB)


@FUZZ
@given(st.integers(-(2**31), 2**31 - 1), st.booleans(), st.integers(1, 9))
def test_fuzz_frame_headers_never_buffer_past_the_limit(length: int, ready: bool, split: int) -> None:
    decoder = client_decoder()
    if ready:
        decoder.authenticated()
    limit = CLIENT_FRAME_LENGTH if ready else PREAUTH_FRAME_LENGTH
    data = header(length)
    try:
        events = list(decoder.feed(data[:split])) + list(decoder.feed(data[split:]))
    except CqlProtocolError as exc:
        assert exc.fatal and (length < 0 or length > limit)
        return
    assert 0 <= length <= limit
    assert events == [] if length else len(events) == 1
    assert decoder.pending_length == length


@FUZZ
@given(st.integers(0, 2**32 - 1), st.binary(max_size=64), st.integers(0, 4096))
def test_fuzz_lz4_never_inflates_past_the_limit(claimed: int, block: bytes, limit: int) -> None:
    try:
        out = LZ4.decompress(struct.pack(">I", claimed) + block, limit)
    except CqlProtocolError:
        return
    assert len(out) == claimed <= limit


@FUZZ
@given(st.binary(min_size=1, max_size=5000))
def test_fuzz_lz4_round_trip_within_the_limit(body: bytes) -> None:
    packed = struct.pack(">I", len(body)) + lz4.block.compress(body, store_size=False)
    assert LZ4.decompress(packed, len(body)) == body
    if body:
        with pytest.raises(CqlProtocolError):
            LZ4.decompress(packed, len(body) - 1)
