"""DestinationPolicy: default refusals, --deny, --allow-dest, and loops to ourselves."""

from __future__ import annotations

import pytest

from demux_proxy.errors import ConfigError, Forbidden, LoopDetected
from demux_proxy.policy import DestinationPolicy


def test_defaults_refuse_private_and_say_how_to_allow() -> None:
    p = DestinationPolicy()
    why = p.refusal("metadata", "169.254.169.254", 80)
    assert why is not None and "--allow-private" in why
    assert p.refusal("example.com", "93.184.216.34", 443) is None
    assert DestinationPolicy(allow_private=True).refusal("x", "10.0.0.1", 80) is None


def test_deny_wins_over_everything() -> None:
    p = DestinationPolicy(
        allow_private=True, deny=["*.blocked.test", "93.184.0.0/16"], allow_dest=["0.0.0.0/0"]
    )
    with pytest.raises(Forbidden, match=r"\*\.blocked\.test"):
        p.check_name("a.b.blocked.test")
    p.check_name("blocked.test")  # *.domain does not cover the domain itself
    assert p.refusal("x", "93.184.216.34", 443) == "denied by --deny 93.184.0.0/16"


def test_allow_dest_admits_only_what_it_names() -> None:
    p = DestinationPolicy(allow_dest=["api.example.com", "10.1.2.0/24"])
    assert p.refusal("api.example.com", "93.184.216.34", 443) is None
    assert p.refusal("other.example.com", "93.184.216.34", 443) == "not allowed by --allow-dest"
    # An allowed CIDR admits the private range it names, not the rest of private space.
    assert p.refusal("intranet", "10.1.2.7", 80) is None
    why = p.refusal("api.example.com", "10.9.9.9", 80)
    assert why is not None and "private" in why
    names_only = DestinationPolicy(allow_dest=["api.example.com"])
    with pytest.raises(Forbidden):
        names_only.check_name("evil.test")


def test_a_request_to_the_proxy_itself_is_a_loop() -> None:
    p = DestinationPolicy(allow_private=True)
    p.set_self({"127.0.0.1"}, 8080)
    with pytest.raises(LoopDetected):
        p.refusal("127.0.0.1", "127.0.0.1", 8080)
    with pytest.raises(LoopDetected):
        p.refusal("localhost", "::ffff:127.0.0.1", 8080)
    assert p.refusal("127.0.0.1", "127.0.0.1", 8081) is None


@pytest.mark.parametrize("bad", ["", "a b", "http://x/", "*", "user@host"])
def test_bad_rules_are_refused_at_start(bad: str) -> None:
    with pytest.raises(ConfigError):
        DestinationPolicy(deny=[bad])
