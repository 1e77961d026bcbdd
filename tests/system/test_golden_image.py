"""The golden image, end to end on Debian 12 and Debian 13 under a booted systemd: one image with mesh-agent installed
and configured with a cloud identity (gcp) and `bundle.source: kubernetes`, no credential of any kind;
two clones of it join the mesh as two instances, stay joined across several token lifetimes, and when one
instance is revoked only that one leaves.

The image is built as an image builder would: the .deb installed by apt, agent.yaml written, a sample
app enabled (first machine, on the host's network for Debian's archive); then the image is booted once
as a test VM with an identity of its own, registers, is stopped (which withdraws it), `mesh-agent
deprovision --machine-id` runs, and it is powered off. Its whole file tree (the overlay layers of both
boots over the cached root file system, mounted read-only) is searched for any credential.

Each VM (the test boot and the two clones) boots in a network namespace of its own, with an address on
eth0 (the agent finds its entry's address there) and, on its 127.0.0.1, the API emulator and its own
fake GCP metadata service, both relayed to the host's loopback (tests/system/netns.py). So the image's
agent.yaml is the same for every clone, as on a cloud; only the metadata service behind the same URL
differs, each signing tokens that name its own instance.

The emulator authenticates the VMs with the AuthenticationConfiguration `mesh-agent manifests
--identity gcp` wrote, and their RBAC is what that command printed. Revocation follows docs/identity.md
(a claim rule refusing the instance): the revoked agent is refused (401), cannot renew its lease nor
withdraw, and `mesh-agent reap` removes its entry once the lease has expired; the other stays.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.registry import entry as E
from devkit import bundles, rig
from devkit.envoy import envoy_binary
from devkit.identity import FakeGcp, Instance, TestIssuer
from devkit.kubeapi.oidc import install
from devkit.kubeapi.server import KubeAPI
from devkit.ports import free_port
from tests.system import rootfs
from tests.system.conftest import needs_daemon, require_root
from tests.system.machine import Machine
from tests.system.netns import NetNamespace

pytestmark = [pytest.mark.system, pytest.mark.timeout(900), needs_daemon]

SUITES = ["bookworm", "trixie"]
UNIT = "mesh-agent.service"
NS, GROUP, SA = "vm-apps", "billing", "billing-vm"
AUD = "https://kube.mesh.test"
PROJECT, LICENCE = "mesh-project", "5926592092274602096"
LIFETIME = 60  # seconds each identity token lives: the agent fetches the next one at 75 % (45 s)
LEASE = 20  # seconds; renewed every 3 s
APP_PORT, LISTENER_PORT, ADMIN_PORT, METRICS_PORT = 8080, 15006, 15000, 15020  # inside each VM's namespace
ENVOY = "/usr/local/bin/envoy"
# A JWT: three base64url segments, header and claims JSON objects ("{" is "eyJ" in base64url).
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
# A PEM private key: the line, optional headers (an encrypted key's), then the base64 body. Code that
# only names the line (a PEM parser) is not a key.
PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----\r?\n(?:[A-Za-z-]+:[^\n]*\n)*\s*"
                         rb"[A-Za-z0-9+/=]{40,}")
KUBECONFIG_CREDENTIAL = re.compile(rb"(?m)^\s*-?\s*(?:token|tokenFile|client-key-data|client-key|password):\s*\S")


def instance(cloud_id: str) -> str:
    """The instance id the agent names itself after, from its GCE instance (agent.identity.refresh)."""
    return E.instance_id(f"gcp:{cloud_id}")


def address(n: int) -> str:
    return f"10.200.0.{n}"


@dataclass
class Vm:
    """A booted VM in its own network namespace, with its own metadata service."""

    m: Machine
    gcp: FakeGcp
    cloud_id: str
    n: int

    @property
    def entry_name(self) -> str:
        return f"{GROUP}-{address(self.n)}"

    def status(self) -> dict[str, Any]:
        return json.loads(self.m.run(["mesh-agent", "status", "--json"], check=False).stdout or "{}")

    def state(self) -> str:
        return str((self.status().get("registration") or {}).get("state"))


@dataclass
class World:
    api: KubeAPI
    issuer: TestIssuer
    authn: dict[str, Any]
    tmp: Path
    stack: ExitStack
    suite: str
    image: list[Path] = field(default_factory=list)  # the image's layers, topmost first
    secrets: list[str] = field(default_factory=list)  # credentials that existed while the image was made
    clones: list[Vm] = field(default_factory=list)
    uids: dict[str, str] = field(default_factory=dict)
    md_port: int = 0  # the metadata service's port on every VM's loopback (agent.yaml names it)

    def entry(self, vm: Vm) -> dict[str, Any] | None:
        return self.api.get("WorkloadEntry", NS, vm.entry_name)

    def lease(self, vm: Vm) -> dict[str, Any] | None:
        return self.api.get("Lease", NS, vm.entry_name)

    def renewed(self, vm: Vm) -> str:
        return str(((self.lease(vm) or {}).get("spec") or {}).get("renewTime"))

    def boot_vm(self, name: str, cloud_id: str, n: int) -> Vm:
        """A VM of the image in a namespace of its own: its address, the API and its metadata service
        on its loopback at the ports agent.yaml names."""
        gcp = self.stack.enter_context(FakeGcp(self.issuer, Instance(cloud_id, project=PROJECT, image=LICENCE,
                                                                     lifetime=LIFETIME)))
        ns = self.stack.enter_context(NetNamespace(f"mesh-golden-{os.getpid()}-{name}", f"{address(n)}/24"))
        ns.forward(self.api.port)
        ns.forward(self.md_port, to=gcp.port)
        m = self.stack.enter_context(Machine.boot(self.suite, self.tmp / name, timeout=240, image=self.image,
                                                  netns=ns.name))
        return Vm(m, gcp, cloud_id, n)


def _wait(pred: Callable[[], Any], timeout: float, what: str, every: float = 1.0,
          check: Callable[[], None] | None = None) -> Any:
    """pred()'s first truthy value, polling every `every` s; `check` (an invariant) runs each round."""
    end = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def _config(api: KubeAPI, md_port: int) -> str:
    """The image's agent.yaml: no token, no kubeconfig; the same in every clone."""
    return yaml.safe_dump({
        "bundle": {"source": "kubernetes",
                   "kubernetes": {"namespace": NS, "group": GROUP, "gateway_address": "127.0.0.1"}},
        "sidecar": {"profile": "envoy", "envoy_binary": ENVOY, "bootstrap": "/etc/mesh-agent/envoy.yaml",
                    "admin_address": f"127.0.0.1:{ADMIN_PORT}", "drain_timeout": "3s"},
        "app": {"ports": [APP_PORT], "probe": {"tcp_socket": {"port": APP_PORT}, "period": "1s",
                                               "failure_threshold": 1}},
        "registry": {"server": api.url, "ca_file": "/etc/mesh-agent/kube-ca.crt", "namespace": NS,
                     "group": GROUP, "lease": {"duration": f"{LEASE}s", "renew": "3s"}},
        "identity": {"provider": "gcp", "audience": AUD, "endpoint": f"http://127.0.0.1:{md_port}",
                     "timeout": "3s"},
        "shutdown": {"propagation": "1s", "timeout": "15s"},
        "metrics": {"port": METRICS_PORT},
    })


