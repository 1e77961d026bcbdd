"""The resource types the emulator serves: built-in ones described here, Istio ones from the CRDs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devkit.kubeapi import events
from devkit.kubeapi.openapi import CRD, Schema

_STR = {"type": "string"}
_INT32 = {"type": "integer", "format": "int32"}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}

# ConfigMap keys: what the server's IsConfigMapKey allows.
_CONFIGMAP_KEY = r"^[-._a-zA-Z0-9]{1,253}$"

CONFIGMAP_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "data": {"type": "object", "additionalProperties": _STR,
                 "propertyNames": {"pattern": _CONFIGMAP_KEY}},
        "binaryData": {"type": "object", "additionalProperties": {"type": "string", "format": "byte"},
                       "propertyNames": {"pattern": _CONFIGMAP_KEY}},
        "immutable": {"type": "boolean"},
    },
}

SERVICE_PORT: Schema = {
    "type": "object",
    "required": ["port"],
    "properties": {
        "name": _STR,
        "protocol": {"type": "string", "enum": ["TCP", "UDP", "SCTP"]},
        "appProtocol": _STR,
        "port": {**_INT32, "minimum": 1, "maximum": 65535},
        "targetPort": {"x-kubernetes-int-or-string": True},
        "nodePort": _INT32,
    },
}

SERVICE_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "ports": {"type": "array", "items": SERVICE_PORT, "x-kubernetes-list-type": "map",
                          "x-kubernetes-list-map-keys": ["port", "protocol"]},
                "selector": _STRMAP,
                "clusterIP": _STR,
                "clusterIPs": {"type": "array", "items": _STR},
                "type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
                "externalName": _STR,
                "sessionAffinity": {"type": "string", "enum": ["ClientIP", "None"]},
                "ipFamilies": {"type": "array", "items": {"type": "string", "enum": ["IPv4", "IPv6"]}},
                "ipFamilyPolicy": {"type": "string", "enum": ["SingleStack", "PreferDualStack",
                                                              "RequireDualStack"]},
                "publishNotReadyAddresses": {"type": "boolean"},
                "internalTrafficPolicy": {"type": "string", "enum": ["Cluster", "Local"]},
            },
        },
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}

SERVICEACCOUNT_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "secrets": {"type": "array",
                    "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        "imagePullSecrets": {"type": "array", "items": {"type": "object", "properties": {"name": _STR}}},
        "automountServiceAccountToken": {"type": "boolean"},
    },
}

# Lease times are metav1.MicroTime: exactly six fractional digits on the wire.
LEASE_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "holderIdentity": _STR,
                "leaseDurationSeconds": {**_INT32, "minimum": 1},
                "acquireTime": {"type": "string", "format": "micro-time"},
                "renewTime": {"type": "string", "format": "micro-time"},
                "leaseTransitions": {**_INT32, "minimum": 0},
                "strategy": _STR,
                "preferredHolder": _STR,
            },
        },
    },
}

NAMESPACE_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "spec": {"type": "object", "properties": {"finalizers": {"type": "array", "items": _STR}}},
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}

_STRLIST = {"type": "array", "items": _STR}
POLICY_RULE: Schema = {
    "type": "object",
    "required": ["verbs"],
    "properties": {"verbs": _STRLIST, "apiGroups": _STRLIST, "resources": _STRLIST,
                   "resourceNames": _STRLIST, "nonResourceURLs": _STRLIST},
}
ROLE_SCHEMA: Schema = {"type": "object", "properties": {"rules": {"type": "array", "items": POLICY_RULE}}}
CLUSTERROLE_SCHEMA: Schema = {"type": "object", "properties": {
    "rules": {"type": "array", "items": POLICY_RULE},
    "aggregationRule": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}


def _binding_schema(ref_kinds: list[str]) -> Schema:
    return {
        "type": "object",
        "required": ["roleRef"],
        "properties": {
            "subjects": {"type": "array", "items": {
                "type": "object", "required": ["kind", "name"],
                "properties": {"kind": {"type": "string", "enum": ["User", "Group", "ServiceAccount"]},
                               "name": {"type": "string", "minLength": 1}, "namespace": _STR,
                               "apiGroup": _STR}}},
            "roleRef": {"type": "object", "required": ["apiGroup", "kind", "name"],
                        "properties": {"apiGroup": {"type": "string", "enum": ["rbac.authorization.k8s.io"]},
                                       "kind": {"type": "string", "enum": ref_kinds},
                                       "name": {"type": "string", "minLength": 1}}},
        },
    }


# Stored only (no controller runs them), so `mesh-agent manifests | kubectl apply -f -` goes through.
CRONJOB_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "spec": {"type": "object", "required": ["schedule", "jobTemplate"],
                 "properties": {"schedule": {"type": "string", "minLength": 1},
                                "concurrencyPolicy": {"type": "string",
                                                      "enum": ["Allow", "Forbid", "Replace"]},
                                "suspend": {"type": "boolean"},
                                "successfulJobsHistoryLimit": {**_INT32, "minimum": 0},
                                "failedJobsHistoryLimit": {**_INT32, "minimum": 0},
                                "startingDeadlineSeconds": {"type": "integer", "minimum": 0},
                                "timeZone": _STR,
                                "jobTemplate": {"type": "object",
                                                "x-kubernetes-preserve-unknown-fields": True}}},
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}

# admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy and its binding: the fields the emulator
# evaluates (devkit/kubeapi/admission.py), typed as the real API types them.
_LABEL_SELECTOR: Schema = {
    "type": "object",
    "properties": {
        "matchLabels": _STRMAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"],
            "properties": {"key": _STR,
                           "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": _STRLIST}}},
    },
}
_RULE: Schema = {
    "type": "object",
    "properties": {
        "apiGroups": _STRLIST, "apiVersions": _STRLIST, "resources": _STRLIST, "resourceNames": _STRLIST,
        "operations": {"type": "array", "items": {"type": "string",
                                                  "enum": ["*", "CREATE", "UPDATE", "DELETE", "CONNECT"]}},
        "scope": {"type": "string", "enum": ["*", "Cluster", "Namespaced"]},
    },
}
_MATCH_RESOURCES: Schema = {
    "type": "object",
    "properties": {
        "namespaceSelector": _LABEL_SELECTOR, "objectSelector": _LABEL_SELECTOR,
        "resourceRules": {"type": "array", "items": _RULE},
        "excludeResourceRules": {"type": "array", "items": _RULE},
        "matchPolicy": {"type": "string", "enum": ["Exact", "Equivalent"]},
    },
}
_NAMED_EXPRESSION: Schema = {"type": "object", "required": ["name", "expression"],
                             "properties": {"name": {"type": "string", "minLength": 1}, "expression": _STR}}
VAP_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "spec": {"type": "object", "properties": {
            "failurePolicy": {"type": "string", "enum": ["Fail", "Ignore"]},
            "paramKind": {"type": "object", "properties": {"apiVersion": _STR, "kind": _STR}},
            "matchConstraints": _MATCH_RESOURCES,
            "validations": {"type": "array", "items": {
                "type": "object", "required": ["expression"],
                "properties": {"expression": _STR, "message": _STR, "messageExpression": _STR,
                               "reason": {"type": "string", "enum": ["Unauthorized", "Forbidden", "Invalid",
                                                                    "RequestEntityTooLarge"]}}}},
            "auditAnnotations": {"type": "array", "items": {
                "type": "object", "required": ["key", "valueExpression"],
                "properties": {"key": _STR, "valueExpression": _STR}}},
            "matchConditions": {"type": "array", "items": _NAMED_EXPRESSION, "maxItems": 64},
            "variables": {"type": "array", "items": _NAMED_EXPRESSION},
        }},
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}
VAPB_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "spec": {"type": "object", "properties": {
            "policyName": _STR,
            "paramRef": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "matchResources": _MATCH_RESOURCES,
            "validationActions": {"type": "array", "items": {"type": "string", "enum": ["Deny", "Warn", "Audit"]},
                                  "x-kubernetes-list-type": "set"},
        }},
    },
}

RBAC = "rbac.authorization.k8s.io"
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class ResourceType:
    """One REST resource: where it lives, what it is called, how it is validated."""

    group: str
    versions: tuple[str, ...]  # served versions, preferred first
    plural: str
    singular: str
    kind: str
    namespaced: bool
    schemas: dict[str, Schema]  # per version; the body minus apiVersion/kind/metadata
    status_subresource: bool = False
    name_rule: str = "subdomain"
    custom: bool = False  # custom resources: no strategic merge patch, no unconditional update
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    printer_columns: dict[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)
    verbs: tuple[str, ...] = tuple(ALL_VERBS)
    # Another resource's objects under other field names (core/v1 events: events.k8s.io's, viewed).
    stored_as: tuple[str, str] | None = None
    view: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    field_labels: tuple[str, ...] = ()  # field selectors beyond metadata.name/namespace

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def store_key(self) -> tuple[str, str]:
        return self.stored_as or (self.group, self.plural)

    @property
    def storage_version(self) -> str:
        return self.versions[0]

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    @property
    def allow_unconditional_update(self) -> bool:
        return not self.custom

    def schema(self, version: str) -> Schema:
        return self.schemas[version]


def _column(name: str, path: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "type": kind, "jsonPath": path, "description": ""}


_AGE = _column("Age", ".metadata.creationTimestamp", "date")


def builtin_types() -> list[ResourceType]:
    return [
        ResourceType("", ("v1",), "namespaces", "namespace", "Namespace", False,
                     {"v1": NAMESPACE_SCHEMA}, name_rule="label", short_names=("ns",),
                     printer_columns={"v1": (_column("Status", ".status.phase"), _AGE)}),
        ResourceType("", ("v1",), "configmaps", "configmap", "ConfigMap", True,
                     {"v1": CONFIGMAP_SCHEMA}, short_names=("cm",)),
        ResourceType("", ("v1",), "services", "service", "Service", True,
                     {"v1": SERVICE_SCHEMA}, status_subresource=True, name_rule="dns1035",
                     short_names=("svc",)),
        ResourceType("", ("v1",), "serviceaccounts", "serviceaccount", "ServiceAccount", True,
                     {"v1": SERVICEACCOUNT_SCHEMA}, short_names=("sa",)),
        ResourceType(RBAC, ("v1",), "roles", "role", "Role", True, {"v1": ROLE_SCHEMA}),
        ResourceType(RBAC, ("v1",), "rolebindings", "rolebinding", "RoleBinding", True,
                     {"v1": _binding_schema(["Role", "ClusterRole"])}),
        ResourceType(RBAC, ("v1",), "clusterroles", "clusterrole", "ClusterRole", False,
                     {"v1": CLUSTERROLE_SCHEMA}),
        ResourceType(RBAC, ("v1",), "clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", False,
                     {"v1": _binding_schema(["ClusterRole"])}),
        ResourceType("batch", ("v1",), "cronjobs", "cronjob", "CronJob", True, {"v1": CRONJOB_SCHEMA},
                     status_subresource=True, short_names=("cj",)),
        ResourceType("admissionregistration.k8s.io", ("v1",), "validatingadmissionpolicies",
                     "validatingadmissionpolicy", "ValidatingAdmissionPolicy", False, {"v1": VAP_SCHEMA},
                     status_subresource=True, categories=("api-extensions",)),
        ResourceType("admissionregistration.k8s.io", ("v1",), "validatingadmissionpolicybindings",
                     "validatingadmissionpolicybinding", "ValidatingAdmissionPolicyBinding", False,
                     {"v1": VAPB_SCHEMA}, categories=("api-extensions",)),
        ResourceType(events.GROUP, ("v1",), "events", "event", "Event", True, {"v1": events.EVENT_V1_SCHEMA},
                     short_names=("ev",), field_labels=events.V1_FIELDS,
                     printer_columns={"v1": events.printer_columns()}),
        ResourceType("", ("v1",), "events", "event", "Event", True, {"v1": events.EVENT_CORE_SCHEMA},
                     short_names=("ev",), verbs=("get", "list", "watch"), stored_as=(events.GROUP, "events"),
                     view=events.core_view, field_labels=events.CORE_FIELDS,
                     printer_columns={"v1": events.printer_columns()}),
        ResourceType("coordination.k8s.io", ("v1",), "leases", "lease", "Lease", True,
                     {"v1": LEASE_SCHEMA},
                     printer_columns={"v1": (_column("Holder", ".spec.holderIdentity"), _AGE)}),
    ]


def crd_type(crd: CRD) -> ResourceType:
    served = [v for v in crd.versions if v.served]
    # The storage version is preferred, as kubectl and discovery clients expect.
    served.sort(key=lambda v: (not v.storage, v.name))
    return ResourceType(
        group=crd.group, versions=tuple(v.name for v in served), plural=crd.plural, singular=crd.singular,
        kind=crd.kind, namespaced=crd.namespaced, schemas={v.name: v.schema for v in served},
        status_subresource=any(v.status_subresource for v in served), custom=True,
        short_names=crd.short_names, categories=crd.categories,
        printer_columns={v.name: v.printer_columns for v in served},
    )


# Resources that are not stored objects but answer requests: listed for discovery only.
VIRTUAL = [
    ("authorization.k8s.io", "v1", {"name": "selfsubjectaccessreviews",
                                    "singularName": "selfsubjectaccessreview", "namespaced": False,
                                    "kind": "SelfSubjectAccessReview", "verbs": ["create"]}),
    ("authentication.k8s.io", "v1", {"name": "selfsubjectreviews", "singularName": "selfsubjectreview",
                                     "namespaced": False, "kind": "SelfSubjectReview", "verbs": ["create"]}),
]


def api_resource(rt: ResourceType) -> list[dict[str, Any]]:
    main: dict[str, Any] = {"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
                            "kind": rt.kind, "verbs": list(rt.verbs)}
    if rt.short_names:
        main["shortNames"] = list(rt.short_names)
    if rt.categories:
        main["categories"] = list(rt.categories)
    out = [main]
    if rt.status_subresource:
        out.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                    "kind": rt.kind, "verbs": ["get", "patch", "update"]})
    if rt.plural == "serviceaccounts":
        out.append({"name": "serviceaccounts/token", "singularName": "", "namespaced": True,
                    "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest",
                    "verbs": ["create"]})
    return out
