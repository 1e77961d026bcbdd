"""`mesh-agent doctor`: one line per thing the agent needs, pass / warn / fail with a hint, or skip with why.

Each check is a small function returning Check lines; `run_checks` stops nothing on a failure (an admin
wants the whole picture), except that checks needing the API are skipped when it cannot be reached.
Nothing here writes anything outside a private temporary directory; the only traffic is to istiod's
addresses, the API server and, with an identity provider, the cloud's metadata service (or STS).

The verb is run.py; check.py holds what the checks share; vm.py checks this machine and remote.py what
the agent talks to.
"""
