"""agent.yaml loading: every bad file gets exact file:line: key: message lines; good files load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent import config
from agent.cli import main as cli_main
from agent.config import ConfigError
from agent.health import config as health_config
from agent.schema import MAX_BYTES, MAX_ERRORS
from tests.conftest import REPO

# (name, yaml text, expected stderr lines). Lines are 1-based in the dedented text.
BAD = [
    ("syntax-error", """\
        bundle:
          source: /x
          timeout: a: b
        """, ["agent.yaml:3: YAML syntax error: mapping values are not allowed here"]),
    ("bad-indent", """\
        bundle:
          source: /x
         sidecar: {profile: envoy}
        """, ["agent.yaml:3: YAML syntax error: expected <block end>, but found '<block mapping start>'"]),
    ("unclosed-flow", """\
        bundle: {source: /x
        """, ["agent.yaml:2: YAML syntax error: expected ',' or '}', but got '<stream end>'"]),
    ("unknown-top-key", """\
        bundle: {source: /x}
        regsitry: {}
        """, ['agent.yaml:2: regsitry: unknown key (did you mean "registry"?)']),
    ("unknown-nested-key", """\
        bundle: {source: /x}
        registry:
          lease:
            duraton: 40s
        """, ['agent.yaml:4: registry.lease.duraton: unknown key (did you mean "duration"?)']),
    ("bad-duration", """\
        bundle: {source: /x}
        registry:
          lease:
            duration: forty
        """, ['agent.yaml:4: registry.lease.duration: expected a duration like "40s", got "forty"']),
    ("bare-number-duration", """\
        bundle: {source: /x}
        shutdown: {propagation: 5}
        """, ['agent.yaml:2: shutdown.propagation: expected a duration like "40s", got "5"']),
    ("missing-required", """\
        sidecar: {profile: istio}
        """, ["agent.yaml:1: bundle: required key is missing"]),
    ("missing-required-nested", """\
        bundle:
          allow_insecure: true
        """, ["agent.yaml:2: bundle.source: required key is missing"]),
    ("wrong-type-bool", """\
        bundle: {source: /x, allow_insecure: "yes please"}
        """, ['agent.yaml:1: bundle.allow_insecure: expected true or false, got "yes please"']),
    ("wrong-type-int", """\
        bundle: {source: /x}
        metrics:
          port: http
        """, ['agent.yaml:3: metrics.port: expected an integer, got "http"']),
    ("out-of-range-int", """\
        bundle: {source: /x}
        metrics:
          port: 70000
        """, ['agent.yaml:3: metrics.port: must be at most 65535, got "70000"']),
    ("out-of-range-duration", """\
        bundle: {source: /x}
        registry:
          lease: {duration: 1s}
        """, ['agent.yaml:3: registry.lease.duration: must be at least 5s, got "1s"']),
    ("bad-enum", """\
        bundle: {source: /x}
        registry:
          on_unhealthy: ignore
        """, ['agent.yaml:3: registry.on_unhealthy: expected one of delete, condition, got "ignore"']),
    ("list-instead-of-mapping", """\
        bundle: {source: /x}
        sidecar: [istio]
        """, ["agent.yaml:2: sidecar: expected a mapping, got a list"]),
    ("string-where-list", """\
        bundle: {source: /x}
        app:
          ports: 8080
        """, ['agent.yaml:3: app.ports: expected a list, got "8080"']),
    ("duplicate-key", """\
        bundle: {source: /x}
        bundle: {source: /y}
        """, ["agent.yaml:2: bundle: duplicate key"]),
    ("http-refused", """\
        bundle:
          source: http://bundles.example/vm.tar.gz
        """, ["agent.yaml:2: bundle.source: http:// is refused; use https:// or set "
              "bundle.allow_insecure: true"]),
    ("cert-without-key", """\
        bundle:
          source: https://bundles.example/vm.tar.gz
          client_cert: /etc/c.pem
        """, ["agent.yaml:3: bundle.client_cert: client_cert and client_key must be set together"]),
    ("probe-two-kinds", """\
        bundle: {source: /x}
        app:
          probe:
            http_get: {port: 80}
            tcp_socket: {port: 80}
        """, ["agent.yaml:4: app.probe.http_get: a probe needs exactly one of http_get, tcp_socket, exec, "
              "grpc (got http_get, tcp_socket)"]),
    ("lease-renew-too-long", """\
        bundle: {source: /x}
        registry:
          lease: {duration: 10s, renew: 20s}
        """, ["agent.yaml:3: registry.lease.renew: must be shorter than lease.duration"]),
    ("bad-address", """\
        bundle: {source: /x}
        registry:
          address: {value: 10.0.0.300}
        """, ['agent.yaml:3: registry.address.value: expected an IP address, got "10.0.0.300"']),
    ("string-where-string-expected-number", """\
        bundle: {source: /x}
        sidecar:
          package: {url: /p.deb, version: 1.10, sha256: """ + "a" * 64 + """}
        """, ['agent.yaml:3: sidecar.package.version: expected a string, got "1.10"']),
    ("several-errors-at-once", """\
        bundle: {source: /x}
        metrics: {port: 0}
        logging: {level: loud}
        sidecar: {profil: envoy}
        """, ['agent.yaml:2: metrics.port: must be at least 1, got "0"',
              'agent.yaml:3: logging.level: expected one of debug, info, warning, error, got "loud"',
              'agent.yaml:4: sidecar.profil: unknown key (did you mean "profile"?)']),
    # Every bad element of a list is named, not only the first.
    ("every-bad-port", """\
        bundle: {source: /x}
        app:
          ports: [70000, 0, 8080, -1]
        """, ['agent.yaml:3: app.ports[0]: must be at most 65535, got "70000"',
              'agent.yaml:3: app.ports[1]: must be at least 1, got "0"',
              'agent.yaml:3: app.ports[3]: must be at least 1, got "-1"']),
    ("every-bad-port-block-list", """\
        bundle: {source: /x}
        app:
          ports:
            - 0
            - http
            - 65536
        """, ['agent.yaml:4: app.ports[0]: must be at least 1, got "0"',
              'agent.yaml:5: app.ports[1]: expected an integer, got "http"',
              'agent.yaml:6: app.ports[2]: must be at most 65535, got "65536"']),
    # Files that are not one plain YAML mapping: a clear line, never a traceback.
    ("empty-file", "", ["agent.yaml:1: bundle: required key is missing"]),
    ("comments-only", """\
        # configured: true
        # bundle: {source: /x}
        """, ["agent.yaml:1: bundle: required key is missing"]),
    ("document-marker-only", "---\n", ["agent.yaml:1: bundle: required key is missing"]),
    ("scalar-at-top", "bundle\n", ['agent.yaml:1: expected a mapping, got "bundle"']),
    ("list-at-top", """\
        - bundle: {source: /x}
        """, ["agent.yaml:1: expected a mapping, got a list"]),
    ("two-documents", """\
        bundle: {source: /x}
        ---
        bundle: {source: /y}
        """, ["agent.yaml:2: a second YAML document: the file must hold one"]),
    ("billion-laughs", """\
        a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
        b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
        c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
        d: [*c, *c, *c, *c, *c, *c, *c, *c, *c]
        """, ["agent.yaml:1: anchors (&name) and aliases (*name) are not supported: write the value out"]),
    ("alias-later", """\
        bundle: {source: /x}
        registry: {labels: *l}
        """, ["agent.yaml:2: anchors (&name) and aliases (*name) are not supported: write the value out"]),
    ("tab-indent", "bundle:\n\tsource: /x\n",
     ["agent.yaml:2: YAML syntax error: found character '\\t' that cannot start any token "
      "(indent with spaces: YAML does not allow tabs there)"]),
    ("deep-flow-sequences", "[" * 3000, ["agent.yaml:1: nested deeper than 32 levels"]),
    ("deep-flow-mappings", "{a: " * 5000, ["agent.yaml:1: nested deeper than 32 levels"]),
    ("deep-block-mappings", "".join(" " * i + "a:\n" for i in range(100)),
     ["agent.yaml:32: nested deeper than 32 levels"]),
    ("too-many-values", "bundle: {source: /x}\napp: {ports: [" + "1, " * 20000 + "]}\n",
     ["agent.yaml:2: more than 10000 keys and values: not a configuration file"]),
    ("nul-byte", "bundle: {source: /x}\nmetrics: {port: 1\0}\n", ["agent.yaml:2: NUL byte: not a text file"]),
    ("control-character", "bundle: {source: /x\x07}\n",
     ["agent.yaml:1: character U+0007 is not allowed in YAML"]),
    ("key-that-is-a-list", """\
        bundle: {source: /x}
        ? [a, b]
        : 1
        """, ["agent.yaml:2: keys must be strings, got a list"]),
    ("newline-in-a-value-stays-on-one-line", """\
        bundle: {source: /x}
        metrics: {port: "80\\n81"}
        """, ['agent.yaml:2: metrics.port: expected an integer, got "80\\n81"']),
    ("long-value-is-shortened", "bundle: {source: /x}\nmetrics: {port: " + "9" * 5000 + "}\n",
     ['agent.yaml:2: metrics.port: expected an integer, got "' + "9" * 57 + '..."']),
    ("long-key-is-shortened", "bundle: {source: /x}\n? " + "k" * 5000 + "\n: 1\n",
     ["agent.yaml:2: " + "k" * 57 + "...: unknown key"]),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_file_is_rejected_with_exact_messages(name: str, text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(textwrap.dedent(text), "agent.yaml")
    assert [str(e) for e in info.value.errors] == expected


@pytest.mark.parametrize(("name", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_config_check_exits_78_naming_file_line_and_key(
        name: str, text: str, expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(textwrap.dedent(text))
    assert cli_main(["config", "check", str(path)]) == 78
    err = capsys.readouterr().err.splitlines()
    assert err[:-1] == [line.replace("agent.yaml", str(path), 1) for line in expected]
    assert err[-1].startswith(f"{path}: {len(expected)} problem")


def test_minimal_file_gets_documented_defaults() -> None:
    cfg = config.parse("bundle: {source: /srv/bundle}\n")
    assert cfg.bundle.source == "/srv/bundle"
    assert cfg.bundle.max_size == 1024 * 1024
    assert cfg.bundle.refresh_fraction == 0.7
    assert cfg.sidecar.profile == "istio"
    assert cfg.sidecar.backoff.initial == 0.2 and cfg.sidecar.backoff.max == 30.0
    assert cfg.sidecar.crash_loop.max_exits == 5 and cfg.sidecar.crash_loop.window == 120.0
    assert cfg.registry.lease.duration == 40.0 and cfg.registry.lease.renew == 20.0
    assert cfg.registry.resync == 900.0 and cfg.registry.backoff.max == 18.0
    assert cfg.registry.on_unhealthy == "delete"
    assert cfg.shutdown.propagation == 5.0
    assert cfg.app.probe is None
    assert cfg.configured is True


def test_full_file_round_trips_to_dataclasses() -> None:
    text = textwrap.dedent("""\
        configured: true
        bundle:
          source: https://bundles.example/vm.tar.gz
          ca_file: /etc/mesh-agent/ca.pem
          client_cert: /etc/mesh-agent/c.pem
          client_key: /etc/mesh-agent/k.pem
          max_size: 2MiB
          read_timeout: 1m30s
          on_autoregister: refuse
          kubernetes: {revision: canary, token_lifetime: 2h}
        sidecar:
          profile: envoy
          bootstrap: /etc/mesh-agent/envoy.yaml
          command: [/usr/bin/envoy, -c, /etc/envoy.yaml]
          backoff: {initial: 500ms, max: 1m}
          crash_loop: {max_exits: 3, window: 60s}
          package: {url: /srv/istio-sidecar.deb, version: "1.24.0", sha256: %s}
        app:
          ports: [8080, 9090]
          probe:
            http_get:
              port: 8080
              path: /healthz
              scheme: HTTPS
              http_headers: [{name: X-Probe, value: mesh}]
            period: 2s
            failure_threshold: 2
          flap: {min_dwell: 1s, max_transitions: 4, window: 1m}
        registry:
          kubeconfig: /etc/mesh-agent/kubeconfig
          namespace: vm-apps
          group: billing
          address: {cidr: 10.0.0.0/8, family: ipv4}
          labels: {rack: r1, tier: "2"}
          on_unhealthy: condition
          lease: {duration: 30s, renew: 5s}
        shutdown: {propagation: 2s, timeout: 45s}
        metrics: {enabled: false, port: 19000}
        logging: {level: debug, target: stderr}
        root: /tmp/root
        """ % ("ab" * 32))
    cfg = config.parse(text)
    assert cfg.bundle.max_size == 2 * 1024 * 1024
    assert cfg.bundle.read_timeout == 90.0
    assert cfg.bundle.kubernetes.revision == "canary" and cfg.bundle.kubernetes.token_lifetime == 7200.0
    assert cfg.sidecar.command == ("/usr/bin/envoy", "-c", "/etc/envoy.yaml")
    assert cfg.sidecar.backoff == config.BackoffConfig(0.5, 60.0)
    assert cfg.sidecar.package.version == "1.24.0"
    assert cfg.app.ports == (8080, 9090)
    probe = cfg.app.probe
    assert probe is not None and probe.http_get is not None
    assert probe.http_get.http_headers == (health_config.HttpHeader("X-Probe", "mesh"),)
    assert probe.http_get.scheme == "HTTPS" and probe.period == 2.0 and probe.timeout == 1.0
    assert cfg.registry.labels == {"rack": "r1", "tier": "2"}
    assert cfg.registry.address == config.AddressConfig(cidr="10.0.0.0/8", family="ipv4")
    assert cfg.metrics.enabled is False and cfg.metrics.port == 19000
    assert config.to_dict(cfg)["sidecar"]["crash_loop"] == {"max_exits": 3, "window": 60.0}


def test_empty_sections_mean_defaults() -> None:
    cfg = config.parse("bundle: {source: /x}\napp:\nregistry:\n")
    assert cfg.app == health_config.AppConfig() and cfg.registry == config.RegistryConfig()


def test_shipped_example_is_valid_and_not_yet_configured(capsys: pytest.CaptureFixture[str]) -> None:
    example = str(REPO / "packaging" / "agent.yaml.example")
    assert cli_main(["config", "check", example]) == 0
    assert capsys.readouterr().out == (f"{example}: ok, but configured: false: the service will not start "
                                       "until it is true\n")
    assert cli_main(["config", "is-configured", example]) == 1
    assert "not configured yet" in capsys.readouterr().out


def test_check_of_a_configured_file_says_only_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("configured: true\nbundle: {source: /x}\n")
    assert cli_main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"


def test_check_show_still_warns_about_configured_false(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("configured: false\nbundle: {source: /x}\n")
    assert cli_main(["config", "check", "--show", str(path)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["configured"] is False
    assert err == f"{path}: ok, but configured: false: the service will not start until it is true\n"


# --- files no YAML text can describe ---------------------------------------------------------------

def test_invalid_utf8_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = b"bundle: {source: /x}\nmetrics: {address: \"\xff\xfe\"}\n"
    with pytest.raises(ConfigError) as info:
        config.parse_bytes(data, "agent.yaml")
    assert [str(e) for e in info.value.errors] == ["agent.yaml:2: not UTF-8 text (byte 0xff at offset 41)"]
    path = tmp_path / "agent.yaml"
    path.write_bytes(data)
    assert cli_main(["config", "check", str(path)]) == 78
    assert capsys.readouterr().err.splitlines()[0] == f"{path}:2: not UTF-8 text (byte 0xff at offset 41)"


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"bundle: {source: /x}\n" + b"#" * MAX_BYTES)
    assert cli_main(["config", "check", str(path)]) == 78
    assert capsys.readouterr().err.splitlines()[0] == f"{path}:1: larger than 1 MiB: not a configuration file"


def test_a_file_of_exactly_the_size_cap_loads(tmp_path: Path) -> None:
    head = b"bundle: {source: /x}\n"
    path = tmp_path / "agent.yaml"
    path.write_bytes(head + b"#" * (MAX_BYTES - len(head) - 1) + b"\n")
    assert path.stat().st_size == MAX_BYTES
    assert config.load(str(path)).bundle.source == "/x"


def test_problems_are_listed_up_to_the_cap(tmp_path: Path) -> None:
    text = "bundle: {source: /x}\napp:\n  ports:\n" + "    - 0\n" * (MAX_ERRORS + 50)
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    lines = [str(e) for e in info.value.errors]
    assert len(lines) == MAX_ERRORS + 1
    assert lines[0] == 'agent.yaml:4: app.ports[0]: must be at least 1, got "0"'
    assert lines[-2] == f'agent.yaml:{MAX_ERRORS + 3}: app.ports[{MAX_ERRORS - 1}]: must be at least 1, got "0"'
    assert lines[-1] == f"agent.yaml:{MAX_ERRORS + 4}: stopped after {MAX_ERRORS} problems"


def test_check_of_a_directory_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config", "check", str(tmp_path)]) == 78
    assert capsys.readouterr().err.splitlines()[0] == f"{tmp_path}: cannot read: Is a directory"


# --- `config is-configured`, the unit's ExecCondition: 0 starts, 1 skips ---------------------------

def test_is_configured_refuses_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config", "is-configured", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"{tmp_path}: is a directory, not a configuration file\n"


@pytest.mark.parametrize(("content", "expected"), [
    (b"", 1),
    (b"# nothing yet\n", 1),
    (b"configured: no\nbundle: {source: /x}\n", 1),
    (b"configured: true\nbundle: {source: /x}\n", 0),
    # Broken files count as configured, so that `run` names the problem and exits 78.
    (b"[" * 3000, 0),
    (b"a: &a [x, x]\nb: [*a, *a]\n", 0),
    (b"\xff\xfe", 0),
    (b"#" * (MAX_BYTES + 1), 0),
], ids=["empty", "comments", "configured-no", "configured", "deep", "aliases", "not-utf8", "too-large"])
def test_is_configured_exit_codes(content: bytes, expected: int, tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(content)
    assert cli_main(["config", "is-configured", str(path)]) == expected


def test_is_configured_of_a_missing_file_is_1(tmp_path: Path) -> None:
    assert cli_main(["config", "is-configured", str(tmp_path / "agent.yaml")]) == 1


# --- `mesh-agent run` stops at 78 on the same files (systemd does not restart it) ------------------

@pytest.mark.parametrize(("content", "first_line"), [
    (b"", ":1: bundle: required key is missing"),
    (b"# only comments\n", ":1: bundle: required key is missing"),
    (b"- a list\n", ":1: expected a mapping, got a list"),
    (b"{a: " * 5000, ":1: nested deeper than 32 levels"),
    (b"a: &a [x, x]\nb: [*a, *a]\n", ":1: anchors (&name) and aliases (*name) are not supported: write the value out"),
    (b"bundle: {source: /x}\n\xff\n", ":2: not UTF-8 text (byte 0xff at offset 21)"),
], ids=["empty", "comments", "list", "deep", "aliases", "not-utf8"])
def test_run_exits_78_on_a_bad_file(content: bytes, first_line: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = tmp_path / "agent.yaml"
    path.write_bytes(content)
    assert cli_main(["run", "--config", str(path)]) == 78
    assert capsys.readouterr().err.splitlines()[0] == f"{path}{first_line}"


@pytest.mark.subprocess
@pytest.mark.parametrize("argv", [["config", "check"], ["run", "--config"]], ids=["check", "run"])
def test_empty_file_exits_78_without_a_traceback(argv: list[str], tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", config.ENV_VAR)}
    done = subprocess.run([sys.executable, "-m", "agent", *argv, str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0] == f"{path}:1: bundle: required key is missing"


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert config.config_path(None) == "/etc/mesh-agent/agent.yaml"
    monkeypatch.setenv(config.ENV_VAR, "/srv/a.yaml")
    assert config.config_path(None) == "/srv/a.yaml"
    assert config.config_path("/x.yaml") == "/x.yaml"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
        config.load(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("10s", 10), ("5m", 300), ("1h", 3600),
                                                ("1m30s", 90), ("1.5s", 1.5)])
def test_durations(text: str, seconds: float) -> None:
    from agent.units import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "s", "10 s", "1h-5m", "ten seconds", "5m3"])
def test_bad_durations(text: str) -> None:
    from agent.units import parse_duration

    with pytest.raises(ValueError):
        parse_duration(text)


def test_configuration_reference_is_generated_from_the_schema() -> None:
    from agent.config_doc import render

    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == render(), "run: python -m agent.config_doc > docs/configuration.md"


def test_every_key_is_documented() -> None:
    from agent.config_doc import describe

    undocumented = [k.path for k in describe(config.Config) if not k.help]
    assert undocumented == []
