#!/usr/bin/env python3
"""Coverage-guided fuzzing of pymq's FrameParser with atheris (libFuzzer for Python).

Not a pytest test (tests/test_fuzz.py is the hypothesis version that CI runs); run it by hand:

    pip install atheris
    python bench/fuzz_parser.py -max_total_time=60            # a minute
    python bench/fuzz_parser.py -max_total_time=600 -jobs=4 corpus/   # longer, keeps a corpus

Each input chooses a protocol version (or "like a connection": 1.0 until a CONNECT or STOMP
frame negotiates one), small or default limits and how the bytes are cut into feeds; the rest
is the stream. A crash is any exception other than ProtocolError, a frame whose content-length
is not its body's size (or a body with a NUL and no content-length), a buffer larger than one
frame within the limits plus the last feed, or an outcome that depends on the cuts. libFuzzer
writes the input to crash-<sha1>; replay it with `python bench/fuzz_parser.py crash-<sha1>`.
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    import pymq

VERSIONS = ("1.0", "1.1", "1.2")
DEFAULT_LIMITS = dict(max_headers=100, max_header_line=65536, max_body=16 * 1024 * 1024)


def buffer_bound(max_headers, max_header_line, max_body):
    """One partial frame within the limits (as tests/test_codec.py states it)."""
    return (max_headers + 1) * (max_header_line + 2) + 2 + max_body + 1


def run(chunks, version, limits, follow_connect):
    parser = pymq.FrameParser(**limits)
    parser.version = "1.0" if follow_connect else version
    bound = buffer_bound(**limits)
    frames = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            if len(parser._buf) > bound + len(chunk):
                raise AssertionError("buffer %d > bound %d + chunk %d"
                                     % (len(parser._buf), bound, len(chunk)))
            while True:
                frame = parser.next_frame()
                if frame is None:
                    break
                check_frame(frame)
                frames.append((frame.command, frame.headers, frame.body, parser.version))
                if follow_connect and frame.command in ("CONNECT", "STOMP"):
                    try:
                        parser.version = pymq.negotiate_version(
                            frame.headers.get("accept-version"))
                    except pymq.ProtocolError:
                        pass
            parser.in_frame
    except pymq.ProtocolError as error:
        if not (isinstance(error.message, str) and error.message):
            raise AssertionError("ProtocolError without a message")
        return frames, True
    return frames, False


def check_frame(frame):
    if "\n" in frame.command:
        raise AssertionError("newline in command %r" % frame.command)
    length = frame.headers.get("content-length")
    if length is not None:
        if len(frame.body) != int(length.strip().lstrip("0") or "0"):
            raise AssertionError("content-length %r, body of %d bytes"
                                 % (length, len(frame.body)))
    elif b"\0" in frame.body:
        raise AssertionError("NUL in a body without content-length")


def test_one_input(data):
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    follow_connect = mode == 3
    version = VERSIONS[mode % 3]
    if fdp.ConsumeBool():
        limits = DEFAULT_LIMITS
    else:
        limits = dict(max_headers=fdp.ConsumeIntInRange(0, 8),
                      max_header_line=fdp.ConsumeIntInRange(4, 200),
                      max_body=fdp.ConsumeIntInRange(0, 300))
    cuts = sorted({fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 12))})
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    points = [c for c in cuts if 0 < c < len(stream)]
    chunks = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]
    chunked = run(chunks, version, limits, follow_connect)
    whole = run([stream], version, limits, follow_connect)
    if chunked != whole:
        raise AssertionError("outcome depends on the cuts: %r vs %r" % (chunked, whole))


def main():
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
