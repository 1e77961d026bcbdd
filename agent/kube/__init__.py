"""The Kubernetes API client the registry, the cluster bundle source, the doctor and the daemon share:
`client.py` (the calls), `errors.py` (their failures), `auth.py` (credentials, token rotation),
`apply.py` (how this client sends a server-side apply), `core.py` (the core/v1 calls), `follow.py`
(following one named object)."""
