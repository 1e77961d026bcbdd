"""Just enough of the Kubernetes protobuf encoding to read the request bodies kubectl's typed commands
send that way (`kubectl create namespace|configmap|serviceaccount|token`, `kubectl auth can-i`).
Answers go back as JSON, which their Accept header allows."""

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
        value: int | bytes
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


# Message layouts (field number -> (JSON name, type)) of what kubectl's typed commands send:
# `kubectl create namespace|configmap|serviceaccount|token`, `kubectl auth can-i`.
# Types: "string", "int", "bool", "map" (string -> string), "[]string", "micro-time", or a message name
# ("[]Name" for repeated messages).
MESSAGES: dict[str, dict[int, tuple[str, str]]] = {
    "ObjectMeta": {1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"),
                   5: ("uid", "string"), 6: ("resourceVersion", "string"), 11: ("labels", "map"),
                   12: ("annotations", "map"), 13: ("ownerReferences", "[]OwnerReference"),
                   14: ("finalizers", "[]string")},
    "OwnerReference": {1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"),
                       5: ("apiVersion", "string"), 6: ("controller", "bool"),
                       7: ("blockOwnerDeletion", "bool")},
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec")},
    "NamespaceSpec": {1: ("finalizers", "[]string")},
    "ConfigMap": {1: ("metadata", "ObjectMeta"), 2: ("data", "map"), 4: ("immutable", "bool")},
    "ServiceAccount": {1: ("metadata", "ObjectMeta"), 3: ("imagePullSecrets", "[]LocalObjectReference"),
                       4: ("automountServiceAccountToken", "bool")},
    "LocalObjectReference": {1: ("name", "string")},
    "Lease": {1: ("metadata", "ObjectMeta"), 2: ("spec", "LeaseSpec")},
    "LeaseSpec": {1: ("holderIdentity", "string"), 2: ("leaseDurationSeconds", "int"),
                  3: ("acquireTime", "micro-time"), 4: ("renewTime", "micro-time"),
                  5: ("leaseTransitions", "int"), 6: ("strategy", "string"),
                  7: ("preferredHolder", "string")},
    "TokenRequest": {1: ("metadata", "ObjectMeta"), 2: ("spec", "TokenRequestSpec")},
    "TokenRequestSpec": {1: ("audiences", "[]string"), 3: ("boundObjectRef", "BoundObjectReference"),
                         4: ("expirationSeconds", "int")},
    "BoundObjectReference": {1: ("kind", "string"), 2: ("apiVersion", "string"), 3: ("name", "string"),
                             4: ("uid", "string")},
    "SelfSubjectAccessReview": {1: ("metadata", "ObjectMeta"), 2: ("spec", "SelfSubjectAccessReviewSpec")},
    "SelfSubjectAccessReviewSpec": {1: ("resourceAttributes", "ResourceAttributes"),
                                    2: ("nonResourceAttributes", "NonResourceAttributes")},
    "ResourceAttributes": {1: ("namespace", "string"), 2: ("verb", "string"), 3: ("group", "string"),
                           4: ("version", "string"), 5: ("resource", "string"), 6: ("subresource", "string"),
                           7: ("name", "string")},
    "NonResourceAttributes": {1: ("path", "string"), 2: ("verb", "string")},
    "DeleteOptions": {1: ("gracePeriodSeconds", "int"), 2: ("preconditions", "Preconditions"),
                      4: ("propagationPolicy", "string"), 5: ("dryRun", "[]string")},
    "Preconditions": {1: ("uid", "string"), 2: ("resourceVersion", "string")},
}


def _micro_time(data: bytes) -> str:
    import datetime as dt

    f = fields(data)
    seconds, nanos = f.get(1, [0])[-1], f.get(2, [0])[-1]
    when = dt.datetime.fromtimestamp(seconds, dt.UTC).replace(microsecond=nanos // 1000)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _decode(data: bytes, message: str) -> dict[str, Any]:
    layout = MESSAGES[message]
    out: dict[str, Any] = {}
    for number, values in fields(data).items():
        if number not in layout:
            continue  # a field this table does not know: dropped, like an unknown JSON field
        name, kind = layout[number]
        if kind == "string":
            out[name] = values[-1].decode()
        elif kind == "int":
            v = values[-1]
            out[name] = v - (1 << 64) if v >= 1 << 63 else v
        elif kind == "bool":
            out[name] = bool(values[-1])
        elif kind == "[]string":
            out[name] = [v.decode() for v in values]
        elif kind == "map":
            out[name] = {_str(e, 1): _str(e, 2) for e in (fields(v) for v in values)}
        elif kind == "micro-time":
            out[name] = _micro_time(values[-1])
        elif kind.startswith("[]"):
            out[name] = [_decode(v, kind[2:]) for v in values]
        else:
            out[name] = _decode(values[-1], kind)
    return out


def decode(body: bytes) -> dict[str, Any]:
    """A protobuf-encoded object as the JSON-shaped dict the handlers expect."""
    api_version, kind, raw = unwrap(body)
    if kind not in MESSAGES:
        raise ProtobufError(f"protobuf is not supported for {kind or 'this object'}; send JSON")
    return {"apiVersion": api_version, "kind": kind, **_decode(raw, kind)}
