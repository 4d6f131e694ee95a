"""A zero-copy decoder for UploadRequest, the one message that carries bulk bytes.

The generated decoder copies ``data`` out of the received message and the
field accessor copies it again: two passes over every uploaded byte before
the server has done any work with it. This decoder reads the protobuf wire
format directly and hands out ``data`` as a memoryview into the received
buffer. It accepts exactly what the generated decoder accepts for this
message (fields in any order, repeated scalars last-one-wins, unknown fields
skipped) and raises ``DecodeError`` where it would; a test checks both
against each other.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


class UploadChunk:
    """The fields of one UploadRequest; ``data`` is a view of the received bytes."""

    __slots__ = ("data", "offset", "upload_id")

    def __init__(self, upload_id: str, offset: int, data: memoryview) -> None:
        self.upload_id = upload_id
        self.offset = offset
        self.data = data


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & (_U64 - 1), i
        shift += 7


def parse_upload_request(raw: bytes) -> UploadChunk:
    view = memoryview(raw)
    n = len(raw)
    i = 0
    upload_id, offset, data = "", 0, view[0:0]
    while i < n:
        tag, i = _varint(raw, i)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise DecodeError("field number 0")
        if wire == 0:
            value, i = _varint(raw, i)
            if field == 2:
                offset = value - _U64 if value > _I64_MAX else value
        elif wire == 2:
            length, i = _varint(raw, i)
            end = i + length
            if end > n:
                raise DecodeError("truncated length-delimited field")
            if field == 1:
                try:
                    upload_id = str(view[i:end], "utf-8")
                except UnicodeDecodeError as exc:
                    raise DecodeError("upload_id is not UTF-8") from exc
            elif field == 3:
                data = view[i:end]
            i = end
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        if i > n:
            raise DecodeError("truncated fixed-width field")
    return UploadChunk(upload_id, offset, data)