SAMPLE_APP = f"""[Unit]
Description=the VM's application
[Service]
ExecStart=/usr/bin/python3 -m http.server {APP_PORT} --bind 127.0.0.1 --directory /srv/app
[Install]
WantedBy=multi-user.target
"""


def _cluster(api: KubeAPI, m: Machine, issuer: TestIssuer) -> dict[str, Any]:
    """What the admin does, with the package's own `mesh-agent manifests --identity gcp` (run on the
    image builder, its files under /tmp: never in the image): apply its objects, give the API server
    the AuthenticationConfiguration it wrote. Returns that configuration."""
    m.write("/tmp/issuer-ca.pem", issuer.ca_pem)
    out = m.run(["mesh-agent", "manifests", "--group", GROUP, "--namespace", NS, "--service-account", SA,
                 "--port", f"http={APP_PORT}", "--read-istio-config", "istio-system",
                 "--identity", "gcp", "--audience", AUD, "--project", PROJECT, "--image", LICENCE,
                 "--issuer", issuer.url, "--issuer-ca", "/tmp/issuer-ca.pem",
                 "--authn-config", "/tmp/authn.yaml"]).stdout
    api.create_namespace(NS)
    api.create_namespace("istio-system")
    for doc in yaml.safe_load_all(out):
        if doc:
            api.create(doc, manager="kubectl")
    authn = yaml.safe_load(m.read("/tmp/authn.yaml"))
    install(api, authn)
    api.create({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "istio-ca-root-cert", "namespace": NS},
                "data": {"root-cert.pem": bundles.make_cert(time.time()).decode()}})
    api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
                "data": {"mesh": "trustDomain: cluster.local\ndefaultConfig:\n  discoveryAddress: "
                                 "istiod.istio-system.svc:15012\n"}})
    return authn


