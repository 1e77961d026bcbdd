"""ObjectMeta validation: names, labels, annotations, owner references, finalizers."""

from __future__ import annotations

import re
from typing import Any

from devkit.kubeapi.status import FieldError, invalid, required, too_long

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*"
_DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"

SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
                 "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
                 f"for validation is '{_DNS1123_SUBDOMAIN}')")
LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
             "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
             f"validation is '{_DNS1123_LABEL}')")
DNS1035_MSG = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
               "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
               f"regex used for validation is '{_DNS1035_LABEL}')")


def _full(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None


def name_errors(name: str, rule: str, path: str = "metadata.name") -> list[FieldError]:
    """rule: 'subdomain' (most objects), 'label' (namespaces), 'dns1035' (services)."""
    if rule == "label":
        if len(name) > 63:
            return [invalid(path, name, "must be no more than 63 characters")]
        return [] if _full(_DNS1123_LABEL, name) else [invalid(path, name, LABEL_MSG)]
    if rule == "dns1035":
        if len(name) > 63:
            return [invalid(path, name, "must be no more than 63 characters")]
        return [] if _full(_DNS1035_LABEL, name) else [invalid(path, name, DNS1035_MSG)]
    if len(name) > 253:
        return [invalid(path, name, "must be no more than 253 characters")]
    return [] if _full(_DNS1123_SUBDOMAIN, name) else [invalid(path, name, SUBDOMAIN_MSG)]


def qualified_name_errors(key: str, path: str) -> list[FieldError]:
    prefix, _, name = key.rpartition("/")
    errors: list[FieldError] = []
    if "/" in key and (not prefix or len(prefix) > 253 or not _full(_DNS1123_SUBDOMAIN, prefix)):
        errors.append(invalid(path, key, "prefix part " + SUBDOMAIN_MSG))
    if not name:
        errors.append(invalid(path, key, "name part must be non-empty"))
    elif len(name) > 63:
        errors.append(invalid(path, key, "name part must be no more than 63 characters"))
    elif not _full(_QUALIFIED_NAME, name):
        errors.append(invalid(path, key, "name part must consist of alphanumeric characters, '-', '_' "
                                         "or '.', and must start and end with an alphanumeric character"))
    return errors


def label_errors(labels: Any, path: str = "metadata.labels") -> list[FieldError]:
    if not isinstance(labels, dict):
        return [invalid(path, labels, "must be a map of strings")]
    errors: list[FieldError] = []
    for key, value in labels.items():
        errors += qualified_name_errors(key, path)
        if not isinstance(value, str):
            errors.append(invalid(f"{path}.{key}", value, "must be a string"))
        elif len(value) > 63:
            errors.append(invalid(path, value, "must be no more than 63 characters"))
        elif not _full(_LABEL_VALUE, value):
            errors.append(invalid(path, value, "a valid label must be an empty string or consist of "
                                               "alphanumeric characters, '-', '_' or '.', and must start and "
                                               "end with an alphanumeric character"))
    return errors


def annotation_errors(annotations: Any, path: str = "metadata.annotations") -> list[FieldError]:
    if not isinstance(annotations, dict):
        return [invalid(path, annotations, "must be a map of strings")]
    errors: list[FieldError] = []
    total = 0
    for key, value in annotations.items():
        errors += qualified_name_errors(key.lower(), path)
        if not isinstance(value, str):
            errors.append(invalid(f"{path}.{key}", value, "must be a string"))
            continue
        total += len(key) + len(value)
    if total > 256 * 1024:
        errors.append(too_long(path, 256 * 1024))
    return errors


def owner_reference_errors(refs: Any, path: str = "metadata.ownerReferences") -> list[FieldError]:
    if not isinstance(refs, list):
        return [invalid(path, refs, "must be a list")]
    errors: list[FieldError] = []
    controllers = 0
    for i, ref in enumerate(refs):
        p = f"{path}[{i}]"
        if not isinstance(ref, dict):
            errors.append(invalid(p, ref, "must be an object"))
            continue
        for key in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(key):
                errors.append(required(f"{p}.{key}") if key != "uid" else invalid(f"{p}.uid", "", "uid must "
                                                                                  "not be empty"))
        if ref.get("controller"):
            controllers += 1
    if controllers > 1:
        errors.append(invalid(path, "array", "Only one reference can have Controller set to true"))
    return errors


def finalizer_errors(finalizers: Any, path: str = "metadata.finalizers") -> list[FieldError]:
    if not isinstance(finalizers, list):
        return [invalid(path, finalizers, "must be a list")]
    errors: list[FieldError] = []
    for i, fin in enumerate(finalizers):
        if not isinstance(fin, str):
            errors.append(invalid(f"{path}[{i}]", fin, "must be a string"))
        elif "/" not in fin and fin not in ("kubernetes", "orphan", "foregroundDeletion"):
            errors.append(invalid(f"{path}[{i}]", fin, "name is neither a standard finalizer name nor is it "
                                                       "fully qualified"))
        else:
            errors += qualified_name_errors(fin, f"{path}[{i}]")
    return errors


def metadata_errors(meta: Any, name_rule: str) -> list[FieldError]:
    if not isinstance(meta, dict):
        return [invalid("metadata", meta, "must be an object")]
    errors: list[FieldError] = []
    name = meta.get("name")
    if name is not None and not isinstance(name, str):
        errors.append(invalid("metadata.name", name, "must be a string"))
    elif name:
        errors += name_errors(name, name_rule)
    if meta.get("labels") is not None:
        errors += label_errors(meta["labels"])
    if meta.get("annotations") is not None:
        errors += annotation_errors(meta["annotations"])
    if meta.get("ownerReferences") is not None:
        errors += owner_reference_errors(meta["ownerReferences"])
    if meta.get("finalizers") is not None:
        errors += finalizer_errors(meta["finalizers"])
    return errors


def immutable_errors(old: dict[str, Any], new: dict[str, Any]) -> list[FieldError]:
    """Changes an update may not make. (A changed creationTimestamp is silently ignored, as the server
    does, and an empty uid means "the stored one".)"""
    errors: list[FieldError] = []
    if new.get("name") != old.get("name"):
        errors.append(invalid("metadata.name", new.get("name"), "field is immutable"))
    if new.get("uid") and new["uid"] != old.get("uid"):
        errors.append(invalid("metadata.uid", new["uid"], "field is immutable"))
    return errors
