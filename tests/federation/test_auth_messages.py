"""A refused write says what the caller sent: no token, a read-only token, or a wrong one."""

from __future__ import annotations

import pytest

from loraflight.errors import AuthError
from loraflight.federation.client import Client
from loraflight.testing import make_card


@pytest.mark.parametrize(
    ("read_tokens", "token", "message"),
    [
        ((), None, "no token was sent"),
        ((), "wrong-token", "not one of this node's write tokens"),
        (("read-secret",), "read-secret", "read-only token"),
    ],
)
def test_refused_write_says_what_was_sent(make_store, make_server, read_tokens, token, message):
    s = make_store()
    srv = make_server(s, write_tokens=["write-secret"], read_tokens=list(read_tokens))
    with Client(srv.location, token=token, retries=0) as c, pytest.raises(AuthError, match=message):
        c.publish(make_card("t", 1))
    with Client(srv.location, token=token, retries=0) as c, pytest.raises(AuthError, match=message):
        c.delete(name="t")
    assert len(s) == 0