def _registered(vm: Vm, timeout: float = 120) -> None:
    try:
        _wait(lambda: vm.state() == "registered", timeout, f"{vm.m.workdir.name} to register", every=2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{vm.m.journal(UNIT, lines=60)}") from None


@pytest.fixture(scope="module", params=SUITES)
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, deb: Path) -> Iterator[World]:
    """The cluster, and the golden image: installed and configured, then booted once as a test VM
    (registered, stopped, deprovisioned) and powered off."""
    require_root()
    if shutil.which("ip", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        pytest.skip("the clones' network namespaces need iproute2 (ip)")
    suite: str = request.param
    tmp = tmp_path_factory.mktemp(f"golden-{suite}")
    with ExitStack() as stack:
        issuer = stack.enter_context(TestIssuer())
        api = KubeAPI(state_dir=tmp / "kubeapi").start()
        stack.callback(api.stop)
        w = World(api, issuer, {}, tmp, stack, suite, md_port=free_port())
        w.secrets.append(api.admin_token)
        with Machine.boot(suite, tmp / "install") as m:
            m.apt_update()
            m.write("/etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost\n")  # a cloud image has one
            m.install_deb(deb)
            w.authn = _cluster(api, m, issuer)
            m.copy_in(envoy_binary(), ENVOY, mode=0o755)
            m.write("/etc/mesh-agent/envoy.yaml",
                    yaml.safe_dump(rig.envoy_bootstrap(ADMIN_PORT, LISTENER_PORT, APP_PORT)))
            assert api.ca_path is not None
            m.copy_in(api.ca_path, "/etc/mesh-agent/kube-ca.crt", mode=0o644)
            m.write("/etc/mesh-agent/agent.yaml", _config(api, w.md_port), mode=0o640)
            m.run(["mesh-agent", "config", "check"])
            m.write("/srv/app/index.html", "billing\n")
            m.write("/etc/systemd/system/sample-app.service", SAMPLE_APP)
            m.systemctl("enable", "sample-app.service")
            m.run(["sh", "-c", "rm -f /tmp/authn.yaml /tmp/issuer-ca.pem"])
            install_layer = m.upper
        w.image = [install_layer]

        # The image builder boots the image once to see it work, then clears what belongs to that VM.
        builder = w.boot_vm("builder", "8100", 10)
        _registered(builder)
        assert w.entry(builder) is not None
        w.secrets.append(builder.m.read("/run/secrets/tokens/istio-token").strip())  # from TokenRequest
        builder.m.systemctl("stop", UNIT, timeout=120)
        assert w.entry(builder) is None, builder.m.journal(UNIT, lines=40)  # stop withdraws it
        builder.m.run(["mesh-agent", "deprovision", "--machine-id"])
        builder.m.poweroff()
        w.secrets += builder.gcp.issued
        assert builder.gcp.issued, "the test VM never asked for its identity token"
        w.image = [builder.m.upper, install_layer]
        yield w


@pytest.fixture(scope="module")
def clones(world: World) -> list[Vm]:
    """Two clones of the image, two cloud instances, booted."""
    world.clones = [world.boot_vm("clone-a", "8101", 11), world.boot_vm("clone-b", "8102", 12)]
    return world.clones


# --- the image --------------------------------------------------------------------------------------

def _shipped(root: Path) -> dict[str, str]:
    """path -> md5 of every file a Debian package installed (dpkg's md5sums)."""
    out: dict[str, str] = {}
    for sums in (root / "var/lib/dpkg/info").glob("*.md5sums"):
        for line in sums.read_text(errors="replace").splitlines():
            digest, _, path = line.partition("  ")
            out["/" + path] = digest
    return out


def _scan(root: Path, secrets: list[str]) -> list[str]:
    """Every credential-looking thing in the tree: JWTs, private keys, kubeconfig credentials and the
    credentials that existed while the image was made. A file a Debian package ships, unchanged (an
    example token in a library's documentation), is the same in every image: not this VM's."""
    known = [s.encode() for s in secrets if s]
    shipped = _shipped(root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = "/" + os.path.relpath(dirpath, root).lstrip(".")
        dirnames[:] = [d for d in dirnames if f"{rel.rstrip('/')}/{d}" not in ("/proc", "/sys", "/dev")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            shown = f"{rel.rstrip('/')}/{name}"
            try:
                if not os.path.isfile(path) or os.path.islink(path) or os.path.getsize(path) == 0:
                    continue
                with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    hits = [f"a credential the test issued ({s[:12].decode()}...)" for s in known
                            if data.find(s) >= 0]
                    if (jwt := JWT.search(data)) is not None:
                        hits.append(f"a JWT ({jwt.group()[:24].decode()}...)")
                    if PRIVATE_KEY.search(data) is not None:
                        hits.append("a private key")
                    if (data.find(b"clusters:") >= 0 and data.find(b"users:") >= 0
                            and KUBECONFIG_CREDENTIAL.search(data) is not None):
                        hits.append("a kubeconfig with a credential")
                    if hits and shipped.get(shown) == hashlib.md5(data).hexdigest():
                        continue
                    found += [f"{shown}: {hit}" for hit in hits]
            except (OSError, ValueError) as exc:
                found.append(f"{shown}: unreadable ({exc})")
    return found


def test_the_image_holds_no_credential(world: World, tmp_path: Path) -> None:
    view = tmp_path / "image"
    view.mkdir()
    layers = ":".join(str(p) for p in (*world.image, rootfs.ensure(world.suite)))
    # The image as its clones see it: the layers, read-only, with no upper layer of its own.
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={layers}", str(view)], check=True)
    try:
        assert (view / "usr/bin/mesh-agent").exists() and (view / "etc/mesh-agent/agent.yaml").exists()
        assert (view / "etc/machine-id").read_text() == ""  # deprovision --machine-id
        config = yaml.safe_load((view / "etc/mesh-agent/agent.yaml").read_text())
        assert config["identity"]["provider"] == "gcp" and config["bundle"]["source"] == "kubernetes"
        assert not {"token_file", "kubeconfig"} & set(config["registry"])
        # The agent's own directories keep nothing of the test VM: no bundle, token or request.
        state = sorted(p.name for p in (view / "var/lib/mesh-agent").iterdir())
        assert not {"bundle", "maintenance"} & set(state), state
        assert not (view / "etc/certs/key.pem").exists() and not (view / "etc/certs/cert-chain.pem").exists()
        # Under /run (a tmpfs on every boot): the identity token, status and the istio token.
        assert not (view / "run/mesh-agent").exists() and not (view / "run/secrets").exists()
        found = _scan(view, world.secrets)
    finally:
        subprocess.run(["umount", str(view)], check=True)
    assert found == [], "credentials in the golden image:\n" + "\n".join(found)
    assert len(world.secrets) >= 3  # the admin token, the test VM's identity token(s) and istio token


# --- the clones -------------------------------------------------------------------------------------

def test_two_clones_register_as_two_fenced_instances(world: World, clones: list[Vm]) -> None:
    for vm in clones:
        _registered(vm)
    entries = {vm.cloud_id: world.entry(vm) for vm in clones}
    leases = {vm.cloud_id: world.lease(vm) for vm in clones}
    for vm in clones:
        obj, lease = entries[vm.cloud_id], leases[vm.cloud_id]
        assert obj is not None and lease is not None, vm.entry_name
        assert obj["spec"]["address"] == address(vm.n)
        # Named after its own cloud instance, and its lease held by that instance alone.
        assert obj["metadata"]["annotations"][E.INSTANCE_ANNOTATION] == instance(vm.cloud_id)
        assert lease["spec"]["holderIdentity"] == instance(vm.cloud_id)
        world.uids[vm.cloud_id] = obj["metadata"]["uid"]
        # Its credential is the token its own metadata service signed, kept under /run.
        assert vm.m.read("/run/mesh-agent/identity-token").strip() in vm.gcp.issued
        assert vm.status()["bundle"]["source"] == "kubernetes"
    assert instance("8101") != instance("8102")
    machine_ids = {vm.m.read("/etc/machine-id").strip() for vm in clones}
    assert len(machine_ids) == 2 and "" not in machine_ids  # systemd gave each clone its own
    writes = [r for r in list(world.api.requests) if r.method in ("POST", "PATCH", "PUT", "DELETE")]
    assert {"mesh-vm:8101", "mesh-vm:8102"} <= {r.user for r in writes}
    # Fenced: each instance wrote only its own entry and lease (a create names the object in its body).
    for vm in clones:
        named = {m.group(1) for r in writes if r.user == f"mesh-vm:{vm.cloud_id}"
                 and (m := re.search(r"/(?:workloadentries|leases)/([^/]+)(?:/status)?$", r.path))}
        assert named == {vm.entry_name}, named


def test_they_stay_registered_across_several_token_lifetimes(world: World, clones: list[Vm]) -> None:
    """Tokens live LIFETIME seconds; for more than three of them both entries stay as they were (same
    uid, no withdrawal) and their leases never lapse."""
    first_expiry = {vm.cloud_id: json.loads(_claims(vm.gcp.issued[0]))["exp"] for vm in clones}

    def unchanged() -> None:
        now = time.time()
        for vm in clones:
            obj, lease = world.entry(vm), world.lease(vm)
            assert obj is not None and obj["metadata"]["uid"] == world.uids[vm.cloud_id], \
                f"{vm.entry_name} was withdrawn\n{vm.m.journal(UNIT, lines=60)}"
            expiry = E.lease_expiry(lease)
            assert expiry is not None and expiry.timestamp() > now, \
                f"the lease of {vm.entry_name} lapsed\n{vm.m.journal(UNIT, lines=60)}"

    # Until the third token of each clone has expired too: everything after uses the fourth or later.
    _wait(lambda: all(time.time() > first_expiry[vm.cloud_id] + 2 * LIFETIME + 1 for vm in clones),
          3 * LIFETIME + 240, "three token lifetimes", every=2, check=unchanged)
    before = {vm.cloud_id: world.renewed(vm) for vm in clones}
    _wait(lambda: all(world.renewed(vm) != before[vm.cloud_id] for vm in clones), 60,
          "a lease renewal with a later token", check=unchanged)  # the emulator refuses expired tokens
    for vm in clones:
        assert len(set(vm.gcp.issued)) >= 4, f"{vm.cloud_id} fetched only {len(vm.gcp.issued)} tokens"
        assert vm.state() == "registered"
    clone_users = {f"mesh-vm:{vm.cloud_id}" for vm in clones}
    assert not [r for r in list(world.api.requests)
                if r.user in clone_users and r.method == "DELETE"], "an entry or lease was withdrawn"


def test_revoking_one_instance_removes_only_that_one(world: World, clones: list[Vm]) -> None:
    """docs/identity.md: a claim rule refusing the instance cuts it off; the agent is refused (it can
    neither renew nor withdraw), its lease expires, and `mesh-agent reap` removes its entry."""
    keep, revoked = clones
    config = json.loads(json.dumps(world.authn))
    config["jwt"][0]["claimValidationRules"].append({
        "expression": f"claims.google.compute_engine.instance_id != '{revoked.cloud_id}'",
        "message": f"instance {revoked.cloud_id} is revoked"})
    install(world.api, config)
    revoked_at = time.time()

    _wait(lambda: revoked.state() == "refused", 120, "the revoked agent to be refused", every=2)
    assert "401" in str(revoked.status()["registration"]["message"]), revoked.status()

    def keep_is_fine() -> None:
        obj = world.entry(keep)
        assert obj is not None and obj["metadata"]["uid"] == world.uids[keep.cloud_id], keep.m.journal(UNIT)

    def reaped() -> bool:
        done = subprocess.run([sys.executable, "-m", "agent", "reap", "--namespace", NS, "--grace", "5s",
                               "--kubeconfig", str(world.api.kubeconfig)],
                              env=rig.agent_env(), cwd=rig.REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return world.entry(revoked) is None and world.lease(revoked) is None

    # The lease runs out LEASE s after the last renewal, then the grace: the reaper removes the entry.
    _wait(reaped, LEASE + 120, "the reaper to remove the revoked VM's entry", every=3, check=keep_is_fine)
    assert not [r for r in list(world.api.requests) if r.user == f"mesh-vm:{revoked.cloud_id}"
                and r.method == "DELETE"], "the revoked agent withdrew by itself (its token was refused)"
    # The other one keeps renewing with its own tokens, and the revoked one stays out.
    renewed = world.renewed(keep)
    _wait(lambda: world.renewed(keep) != renewed, 60, "the remaining VM's next renewal", check=keep_is_fine)
    assert keep.state() == "registered" and revoked.state() == "refused"
    assert world.entry(revoked) is None
    assert E.parse_time(world.renewed(keep)).timestamp() > revoked_at  # type: ignore[union-attr]


def _claims(jwt: str) -> str:
    import base64

    payload = jwt.split(".")[1]
    return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
