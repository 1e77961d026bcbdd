"""The managed block in /etc/hosts has one rule: agent.bundle.hosts.split_block, which the installer and
`mesh-agent deprovision` use, and the postrm's shell function strip_hosts_block, which purge uses when
the Python code is gone. The same files go through both and must come out the same."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from agent.bundle.hosts import (
    HOSTS_BEGIN,
    HOSTS_END,
    DamagedBlock,
    block_lines,
    shadowing_lines,
    split_block,
    strip_block,
    with_block,
)

POSTRM = Path(__file__).resolve().parents[3] / "debian" / "mesh-agent.postrm"
B, E = HOSTS_BEGIN.encode(), HOSTS_END.encode()
HEAD = b"127.0.0.1 localhost\n::1 ip6-localhost\n"
TAIL = b"192.168.1.9 build-server # the admin's own\n"

# name -> (file, the file without the block, or None when the block is damaged and nothing may change)
CASES: dict[str, tuple[bytes, bytes | None]] = {
    "no block": (HEAD + TAIL, HEAD + TAIL),
    "empty file": (b"", b""),
    "one block": (HEAD + B + b"\n10.0.0.5 istiod\n" + E + b"\n" + TAIL, HEAD + TAIL),
    "empty block": (HEAD + B + b"\n" + E + b"\n", HEAD),
    "no end marker": (HEAD + B + b"\n10.0.0.5 istiod\n" + TAIL, None),
    "no begin marker": (HEAD + b"10.0.0.5 istiod\n" + E + b"\n" + TAIL, None),
    "end before begin": (HEAD + E + b"\n" + TAIL + B + b"\n", None),
    "two blocks": (B + b"\nx\n" + E + b"\n" + TAIL + B + b"\ny\n" + E + b"\n", None),
    "begin twice": (B + b"\n" + B + b"\n" + E + b"\n", None),
    "crlf": (HEAD.replace(b"\n", b"\r\n") + B + b"\r\n10.0.0.5 istiod\r\n" + E + b"\r\n"
             + TAIL.replace(b"\n", b"\r\n"), HEAD.replace(b"\n", b"\r\n") + TAIL.replace(b"\n", b"\r\n")),
    "block at end without newline": (HEAD + B + b"\n10.0.0.5 istiod\n" + E, HEAD),
    "last line kept without newline": (B + b"\nx\n" + E + b"\n" + b"10.1.1.1 last", b"10.1.1.1 last"),
    "marker with stray spaces is not a marker": (HEAD + b"  " + B + b"\nx\n" + E + b"\n", None),
    "marker inside a longer line is not a marker": (HEAD + B + b" extra\n" + TAIL, HEAD + B + b" extra\n" + TAIL),
    "bytes that are not UTF-8 kept": (b"10.0.0.1 caf\xe9\x85\n" + B + b"\nx\n" + E + b"\n\xff\n",
                                      b"10.0.0.1 caf\xe9\x85\n\xff\n"),
}


def postrm_strip(tmp_path: Path, data: bytes) -> tuple[int, bytes]:
    """Run the postrm's strip_hosts_block, as written in the postrm, with sh on a temp file."""
    text = POSTRM.read_text()
    m = re.search(r"^strip_hosts_block\(\) \{\n.*?^\}\n", text, re.M | re.S)
    assert m, "strip_hosts_block is gone from the postrm"
    f = tmp_path / "hosts"
    f.write_bytes(data)
    r = subprocess.run(["sh", "-ec", m.group(0) + 'strip_hosts_block "$1" "$2" "$3"', "sh", str(f),
                        HOSTS_BEGIN, HOSTS_END], capture_output=True, timeout=30)
    assert f.read_bytes() == data  # the function only prints
    return r.returncode, r.stdout


@pytest.mark.subprocess
@pytest.mark.parametrize("name", list(CASES))
def test_python_and_postrm_agree(tmp_path: Path, name: str) -> None:
    data, want = CASES[name]
    if want is None:
        with pytest.raises(DamagedBlock, match="marker lines are damaged"):
            strip_block(data)
        assert postrm_strip(tmp_path, data)[0] == 2
        return
    stripped, found = strip_block(data)
    assert stripped == want
    rc, out = postrm_strip(tmp_path, data)
    assert rc == (0 if found else 1)
    if found:
        assert out == want


def test_split_block_parts() -> None:
    data = HEAD + B + b"\r\n10.0.0.5 istiod\r\n" + E + b"\n" + TAIL
    s = split_block(data)
    assert (s.before, s.block, s.after) == (HEAD, ("10.0.0.5 istiod",), TAIL)
    assert split_block(HEAD).block is None
    assert block_lines(data) == ["10.0.0.5 istiod"]
    assert block_lines(CASES["two blocks"][0]) is None


def test_with_block_replaces_in_place_appends_and_removes() -> None:
    old = HEAD + B + b"\n10.0.0.5 istiod\n" + E + b"\n" + TAIL
    assert with_block(old, ["10.0.0.6 istiod"]) == HEAD + B + b"\n10.0.0.6 istiod\n" + E + b"\n" + TAIL
    assert with_block(old, []) == HEAD + TAIL
    assert with_block(b"127.0.0.1 localhost", ["10.0.0.6 istiod"]) == \
        b"127.0.0.1 localhost\n" + B + b"\n10.0.0.6 istiod\n" + E + b"\n"
    assert with_block(HEAD, []) == HEAD
    with pytest.raises(DamagedBlock):
        with_block(CASES["no end marker"][0], ["10.0.0.6 istiod"])


def test_shadowing_lines_skip_the_block_and_count_every_line() -> None:
    data = HEAD + B + b"\n10.0.0.5 istiod\n" + E + b"\n10.9.9.9 istiod\n"
    assert shadowing_lines(data, ["10.0.0.5 istiod"]) == [
        "/etc/hosts:6: istiod -> 10.9.9.9 outside the mesh-agent block takes precedence over 10.0.0.5; "
        "remove that line"]
    assert shadowing_lines(HEAD + B + b"\n10.0.0.5 istiod\n" + E + b"\n", ["10.0.0.5 istiod"]) == []
