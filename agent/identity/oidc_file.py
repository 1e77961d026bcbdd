"""oidc-file: a JWT another system keeps in a file (a SPIFFE JWT-SVID written by spiffe-helper, a
projected token, a token a configuration agent drops), read again whenever the file changes.

The agent sends that file's token as it is; it never writes the file. A token that has expired means
the writer stopped: that is reported, and the agent keeps reading until a fresh one appears.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.identity.common import MAX_TOKEN, IdentityError, Token, token_from_jwt


@dataclass
class OidcFileProvider:
    path: str
    name: str = "oidc-file"
    clock: Callable[[], float] = time.time
    _stamp: tuple[int, int, int] | None = field(default=None, repr=False)
    _token: Token | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def where(self) -> str:
        return self.path

    def fetch(self) -> Token:
        try:
            st = os.stat(self.path)
            if st.st_size > MAX_TOKEN:
                raise IdentityError(f"{self.path}: {st.st_size} bytes, more than a token ({MAX_TOKEN})")
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            with self._lock:
                if stamp != self._stamp or self._token is None:
                    with open(self.path, encoding="utf-8") as f:
                        text = f.read(MAX_TOKEN + 1)
                    try:
                        self._token = token_from_jwt(text)
                    except IdentityError as exc:
                        raise IdentityError(f"{self.path}: {exc}") from None
                    self._stamp = stamp
                token = self._token
        except OSError as exc:
            raise IdentityError(f"cannot read the identity token {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise IdentityError(f"{self.path}: not a token (not UTF-8 text)") from None
        now = self.clock()
        if token.expiry <= now:
            raise IdentityError(f"{self.path}: the token expired at "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(token.expiry))}; "
                                "is the system that writes it still running?")
        return token
