"""Client access control without sockets: credentials, auth files, networks, sessions, 407."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path

import argon2
import bcrypt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from demux_proxy import auth
from demux_proxy.auth import (
    ClientPolicy,
    basic_credentials,
    challenge_response,
    public_listen_refusal,
    split_session,
)
from demux_proxy.errors import ConfigError
from demux_proxy.http1.headers import Headers
from demux_proxy.http1.parser import find_head_end, parse_response_head

SECRET = "s3cr3t:with-colon"


def basic(user: str, password: str, *, scheme: bytes = b"Basic") -> Headers:
    token = base64.b64encode(f"{user}:{password}".encode())
    return [(b"Host", b"a.test"), (b"Proxy-Authorization", scheme + b" " + token)]


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def argon2_hash(password: str) -> str:
    return argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1).hash(password)


def file_policy(tmp_path: Path, text: str) -> ClientPolicy:
    path = tmp_path / "users"
    path.write_text(text, encoding="utf-8")
    return ClientPolicy.from_options([], path, [])


@pytest.fixture
def plain() -> ClientPolicy:
    return ClientPolicy.from_options([f"alice:{SECRET}", "bob:hunter2"], None, [])


# --- Basic credentials --------------------------------------------------------------


def test_plain_credentials_accept_and_refuse(plain: ClientPolicy) -> None:
    assert plain.auth_required and plain.restricted
    assert plain.check(basic("alice", SECRET)) == "alice"
    assert plain.check(basic("bob", "hunter2")) == "bob"
    assert plain.check(basic("alice", "hunter2")) is None
    assert plain.check(basic("alice", SECRET + "x")) is None
    assert plain.check(basic("alice", "")) is None
    assert plain.check(basic("carol", SECRET)) is None
    assert plain.check(basic("Alice", SECRET)) is None


def test_missing_header_wrong_scheme_and_bad_base64_are_refused(plain: ClientPolicy) -> None:
    good = base64.b64encode(f"alice:{SECRET}".encode())
    assert plain.check([(b"Host", b"a.test")]) is None
    assert plain.check([]) is None
    for value in (
        b"Bearer " + good,
        b"Digest " + good,
        b"Basic",
        b"Basic ",
        b"Basic " + good[:-1],  # padding missing
        b"Basic " + good + b"=",  # excess padding
        b"Basic " + good[:4] + b"*" + good[5:],  # outside the alphabet
        b"Basic " + good[:4] + b" " + good[4:],
        b"Basic YR==",  # "a" with non-zero padding bits: not canonical
        b"Basic " + base64.b64encode(b"alice"),  # no colon
        b"Basic " + base64.b64encode(b":" + SECRET.encode()),  # empty user-id
        b"Basic " + base64.b64encode(b"alice:\xff\xfe"),  # not UTF-8
        b"Basic" + good,
    ):
        assert plain.check([(b"Proxy-Authorization", value)]) is None, value


def test_scheme_and_field_name_are_case_insensitive(plain: ClientPolicy) -> None:
    token = base64.b64encode(f"alice:{SECRET}".encode())
    for name in (b"Proxy-Authorization", b"proxy-authorization", b"PROXY-AUTHORIZATION"):
        for scheme in (b"Basic", b"basic", b"BASIC", b"bAsIc"):
            assert plain.check([(name, scheme + b" " + token)]) == "alice"
    assert plain.check([(b"Proxy-Authorization", b"  Basic   " + token + b" ")]) == "alice"


def test_authorization_is_not_proxy_authorization(plain: ClientPolicy) -> None:
    token = base64.b64encode(f"alice:{SECRET}".encode())
    assert plain.check([(b"Authorization", b"Basic " + token)]) is None


def test_repeated_proxy_authorization_is_refused(plain: ClientPolicy) -> None:
    good = basic("alice", SECRET)[1]
    assert plain.check([good, good]) is None


def test_user_id_splits_at_the_first_colon() -> None:
    # The password may hold ':'; a user-id cannot, so "al:ice" is user "al".
    policy = ClientPolicy.from_options(["al:ice:pw"], None, [])
    assert policy.check(basic("al", "ice:pw")) == "al"
    assert basic_credentials(basic("al", "ice:pw")) == ("al", "ice:pw")
    # A client cannot send a user-id with ':': it is read as part of the password.
    assert basic_credentials(basic("al:ice", "pw")) == ("al", "ice:pw")
    assert policy.check(basic("al", "ice")) is None


def test_session_suffix_authenticates_the_user_before_it(plain: ClientPolicy) -> None:
    assert plain.check(basic("alice-session-abc", SECRET)) == "alice"
    assert plain.check(basic("alice-session-abc-ttl-60", SECRET)) == "alice"
    assert plain.check(basic("alice-session-", SECRET)) is None
    assert plain.check(basic("session-abc", SECRET)) is None


def test_without_credentials_check_is_always_empty() -> None:
    open_policy = ClientPolicy.from_options([], None, [])
    assert not open_policy.auth_required and not open_policy.restricted
    assert open_policy.check([]) == ""
    assert open_policy.check(basic("anyone", "anything")) == ""
    assert not open_policy.would_block(basic("anyone", "anything"))
    # The session id is still readable then, from the raw credentials.
    creds = basic_credentials(basic("session-xyz", ""))
    assert creds is not None
    assert split_session(creds[0]) == ("", "xyz", None)


@given(
    user=st.text(
        st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters=":"), min_size=1
    ).filter(lambda u: u == u.strip() and "-session-" not in u and not u.startswith("session-")),
    password=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1),
)
def test_any_user_and_password_round_trip(user: str, password: str) -> None:
    policy = ClientPolicy.from_options([f"{user}:{password}"], None, [])
    assert policy.check(basic(user, password)) == user
    assert policy.check(basic(user, password + "!")) is None


@given(st.binary(max_size=200))
def test_arbitrary_field_values_never_raise(value: bytes) -> None:
    policy = ClientPolicy.from_options(["alice:pw"], None, [])
    assert policy.check([(b"Proxy-Authorization", value)]) in (None, "alice")
    assert policy.check([(b"Proxy-Authorization", b"Basic " + value)]) in (None, "alice")


# --- auth file ----------------------------------------------------------------------


def test_auth_file_with_plain_bcrypt_and_argon2_lines(tmp_path: Path) -> None:
    b = bcrypt_hash("bcrypt-pw")
    text = (
        "\ufeff# users of the proxy\n"
        "\n"
        "plain:plain pw: with colon\n"
        "   # indented comment\n"
        f"bee:{b}\n"
        f"bee2a:$2a${b[4:]}\r\n"
        f"bee2y:$2y${b[4:]}   \n"
        f"argo:{argon2_hash('argon-pw')}\n"
    )
    policy = file_policy(tmp_path, text)
    assert policy.check(basic("plain", "plain pw: with colon")) == "plain"
    assert policy.check(basic("bee", "bcrypt-pw")) == "bee"
    assert policy.check(basic("bee2a", "bcrypt-pw")) == "bee2a"
    assert policy.check(basic("bee2y", "bcrypt-pw")) == "bee2y"
    assert policy.check(basic("argo", "argon-pw")) == "argo"
    for user in ("plain", "bee", "bee2a", "bee2y", "argo"):
        assert policy.check(basic(user, "wrong")) is None
    assert policy.check(basic("bee", "x" * 100)) is None  # over bcrypt's 72 bytes


def test_auth_file_and_auth_options_combine(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("carol:pw2\n")
    policy = ClientPolicy.from_options(["alice:pw1"], path, [])
    assert policy.check(basic("alice", "pw1")) == "alice"
    assert policy.check(basic("carol", "pw2")) == "carol"


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("alicePASSWORD-no-colon", "malformed line"),
        (":PASSWORD", "empty user name"),
        ("alice:", "empty password"),
        ("alice:PASSWORD\x07", "control character"),
        (" alice:PASSWORD", "whitespace"),
        ("alice-session-1:PASSWORD", "-session-"),
        ("session-1:PASSWORD", "-session-"),
        ("alice:$2b$12$PASSWORDtooshort", "malformed bcrypt hash"),
        ("alice:$argon2id$PASSWORD", "malformed argon2 hash"),
        ("alice:$apr1$PASSWORD$xyz", "unsupported password hash"),
        ("alice:{SHA}PASSWORD=", "unsupported password hash"),
    ],
)
def test_malformed_file_line_names_file_and_line_not_password(
    tmp_path: Path, line: str, what: str
) -> None:
    path = tmp_path / "users"
    path.write_text(f"# header\nbob:ok\n{line}\n")
    with pytest.raises(ConfigError) as info:
        ClientPolicy.from_options([], path, [])
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert what in message
    assert "PASSWORD" not in message


def test_auth_file_not_utf8_or_missing(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"alice:ok\nbob:\xff\xfePASSWORD\n")
    with pytest.raises(ConfigError, match=r"users:2: not valid UTF-8") as info:
        ClientPolicy.from_options([], path, [])
    assert "PASSWORD" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read --auth-file"):
        ClientPolicy.from_options([], tmp_path / "absent", [])


def test_duplicate_users_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--auth #2: user 'alice' is already defined"):
        ClientPolicy.from_options(["alice:PASSWORD1", "alice:PASSWORD2"], None, [])
    path = tmp_path / "users"
    path.write_text("alice:PASSWORD2\n")
    with pytest.raises(ConfigError, match=r"users:1: user 'alice' is already defined") as info:
        ClientPolicy.from_options(["alice:PASSWORD1"], path, [])
    assert "PASSWORD" not in str(info.value)
    path.write_text("bob:x\n\nbob:y\n")
    with pytest.raises(ConfigError, match=r"users:3: user 'bob' is already defined \(.*users:1\)"):
        ClientPolicy.from_options([], path, [])


def test_auth_option_without_colon_does_not_echo_it() -> None:
    with pytest.raises(ConfigError, match=r"--auth #1: expected USER:PASS") as info:
        ClientPolicy.from_options(["PASSWORDwithoutuser"], None, [])
    assert "PASSWORD" not in str(info.value)


def test_reprs_show_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"bee:{bcrypt_hash('PASSWORD3')}\n")
    policy = ClientPolicy.from_options(
        ["alice:PASSWORD1", "bob:PASSWORD2"], path, ["10.0.0.0/8", "2001:db8::/32"]
    )
    text = repr(policy)
    assert text == "ClientPolicy(users=3, allow_client=[10.0.0.0/8, 2001:db8::/32])"
    for shown in (repr(policy.credentials), *map(repr, policy.credentials.users.values())):
        assert "PASSWORD" not in shown and "$2b$" not in shown
        assert "alice" not in shown  # not even user names in the credentials' repr


# --- hash cache ---------------------------------------------------------------------


def counting(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> list[int]:
    calls = [0]
    real: Callable[..., bool] = getattr(obj, name)

    def wrapper(*args: object) -> bool:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def test_successful_hash_checks_are_cached_failures_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting(monkeypatch, bcrypt, "checkpw")
    verifications = counting(monkeypatch, auth, "_verify_hash")
    policy = file_policy(tmp_path, f"bee:{bcrypt_hash('bcrypt-pw')}\n")
    good = basic("bee", "bcrypt-pw")
    assert policy.would_block(good)
    assert policy.check(good) == "bee"
    assert calls[0] == 1
    assert not policy.would_block(good)
    for _ in range(5):
        assert policy.check(good) == "bee"
    assert policy.check(basic("bee-session-x-ttl-9", "bcrypt-pw")) == "bee"
    assert calls[0] == 1
    for _ in range(3):
        assert policy.check(basic("bee", "wrong")) is None
    assert calls[0] == verifications[0] == 4
    assert policy.would_block(basic("bee", "wrong"))
    # The cache remembers nothing that contains or is the plain password.
    for key in policy._cache:
        assert b"bcrypt-pw" not in key
        assert key != hashlib.sha256(b"bee:bcrypt-pw").digest()


def test_argon2_checks_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting(monkeypatch, auth, "_verify_hash")
    policy = file_policy(tmp_path, f"argo:{argon2_hash('argon-pw')}\n")
    for _ in range(3):
        assert policy.check(basic("argo", "argon-pw")) == "argo"
    assert calls[0] == 1
    assert policy.check(basic("argo", "nope")) is None
    assert calls[0] == 2


def test_cache_is_bounded_lru(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    path.write_text("".join(f"u{i}:{bcrypt_hash(f'pw{i}')}\n" for i in range(3)))
    base = ClientPolicy.from_options([], path, [])
    policy = ClientPolicy(base.credentials, cache_size=2)
    calls = counting(monkeypatch, bcrypt, "checkpw")
    assert policy.check(basic("u0", "pw0")) == "u0"
    assert policy.check(basic("u1", "pw1")) == "u1"
    assert policy.check(basic("u0", "pw0")) == "u0"  # u0 is now the most recent
    assert calls[0] == 2
    assert policy.check(basic("u2", "pw2")) == "u2"  # evicts u1
    assert calls[0] == 3
    assert policy.check(basic("u0", "pw0")) == "u0"
    assert calls[0] == 3
    assert policy.check(basic("u1", "pw1")) == "u1"
    assert calls[0] == 4


def test_plain_users_never_block(plain: ClientPolicy) -> None:
    assert not plain.would_block(basic("alice", SECRET))
    assert not plain.would_block(basic("alice", "wrong"))
    assert not plain.would_block(basic("nobody", SECRET))
    assert not plain.would_block([])


# --- refusals cost a hash verification once a user is hashed ------------------------


def mixed_policy(tmp_path: Path) -> ClientPolicy:
    """alice is plain (--auth), bee is bcrypt (--auth-file)."""
    path = tmp_path / "users"
    path.write_text(f"bee:{bcrypt_hash('bcrypt-pw')}\n")
    return ClientPolicy.from_options([f"alice:{SECRET}"], path, [])


def test_refusals_block_once_a_hashed_user_exists(tmp_path: Path) -> None:
    policy = mixed_policy(tmp_path)
    assert policy.would_block(basic("nobody", "anything"))
    assert policy.would_block(basic("nobody-session-x", SECRET))
    assert policy.would_block(basic("alice", "wrong"))
    assert not policy.would_block(basic("alice", SECRET))
    assert not policy.would_block([])  # no credentials offered: no user to tell apart


def test_every_refusal_runs_one_hash_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifications = counting(monkeypatch, auth, "_verify_hash")
    policy = mixed_policy(tmp_path)
    cases = [
        (basic("nobody", "anything"), None, 1),
        (basic("alice", "wrong"), None, 1),
        (basic("alice", SECRET), "alice", 0),
        (basic("bee", "wrong"), None, 1),
        (basic("bee", "bcrypt-pw"), "bee", 1),
        (basic("bee", "bcrypt-pw"), "bee", 0),  # cached
        (basic("nobody", "anything"), None, 1),  # refusals are never cached
        ([], None, 0),
    ]
    for headers, user, cost in cases:
        before = verifications[0]
        blocks = policy.would_block(headers)
        assert policy.check(headers) == user
        assert verifications[0] - before == cost, headers
        assert blocks == (cost == 1), headers  # would_block says exactly when check is slow


def test_unknown_user_is_refused_with_the_dummy_users_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results: list[bool] = []
    real = auth._verify_hash

    def spy(verifier: auth.Verifier, secret: bytes) -> bool:
        results.append(real(verifier, secret))
        return results[-1]

    monkeypatch.setattr(auth, "_verify_hash", spy)
    policy = mixed_policy(tmp_path)
    # bee's hash is the dummy: it matches, yet the unknown name is refused.
    assert policy.check(basic("nobody", "bcrypt-pw")) is None
    assert policy.check(basic("alice", "bcrypt-pw")) is None
    assert results == [True, True]
    assert policy.check(basic("bee", "bcrypt-pw")) == "bee"


def test_over_long_password_still_costs_a_bcrypt_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[int] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed_password: bytes) -> bool:
        result = real(password, hashed_password)  # raises past 72 bytes: not counted
        hashed.append(len(password))
        return result

    monkeypatch.setattr(bcrypt, "checkpw", spy)
    policy = mixed_policy(tmp_path)
    for user in ("bee", "nobody", "alice"):
        assert policy.would_block(basic(user, "x" * 100))
        assert policy.check(basic(user, "x" * 100)) is None
    assert hashed == [72, 72, 72]


def test_dummy_is_the_costliest_bcrypt_else_the_first_argon2(tmp_path: Path) -> None:
    b4, b5 = bcrypt_hash("pw4"), bcrypt.hashpw(b"pw5", bcrypt.gensalt(rounds=5)).decode()
    a1, a2 = argon2_hash("pw-a1"), argon2_hash("pw-a2")
    policy = file_policy(tmp_path, f"plain:pw\na1:{a1}\nb4:{b4}\nb5:{b5}\nb4bis:{b4}\n")
    assert policy._dummy is policy.credentials.users["b5"]
    policy = file_policy(tmp_path, f"plain:pw\na1:{a1}\na2:{a2}\n")
    assert policy._dummy is policy.credentials.users["a1"]
    assert file_policy(tmp_path, "plain:pw\n")._dummy is None


# --- client networks ----------------------------------------------------------------


def test_no_allow_client_allows_everyone(plain: ClientPolicy) -> None:
    assert plain.client_allowed("203.0.113.9")
    assert plain.client_allowed("2001:db8::1")
    assert plain.client_allowed("not an address")


def test_allow_client_v4_v6_and_mapped() -> None:
    policy = ClientPolicy.from_options(
        [], None, ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::ffff:198.51.100.0/120"]
    )
    assert policy.restricted and not policy.auth_required
    assert policy.check([]) == ""
    assert policy.client_allowed("10.1.2.3")
    assert policy.client_allowed("192.0.2.7")
    assert not policy.client_allowed("192.0.2.8")
    assert not policy.client_allowed("11.0.0.1")
    assert policy.client_allowed("2001:db8::1")
    assert policy.client_allowed("2001:db8:ffff::1%eth0")
    assert not policy.client_allowed("2001:db9::1")
    # A dual-stack listener reports IPv4 peers as IPv4-mapped IPv6.
    assert policy.client_allowed("::ffff:10.9.9.9")
    assert not policy.client_allowed("::ffff:11.0.0.1")
    # An --allow-client written as mapped IPv6 is the IPv4 network it names.
    assert policy.client_allowed("198.51.100.200")
    assert policy.client_allowed("::ffff:198.51.100.1")
    assert not policy.client_allowed("198.51.101.1")
    assert not policy.client_allowed("")
    assert not policy.client_allowed("localhost")


def test_bad_allow_client_values() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 10\.0\.0\.0/8"):
        ClientPolicy.from_options([], None, ["10.0.0.1/8"])
    for bad in ("10.0.0.0/33", "example.com", "", "10.0.0.0/8,10.1.0.0/16"):
        with pytest.raises(ConfigError, match="--allow-client"):
            ClientPolicy.from_options([], None, [bad])


# --- listening publicly -------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LocalHost.", "::ffff:127.0.0.1"],
)
def test_loopback_listen_is_never_refused(host: str) -> None:
    assert public_listen_refusal(host, ClientPolicy.from_options([], None, [])) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "2001:db8::1", "proxy.example", ""])
def test_public_listen_needs_auth_or_allow_client(host: str) -> None:
    reason = public_listen_refusal(host, ClientPolicy.from_options([], None, []))
    assert reason is not None
    assert "\n" not in reason
    assert "--auth" in reason and "--allow-client" in reason
    assert public_listen_refusal(host, ClientPolicy.from_options(["a:b"], None, [])) is None
    assert public_listen_refusal(host, ClientPolicy.from_options([], None, ["0.0.0.0/0"])) is None


# --- sessions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        ("alice-session-abc-ttl-60", ("alice", "abc", 60)),
        ("alice-session-abc", ("alice", "abc", None)),
        ("session-xyz", ("", "xyz", None)),
        ("session-xyz-ttl-5", ("", "xyz", 5)),
        ("bob", ("bob", None, None)),
        ("", ("", None, None)),
        ("a-session-", ("a-session-", None, None)),
        ("session-", ("session-", None, None)),
        ("a-session-x-session-y", ("a", "x-session-y", None)),
        ("a-session-x-ttl-0", ("a", "x-ttl-0", None)),
        ("a-session-x-ttl-", ("a", "x-ttl-", None)),
        ("a-session-x-ttl-1e3", ("a", "x-ttl-1e3", None)),
        ("a-session--ttl-30", ("a", "-ttl-30", None)),
        ("a-session-ttl-30", ("a", "ttl-30", None)),
        ("a-session-x-ttl-9" + "9" * 20, ("a", "x-ttl-9" + "9" * 20, None)),
        ("a-session-x-ttl-5-ttl-6", ("a", "x-ttl-5", 6)),
    ],
)
def test_split_session(username: str, expected: tuple[str, str | None, int | None]) -> None:
    assert split_session(username) == expected


# --- 407 ----------------------------------------------------------------------------


def test_challenge_response_is_a_valid_keep_alive_407() -> None:
    raw = challenge_response()
    end = find_head_end(raw, 64 * 1024, request=False)
    assert end > 0
    head = parse_response_head(raw[:end])
    assert head.status == 407
    assert head.reason == b"Proxy Authentication Required"
    assert head.keep_alive
    assert head.content_length == len(raw) - end
    fields = {name.lower(): value for name, value in head.headers}
    assert fields[b"proxy-authenticate"] == b'Basic realm="demux-proxy", charset="UTF-8"'
    assert fields[b"content-type"].startswith(b"text/plain")
    assert b"connection" not in fields


def test_challenge_realm_is_quoted() -> None:
    raw = challenge_response('my "proxy" \\ here')
    head = parse_response_head(raw[: find_head_end(raw, 65536, request=False)])
    value = dict((n.lower(), v) for n, v in head.headers)[b"proxy-authenticate"]
    assert value == b'Basic realm="my \\"proxy\\" \\\\ here", charset="UTF-8"'
    with pytest.raises(ValueError):
        challenge_response("bad\r\nInjected: yes")
