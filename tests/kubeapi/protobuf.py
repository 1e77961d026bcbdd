"""Just enough of the Kubernetes protobuf encoding to read what kubectl sends that way
(`kubectl auth can-i` posts its SelfSubjectAccessReview as protobuf; answers go back as JSON,
which its Accept header allows)."""

from __future__ import annotations

from typing import Any

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    pass


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data):
            raise ProtobufError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def fields(data: bytes) -> dict[int, list[Any]]:
    """Field number -> values (ints for varints, bytes for length-delimited)."""
    out: dict[int, list[Any]] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            length, i = _varint(data, i)
            value, i = data[i:i + length], i + length
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _str(f: dict[int, list[Any]], n: int) -> str:
    return f[n][-1].decode() if n in f else ""


def unwrap(body: bytes) -> tuple[str, str, bytes]:
    """(apiVersion, kind, raw object) from the runtime.Unknown envelope."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing the k8s protobuf prefix")
    env = fields(body[len(MAGIC):])
    type_meta = fields(env.get(1, [b""])[-1])
    return _str(type_meta, 1), _str(type_meta, 2), env.get(2, [b""])[-1]


def access_review(body: bytes) -> dict[str, Any]:
    """A SelfSubjectAccessReview in protobuf as the JSON-shaped dict the handler expects."""
    api_version, kind, raw = unwrap(body)
    if kind != "SelfSubjectAccessReview":
        raise ProtobufError(f"protobuf is only understood for SelfSubjectAccessReview, not {kind!r}")
    review = fields(raw)
    spec = fields(review.get(2, [b""])[-1])
    out: dict[str, Any] = {}
    if 1 in spec:
        ra = fields(spec[1][-1])
        names = ("namespace", "verb", "group", "version", "resource", "subresource", "name")
        out["resourceAttributes"] = {name: _str(ra, i + 1) for i, name in enumerate(names)}
    if 2 in spec:
        nra = fields(spec[2][-1])
        out["nonResourceAttributes"] = {"path": _str(nra, 1), "verb": _str(nra, 2)}
    return {"apiVersion": api_version, "kind": kind, "spec": out}
