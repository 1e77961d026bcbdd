"""The mesh bundle: what `istioctl x workload entry configure` writes, fetched, checked and installed.

model.py parses and validates (pure), source.py fetches (https, archive, directory), install.py puts
the files where the sidecar expects them, watch.py notices tampering and says when to refresh,
commands.py is the `mesh-agent bundle` verb.
"""
