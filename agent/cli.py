"""The `mesh-agent` command line.

Each verb lives in the module of its concern, which provides `add_arguments(parser)` and
`main(args) -> int`; this file only lists the verbs, with their help, and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType

from agent import __version__

EX_USAGE = 2


@dataclass(frozen=True)
class Verb:
    name: str
    module: str
    summary: str
    description: str


VERBS = [
    Verb("run", "agent.daemon", "run the agent in the foreground (what the systemd unit starts)",
         "Fetch and install the mesh bundle, run the sidecar, watch the app and keep the VM's "
         "WorkloadEntry registered while the app is healthy. Runs until SIGTERM; SIGHUP reloads. "
         "Exit 0 after a clean stop, 78 for a bad configuration (systemd does not restart it), "
         "anything else for a failure systemd restarts."),
    Verb("status", "agent.status", "show what the running agent is doing",
         "Print the running agent's state: bundle, token and certificate expiry, sidecar, app health, "
         "registration and recent errors. Works without root. Exit 3 when the agent is not running "
         "(like `systemctl status`)."),
    Verb("reload", "agent.reload", "make the running agent re-read its configuration and say if it took",
         "Send the running agent SIGHUP and wait for its answer: exit 0 when the new configuration was "
         "applied, 78 with the reason when it was refused (the running configuration is kept), 3 when "
         "the agent is not running, 1 when it did not answer in time. The unit's ExecReload."),
    Verb("doctor", "agent.doctor.run", "check everything the agent needs and say what is wrong",
         "One line per check (config, bundle, sidecar, istiod and API reachability, RBAC, WorkloadGroup, clock, "
         "ports, iptables, istio.service): pass, warn or fail with a hint, or skip saying why. "
         "Works without a configuration. Exit 1 when a check fails."),
    Verb("bundle", "agent.bundle.commands", "fetch, verify, show or install a mesh bundle",
         "Work with the mesh bundle that `istioctl x workload entry configure` writes."),
    Verb("manifests", "agent.registry.manifests", "print the Kubernetes objects a fleet of agents needs",
         "Print the WorkloadGroup, ServiceAccount, least-privilege RBAC, ServiceEntry and the reaper's "
         "CronJob for one group of VMs, ready for `kubectl apply -f -`."),
    Verb("deregister", "agent.maintenance", "take this VM out of the mesh until `register`",
         "Put the VM in maintenance: the running agent withdraws its WorkloadEntry and keeps it "
         "withdrawn, across restarts, until `mesh-agent register`."),
    Verb("register", "agent.maintenance", "end maintenance: the agent registers the VM again",
         "End the maintenance started by `mesh-agent deregister`."),
    Verb("reap", "agent.registry.reaper", "delete WorkloadEntries of VMs that died (run in the cluster)",
         "Delete WorkloadEntries, and their Leases, whose lease expired more than the grace ago. "
         "Exit 78 when the API credentials cannot be used, 1 when the API fails."),
    Verb("deprovision", "agent.deprovision", "clear this instance's state before capturing an image",
         "Remove the last bundle, the token copy, the managed /etc/hosts block and the status, keeping "
         "the configuration, so each clone of the image registers as a new instance. With --all, also "
         "every file the agent wrote outside its own directories, as `apt purge` does. Refuses while "
         "the service is running, unless --force."),
    Verb("config", "agent.config_cli", "check the configuration file",
         "`mesh-agent config check [FILE]` validates agent.yaml without starting anything (exit 78 "
         "with one line per problem); `mesh-agent config is-configured [FILE]` is the unit's start "
         "condition (exit 1 while not configured)."),
    Verb("version", "agent.cli", "print the version", "Print mesh-agent's version."),
]


def build_parser(chosen: str | None = None) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    """The parser, with the arguments of the chosen verb's module (only that one is imported)."""
    parser = argparse.ArgumentParser(
        prog="mesh-agent",
        description="Brings this VM into an Istio service mesh and keeps it there.",
        epilog="Configuration: /etc/mesh-agent/agent.yaml (or --config, or $MESH_AGENT_CONFIG). "
               "Exit status: 0 success, 1 failure, 2 usage error, 3 `status`: not running, "
               "78 bad configuration. See mesh-agent(8).")
    parser.add_argument("--version", action="version", version=f"mesh-agent {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    module = None
    for verb in VERBS:
        p = sub.add_parser(verb.name, help=verb.summary, description=verb.description)
        if verb.name != chosen or verb.name == "version":
            continue
        module = _load(verb.module)
        if module is not None:
            module.add_arguments(p, verb.name)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser, module


def _load(name: str) -> ModuleType | None:
    """The verb's module, or None when this build of mesh-agent does not have it yet."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = {v.name for v in VERBS}
    chosen = next((a for a in argv if a in names), None)
    parser, module = build_parser(chosen)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return EX_USAGE
    if args.verb == "version":
        print(f"mesh-agent {__version__}")
        return 0
    if module is None:
        print(f"mesh-agent {args.verb}: not available in this version of mesh-agent yet", file=sys.stderr)
        return EX_USAGE
    return int(module.main(args))


if __name__ == "__main__":
    sys.exit(main())
