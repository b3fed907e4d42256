import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.framing import (
    MAX_LINE_BYTES,
    PROTOCOL_VERSION,
    FrameTooLong,
    LineBuffer,
    encode_line,
)

CAP = 64

no_newline = st.binary(max_size=CAP).filter(lambda b: b"\n" not in b)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False)]


@given(
    lines=st.lists(st.tuples(no_newline, st.booleans())),
    tail=no_newline,
    cuts=st.lists(st.integers(min_value=0)),
)
def test_any_chunking_round_trips(lines, tail, cuts):
    # A CRLF terminator adds a byte the cap counts, so keep those lines one shorter.
    lines = [(line[: CAP - 1] if crlf else line, crlf) for line, crlf in lines]
    stream = b"".join(line + (b"\r\n" if crlf else b"\n") for line, crlf in lines) + tail
    buf = LineBuffer(CAP)
    got: list[bytes] = []
    fed = 0
    for chunk in chunked(stream, cuts):
        got += buf.feed(chunk)
        fed += len(chunk)
        assert buf.pending() == fed - (stream.rfind(b"\n", 0, fed) + 1)
        assert buf.pending() <= CAP
    assert got == [line if crlf else line.removesuffix(b"\r") for line, crlf in lines]
    assert buf.pending() == len(tail)


@given(
    before=st.lists(no_newline, max_size=5),
    excess=st.integers(min_value=1, max_value=3 * CAP),
    newline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0)),
)
def test_overlong_line_raises_as_soon_as_it_passes_the_cap(before, excess, newline, cuts):
    head = b"".join(line + b"\n" for line in before)
    stream = head + b"x" * (CAP + excess) + (b"\n" if newline else b"")
    # The first chunk that makes the buffered partial line longer than CAP must raise.
    trip = len(head) + CAP + 1
    buf = LineBuffer(CAP)
    got: list[bytes] = []
    fed = 0
    for chunk in chunked(stream, cuts):
        fed += len(chunk)
        if fed >= trip:
            with pytest.raises(FrameTooLong) as caught:
                buf.feed(chunk)
            assert caught.value.limit == CAP
            assert buf.pending() == 0
            break
        got += buf.feed(chunk)
        assert buf.pending() <= CAP
    else:
        pytest.fail("FrameTooLong was never raised")
    # Every line completed in an earlier feed was delivered (a trailing \r is stripped).
    assert got == [line.removesuffix(b"\r") for line in before][: len(got)]


def test_line_exactly_at_the_cap_is_accepted():
    buf = LineBuffer(4)
    assert buf.feed(b"abcd") == []
    assert buf.feed(b"\nefgh\n") == [b"abcd", b"efgh"]
    with pytest.raises(FrameTooLong):
        buf.feed(b"abcd\r\n")  # the \r counts: the cap is on bytes before the newline


def test_peer_that_never_sends_a_newline_is_cut_off():
    buf = LineBuffer()
    chunk = b"a" * 65536
    with pytest.raises(FrameTooLong) as caught:
        for _ in range(MAX_LINE_BYTES // len(chunk) + 1):
            buf.feed(chunk)
    assert caught.value.limit == MAX_LINE_BYTES
    assert buf.pending() == 0


def test_line_at_the_default_cap_in_small_chunks():
    buf = LineBuffer()
    chunk = b"a" * 64
    for _ in range(MAX_LINE_BYTES // len(chunk)):
        assert buf.feed(chunk) == []
    assert buf.pending() == MAX_LINE_BYTES
    assert buf.feed(b"\n{}\n") == [b"a" * MAX_LINE_BYTES, b"{}"]
    assert buf.pending() == 0


def test_rejects_nonpositive_cap():
    with pytest.raises(ValueError):
        LineBuffer(0)


class Hello(msgspec.Struct, tag="hello"):
    protocol: int
    client: str


@given(st.text())
def test_encoded_text_has_only_the_terminating_newline(text):
    line = encode_line({"type": "echo", "text": text, "list": [text, text]})
    assert line.endswith(b"\n")
    assert b"\n" not in line[:-1]
    assert msgspec.json.decode(line)["text"] == text


@given(st.text())
def test_encoded_struct_round_trips_through_the_buffer(client):
    hello = Hello(protocol=PROTOCOL_VERSION, client=client)
    (line,) = LineBuffer().feed(encode_line(hello))
    assert msgspec.json.decode(line, type=Hello) == hello
    assert msgspec.json.decode(line)["type"] == "hello"
