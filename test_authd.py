"""Core test suite for authd (issue 2): every row of SPEC.md against a real authd.py subprocess.

Layout follows the SPEC: settings, HTTP interface, token, users file, command line,
robustness; then interoperability (PyJWT, libpass), the standard-library-only check and
tests of authd's pure functions. Most tests share one server (``srv``); tests that
change users, settings or rate-limit state start their own (the ``authd`` fixture).
No timing assertions: where authd needs a moment (the users file is re-read by mtime at
most about once a second) the tests poll with a bounded loop.
"""
import ast
import base64
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import (AUTHD, SECRET, Authd, b64u_decode, cookie_attrs, fast_hash, free_port, need,
                      raw_request, run_cli, wait_until, write_users)

import jwt  # noqa: E402  (test-only dependency)
from passlib.hash import scrypt as passlib_scrypt  # noqa: E402  (test-only dependency)

P = "/__auth"
SECRET2 = "second-secret-ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SCRYPT_RE = re.compile(r"^\$scrypt\$ln=17,r=8,p=1\$[A-Za-z0-9+/.]+={0,2}\$[A-Za-z0-9+/.]+={0,2}$")

# Users of the shared server. Cheap libpass hashes keep the suite fast.
PW = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw",
      '<i>&"x\'': "odd-pw"}
ODD = '<i>&"x\''


def shared_users():
    return [
        "# shared test users",
        "alice:%s:staff" % fast_hash(PW["alice"]),
        "bob:%s:admin,ops" % fast_hash(PW["bob"]),
        "carol:%s:dev,ops" % fast_hash(PW["carol"]),
        "dave:%s" % fast_hash(PW["dave"]),
        "%s:%s" % (ODD, fast_hash(PW[ODD])),
    ]


# --------------------------------------------------------------------------- helpers

def claims_of(token, secret=SECRET):
    return jwt.decode(token, secret, algorithms=["HS256"])


def remint(token, secret=SECRET, drop=(), **changes):
    """Decode a real cookie, change claims, sign again with PyJWT (contract recipe)."""
    claims = claims_of(token, secret)
    claims.update(changes)
    for k in drop:
        claims.pop(k, None)
    return jwt.encode(claims, secret, algorithm="HS256")


def auth_cookie_header(resp, name="authToken"):
    for v in resp.header_values("set-cookie"):
        if v.strip().startswith(name + "="):
            return v
    return None


def is_clearing(set_cookie):
    name, value, attrs = cookie_attrs(set_cookie)
    if attrs.get("max-age") is not None and attrs.get("max-age") is not True:
        if int(attrs["max-age"]) <= 0:
            return True
    if "expires" in attrs:
        from email.utils import parsedate_to_datetime
        try:
            return parsedate_to_datetime(attrs["expires"]).timestamp() < time.time()
        except (TypeError, ValueError):
            return False
    return False


def line_ref(path, n):
    """Regex: an error that names the file and line n ('users.txt:3', 'users.txt, line 3')."""
    return re.escape(Path(path).name) + r"\D{0,12}\b%d\b" % n


def assert_no_traceback(text):
    assert "Traceback" not in text, text


def _cli(tmp_path, *args, input=None, env=None):
    """`authd.py ARGS` on tmp_path's users file."""
    environ = {"AUTH_USERS_FILE": str(tmp_path / "users.txt"), "AUTH_TOKEN_SECRET": SECRET}
    environ.update(env or {})
    return run_cli(*args, input=input, env=environ, cwd=str(tmp_path))


def start_fails(tmp_path, users_lines, env=None, port_flag=True):
    """Start `authd.py serve` expecting it to refuse; returns (rc, combined output)."""
    write_users(tmp_path / "users.txt", users_lines)
    env_file = tmp_path / ".env"
    if not env_file.exists():
        env_file.write_text("")
    port = ["--port", "0"] if port_flag else []
    cp = _cli(tmp_path, "serve", "--users", tmp_path / "users.txt", "--env", env_file, *port, env=env)
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0, "authd started although it should have refused:\n" + out
    assert "listening on" not in out, out
    assert_no_traceback(out)
    lines = [l for l in out.splitlines() if l.strip()]
    assert 1 <= len(lines) <= 3, "expected a short error, one line per problem:\n" + out
    return cp.returncode, out


# --------------------------------------------------------------------------- shared server

@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = Authd(tmp_path_factory.mktemp("shared"), users=shared_users(),
              env={"AUTH_LOGIN_RATE": "100000/900"})
    yield d
    d.stop()


@pytest.fixture(scope="module")
def tokens(srv):
    return {name: srv.login(name, pw) for name, pw in PW.items()}


# =========================================================================== settings

def test_default_start_needs_no_setup(tmp_path, authd):
    """`python3 authd.py` alone: 127.0.0.1:3003, secret file created 0600, hint to add a user."""
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", 3003))
        free = True
    except OSError:
        free = False
    finally:
        probe.close()
    need(free, "port 3003 is busy on this machine")
    script = tmp_path / "authd.py"
    shutil.copy(str(AUTHD), str(script))
    d = authd(command=[], secret=None, script=script)
    assert (d.host, d.port) == ("127.0.0.1", 3003), d.log()
    d.healthy()
    secret_file = tmp_path / ".authd_secret"
    assert secret_file.exists(), d.log()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert re.search(r"adduser", d.log()), "no hint on how to add a user:\n" + d.log()
    assert_no_traceback(d.log())


def test_auth_host_env_and_host_flag(authd):
    d = authd(users=["alice:" + fast_hash("pw")], env={"AUTH_HOST": "127.0.0.2"})
    assert d.host == "127.0.0.2", d.log()
    d.healthy()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", d.port), timeout=2).close()
    d.stop()
    # the flag wins over the environment
    d = authd(args=["--port", "0", "--host", "127.0.0.1"], env={"AUTH_HOST": "127.0.0.2"})
    assert d.host == "127.0.0.1", d.log()
    d.healthy()


def test_auth_port_precedence_flag_env_dotenv(tmp_path, authd):
    write_users(tmp_path / "users.txt", ["alice:" + fast_hash("pw")])
    p_dotenv, p_env = free_port(), free_port()
    while p_env == p_dotenv:
        p_env = free_port()
    (tmp_path / ".env").write_text("AUTH_PORT=%d\n" % p_dotenv)
    d = authd(args=())
    assert d.port == p_dotenv, d.log()            # .env beats the default
    d.healthy()
    d.stop()
    d = authd(args=(), env={"AUTH_PORT": str(p_env)})
    assert d.port == p_env, d.log()               # environment beats .env
    d.healthy()
    d.stop()
    d = authd(env={"AUTH_PORT": str(p_env)})
    assert d.port not in (p_env, p_dotenv), d.log()   # flag beats environment
    d.healthy()


def test_users_file_precedence_flag_env_dotenv(tmp_path, authd):
    files = {}
    for who in ("flag", "env", "dotenv"):
        files[who] = write_users(tmp_path / ("users-%s.txt" % who), [who + ":" + fast_hash("pw")])
    env_file = tmp_path / ".env"
    env_file.write_text("AUTH_USERS_FILE=%s\n" % files["dotenv"])

    def who_logs_in(d):
        return [n for n in ("flag", "env", "dotenv")
                if d.request("POST", P + "/login",
                             body={"username": n, "password": "pw"}).status == 200]

    d = authd(command=["--env", env_file, "--port", "0"])
    assert who_logs_in(d) == ["dotenv"]
    d.stop()
    d = authd(command=["--env", env_file, "--port", "0"], env={"AUTH_USERS_FILE": str(files["env"])})
    assert who_logs_in(d) == ["env"]
    d.stop()
    d = authd(command=["--env", env_file, "--port", "0", "--users", files["flag"]],
              env={"AUTH_USERS_FILE": str(files["env"])})
    assert who_logs_in(d) == ["flag"]


def test_dotenv_parsing_quotes_export_comments_unknown_key(tmp_path, authd):
    (tmp_path / ".env").write_text(
        "# a comment line\n"
        "\n"
        "export AUTH_COOKIE_NAME=\"dq_cookie\"\n"
        "AUTH_COOKIE_SAMESITE='Strict'\n"
        "   # indented comment\n"
        "AUTH_BYPASS=\"by#pass value, 32 characters or more\"\n"
        "AUTH_EXPIRY_DAYS=2\n"
        "AUTH_BOGUS_KEY=1\n"
        "NODE_ENV=production\n")
    d = authd(users=["alice:" + fast_hash("pw")])
    r = d.request("POST", P + "/login", body={"username": "alice", "password": "pw"})
    assert r.status == 200, r
    sc = auth_cookie_header(r, "dq_cookie")
    assert sc, r
    _, token, attrs = cookie_attrs(sc)
    assert attrs.get("samesite", "").lower() == "strict"
    c = claims_of(token)
    assert abs((c["exp"] - c["iat"]) - 2 * 86400) <= 2
    assert d.request("GET", P + "/auth", headers={"X-Auth-Bypass": "by#pass value, 32 characters or more"}).status == 200
    assert d.request("GET", P + "/auth", headers={"X-Auth-Bypass": "by"}).status == 401
    warn = [l for l in d.log().splitlines() if "AUTH_BOGUS_KEY" in l]
    assert warn, "no warning about the unknown AUTH_ key:\n" + d.log()
    assert "NODE_ENV" not in d.log()


@pytest.mark.parametrize("key,value", [
    ("AUTH_EXPIRY_DAYS", "abc"),
    ("AUTH_MAX_AGE_DAYS", "-1"),
    ("AUTH_PORT", "notaport"),
    ("AUTH_PORT", "70000"),
    ("AUTH_LOGIN_RATE", "15 per 900"),
    ("AUTH_COOKIE_SECURE", "maybe"),
    ("AUTH_COOKIE_SAMESITE", "Sometimes"),
    ("AUTH_PREFIX", "no-leading-slash"),
])
def test_malformed_setting_in_dotenv_is_an_error_naming_the_key(tmp_path, key, value):
    (tmp_path / ".env").write_text("%s=%s\n" % (key, value))
    # (--port on the command line would rightly beat a bad AUTH_PORT in .env)
    rc, out = start_fails(tmp_path, ["alice:" + fast_hash("pw")], port_flag=(key != "AUTH_PORT"))
    assert key in out, out


def test_malformed_setting_in_environment_names_the_key(tmp_path):
    rc, out = start_fails(tmp_path, ["alice:" + fast_hash("pw")], env={"AUTH_EXPIRY_DAYS": "7d"})
    assert "AUTH_EXPIRY_DAYS" in out


def test_environment_beats_dotenv_beats_default(tmp_path, authd):
    (tmp_path / ".env").write_text("AUTH_COOKIE_NAME=from_dotenv\nAUTH_COOKIE_SAMESITE=Strict\n")
    d = authd(users=["alice:" + fast_hash("pw")], env={"AUTH_COOKIE_NAME": "from_env"})
    r = d.request("POST", P + "/login", body={"username": "alice", "password": "pw"})
    assert auth_cookie_header(r, "from_env"), r
    assert auth_cookie_header(r, "from_dotenv") is None
    _, _, attrs = cookie_attrs(auth_cookie_header(r, "from_env"))
    assert attrs.get("samesite", "").lower() == "strict"      # .env beats default Lax


@pytest.mark.parametrize("secrets", ["too-short-secret", SECRET + ",short"])
def test_short_secret_is_refused_with_a_hint(tmp_path, secrets):
    rc, out = start_fails(tmp_path, ["alice:" + fast_hash("pw")], env={"AUTH_TOKEN_SECRET": secrets})
    assert "32" in out, out
    assert re.search(r"openssl|secrets|token_urlsafe|token_hex|urandom|generate", out, re.I), out
    assert len([l for l in out.splitlines() if l.strip()]) <= 3, "not a short error:\n" + out


def test_secret_file_created_0600_and_reused(tmp_path, authd):
    d = authd(users=["alice:" + fast_hash("pw")], secret=None)
    secret_file = tmp_path / ".authd_secret"
    assert secret_file.exists(), d.log()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    content = secret_file.read_bytes()
    assert len(content.strip()) >= 32
    token = d.login("alice", "pw")
    assert d.auth(token).status == 200
    d.stop()
    d2 = authd(secret=None)
    assert secret_file.read_bytes() == content
    assert d2.auth(token).status == 200, "secret not reused across restarts"


def test_secret_file_setting(tmp_path, authd):
    target = tmp_path / "elsewhere.key"
    d = authd(users=["alice:" + fast_hash("pw")], secret=None,
              env={"AUTH_SECRET_FILE": str(target)})
    assert target.exists() and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not (tmp_path / ".authd_secret").exists()
    assert d.auth(d.login("alice", "pw")).status == 200


@pytest.mark.parametrize("sep", [",", " ", ", "])
def test_key_rotation_first_signs_all_verify(tmp_path, authd, sep):
    users = ["alice:" + fast_hash("pw")]
    old = authd(users=users, secret=SECRET2)
    old_token = old.login("alice", "pw")
    old.stop()
    d = authd(secret=SECRET + sep + SECRET2)
    assert d.auth(old_token).status == 200, "token signed by the second secret must verify"
    new_token = d.login("alice", "pw")
    claims_of(new_token, SECRET)                      # signed by the first
    with pytest.raises(jwt.InvalidSignatureError):
        claims_of(new_token, SECRET2)
    assert d.auth(new_token).status == 200
    # a key that is in neither position fails
    third = "third-secret-0000000000000000000000000000000000"
    assert d.auth(jwt.encode(claims_of(new_token), third, algorithm="HS256")).status == 401


def test_bypass_header_equal_to_the_setting_is_let_through_without_identity(tmp_path, authd):
    bypass = "let-me-in-0123-at-least-32-characters"
    d = authd(users=["alice:" + fast_hash("pw")], env={"AUTH_BYPASS": bypass})
    r = d.request("GET", P + "/auth", headers={"X-Auth-Bypass": bypass})
    assert r.status == 200 and r.body == b""
    assert "x-auth-user" not in r.headers
    assert d.request("GET", P + "/admin", headers={"X-Auth-Bypass": bypass}).status == 200
    for wrong in (bypass[:-1], bypass + "4", bypass.upper(), ""):
        assert d.request("GET", P + "/auth", headers={"X-Auth-Bypass": wrong}).status == 401


def test_bypass_empty_means_off(tmp_path, authd):
    d = authd(users=["alice:" + fast_hash("pw")], env={"AUTH_BYPASS": ""})
    assert d.request("GET", P + "/auth", headers={"X-Auth-Bypass": ""}).status == 401
    assert d.request("GET", P + "/auth").status == 401


def test_expiry_days_fraction(tmp_path, authd):
    d = authd(users=["alice:" + fast_hash("pw")], env={"AUTH_EXPIRY_DAYS": "0.5"})
    r = d.request("POST", P + "/login", body={"username": "alice", "password": "pw"})
    c = claims_of(r.cookie())
    assert abs((c["exp"] - c["iat"]) - 43200) <= 2, c
    _, _, attrs = cookie_attrs(auth_cookie_header(r))
    if "max-age" in attrs:
        assert abs(int(attrs["max-age"]) - 43200) <= 2, attrs


def test_max_age_days(tmp_path, authd):
    d = authd(users=["alice:" + fast_hash("pw")], env={"AUTH_MAX_AGE_DAYS": "0.5"})
    tok = d.login("alice", "pw")
    now = int(time.time())
    assert "auth_time" in claims_of(tok)
    young = remint(tok, auth_time=now - 11 * 3600, iat=now - 10)
    old = remint(tok, auth_time=now - 13 * 3600, iat=now - 10)
    assert d.auth(young).status == 200
    r = d.auth(old)
    assert r.status == 401, r
    # refreshing never extends the absolute limit: the refreshed token keeps auth_time
    r = d.auth(remint(tok, auth_time=now - 11 * 3600, iat=now - 120))
    assert r.status == 200 and r.cookie()
    assert claims_of(r.cookie())["auth_time"] == now - 11 * 3600


def test_max_age_zero_is_unlimited(tmp_path, authd):
    d = authd(users=["alice:" + fast_hash("pw")], env={"AUTH_MAX_AGE_DAYS": "0"})
    tok = d.login("alice", "pw")
    now = int(time.time())
    assert d.auth(remint(tok, auth_time=now - 400 * 86400, iat=now - 10)).status == 200


def test_max_age_default_30_days(srv, tokens):
    now = int(time.time())
    tok = tokens["alice"]
    assert srv.auth(remint(tok, auth_time=now - 29 * 86400, iat=now - 10)).status == 200
    assert srv.auth(remint(tok, auth_time=now - 31 * 86400, iat=now - 10)).status == 401


def test_cookie_settings_name_secure_domain_samesite(tmp_path, authd):
    d = authd(users=["alice:" + fast_hash("pw")], env={
        "AUTH_COOKIE_NAME": "sid", "AUTH_COOKIE_SECURE": "false",
        "AUTH_COOKIE_DOMAIN": "example.test", "AUTH_COOKIE_SAMESITE": "Strict"})
    r = d.request("POST", P + "/login", body={"username": "alice", "password": "pw"})
    sc = auth_cookie_header(r, "sid")
    assert sc and auth_cookie_header(r, "authToken") is None, r
    name, token, attrs = cookie_attrs(sc)
    assert "secure" not in attrs
    assert attrs.get("domain", "").lstrip(".") == "example.test"
    assert attrs.get("samesite", "").lower() == "strict"
    assert d.request("GET", P + "/auth", headers={"Cookie": "sid=" + token}).status == 200
    assert d.request("GET", P + "/auth", headers={"Cookie": "authToken=" + token}).status == 401
    out = d.request("GET", P + "/logout", headers={"Cookie": "sid=" + token})
    clear = auth_cookie_header(out, "sid")
    assert clear and is_clearing(clear), out
    _, _, cattrs = cookie_attrs(clear)
    assert cattrs.get("domain", "").lstrip(".") == "example.test"
    assert cattrs.get("path") == attrs.get("path")


def test_prefix_setting(tmp_path, authd):
    d = authd(users=["alice:" + fast_hash("pw")], env={"AUTH_PREFIX": "/sso"})
    assert d.request("GET", "/sso/healthz").status == 200
    r = d.request("POST", "/sso/login", body={"username": "alice", "password": "pw"})
    assert r.status == 200
    assert d.request("GET", "/sso/auth", headers={"Cookie": "authToken=" + r.cookie()}).status == 200
    assert d.request("GET", P + "/healthz").status == 404
    r = d.request("GET", "/sso/")
    assert r.status == 303 and r.headers["location"].startswith("/sso/login"), r
    r = d.request("GET", "/sso/logout")
    assert r.status == 303 and r.headers["location"].startswith("/sso/login"), r


def test_login_rate_success_refunds(tmp_path, authd):
    d = authd(users=["bob:" + fast_hash("pw")], env={"AUTH_LOGIN_RATE": "3/900"})
    ip = {"X-Real-IP": "10.1.0.1"}

    def attempt(pw):
        return d.request("POST", P + "/login", headers=ip,
                         body={"username": "bob", "password": pw}).status

    assert [attempt("x"), attempt("x"), attempt("pw"), attempt("x"), attempt("x")] == \
        [401, 401, 200, 401, 429]


def test_failed_login_log_line_for_fail2ban(tmp_path, authd):
    d = authd(users=["alice:" + fast_hash("pw")])
    d.request("POST", P + "/login", headers={"X-Real-IP": "192.0.2.7"},
              body={"username": "alice", "password": "wrong"})
    d.wait_log(r'login failed from 192\.0\.2\.7 user="alice"')
    # a hostile name cannot forge a log line or break the quoting
    d.request("POST", P + "/login", headers={"X-Real-IP": "192.0.2.8"},
              body={"username": 'ev"il\nlogin failed from 6.6.6.6 user="x', "password": "w"})
    d.wait_log(r'login failed from 192\.0\.2\.8 user="ev\\"il\\n')
    assert not re.search(r"(?m)^(<\d>)?(authd: )?login failed from 6\.6\.6\.6", d.log()), d.log()
    d.healthy()


# =========================================================================== HTTP: P/auth

def test_auth_valid_cookie(srv, tokens):
    r = srv.auth(tokens["alice"])
    assert r.status == 200 and r.body == b"", r
    assert r.headers["x-auth-user"] == "alice"
    assert r.headers["x-auth-groups"] == "staff"
    assert r.headers["x-auth-admin"] == "false"
    assert auth_cookie_header(r) is None, "a fresh token must not be refreshed"
    r = srv.auth(tokens["bob"])
    assert r.status == 200
    assert set(r.headers["x-auth-groups"].split(",")) == {"admin", "ops"}
    assert r.headers["x-auth-admin"] == "true"
    r = srv.auth(tokens["dave"])
    assert r.status == 200 and r.headers.get("x-auth-groups") == ""
    assert r.headers["x-auth-admin"] == "false"


def test_auth_any_method(srv, tokens):
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
        r = srv.request(method, P + "/auth", headers={"Cookie": "authToken=" + tokens["alice"]})
        assert r.status == 200, (method, r)
        r = srv.request(method, P + "/auth")
        assert r.status == 401, (method, r)
        r = srv.request(method, P + "/admin", headers={"Cookie": "authToken=" + tokens["alice"]})
        assert r.status == 403, (method, r)


def test_auth_no_cookie_is_401_without_set_cookie(srv):
    r = srv.request("GET", P + "/auth")
    assert r.status == 401 and r.body == b""
    assert not r.header_values("set-cookie"), r


def test_auth_invalid_cookie_is_401_and_cleared(srv, tokens):
    r = srv.auth("garbage")
    assert r.status == 401 and r.body == b""
    sc = auth_cookie_header(r)
    assert sc and is_clearing(sc), r
    _, _, attrs = cookie_attrs(sc)
    assert attrs.get("path") == "/"


def test_auth_cookie_among_others(srv, tokens):
    r = srv.request("GET", P + "/auth", headers={
        "Cookie": "theme=dark; authToken=%s; other=1; x=\"q\"" % tokens["alice"]})
    assert r.status == 200 and r.headers["x-auth-user"] == "alice"


def test_admin_is_200_for_admins_403_for_other_users_401_without_a_valid_token(srv, tokens):
    assert srv.auth(tokens["bob"], P + "/admin").status == 200
    r = srv.auth(tokens["alice"], P + "/admin")
    assert r.status == 403 and r.body == b""
    assert srv.auth(None, P + "/admin").status == 401
    r = srv.auth("x.y.z", P + "/admin")
    assert r.status == 401 and auth_cookie_header(r)


@pytest.mark.parametrize("query,allowed", [
    ("group=staff", {"alice"}),
    ("group=ops", {"bob", "carol"}),
    ("group=dev,staff", {"alice", "carol"}),
    ("user=carol", {"carol"}),
    ("user=dave,alice", {"alice", "dave"}),
    ("group=staff&user=dave", {"alice", "dave"}),
    ("group=nobody", set()),
    ("group=admin", {"bob"}),
])
def test_auth_group_and_user_rules(srv, tokens, query, allowed):
    for name in ("alice", "bob", "carol", "dave"):
        r = srv.auth(tokens[name], P + "/auth?" + query)
        assert r.status == (200 if name in allowed else 403), (query, name, r)
    assert srv.auth(None, P + "/auth?" + query).status == 401


def test_admin_with_rules(srv, tokens):
    assert srv.auth(tokens["bob"], P + "/admin?group=ops").status == 200
    assert srv.auth(tokens["carol"], P + "/admin?group=ops").status == 403


def test_sliding_refresh(srv, tokens):
    tok = tokens["alice"]
    now = int(time.time())
    fresh = remint(tok, iat=now - 30, auth_time=now - 30)
    r = srv.auth(fresh)
    assert r.status == 200 and auth_cookie_header(r) is None, r
    aged = remint(tok, iat=now - 120, auth_time=now - 200, exp=now + 3600)
    r = srv.auth(aged)
    assert r.status == 200, r
    new = r.cookie()
    assert new and new != aged, r
    c = claims_of(new)
    assert c["sub"] == "alice"
    assert c["iat"] >= now - 5
    assert c["exp"] >= int(time.time()) + 7 * 86400 - 60
    assert c["auth_time"] == now - 200, "refresh keeps the time the password was typed"
    _, _, attrs = cookie_attrs(auth_cookie_header(r))
    assert "httponly" in attrs and "secure" in attrs and attrs.get("path") == "/"
    assert srv.auth(new).status == 200
    # the admin endpoint refreshes too
    r = srv.auth(remint(tokens["bob"], iat=now - 120, auth_time=now - 120, exp=now + 3600), P + "/admin")
    assert r.status == 200 and r.cookie()


# =========================================================================== HTTP: login

def test_login_page_is_a_scriptless_form_keeping_the_return_target(srv):
    r = srv.request("GET", P + "/login?rd=/app/page%3Fx%3D1", headers={"Host": "intranet.example"})
    assert r.status == 200, r
    assert r.headers["content-type"].startswith("text/html")
    body = r.body.decode()
    assert re.search(r'<form[^>]*method="?post', body, re.I)
    assert re.search(r'action="%s/login(\?[^"]*)?"' % re.escape(P), body), body
    assert re.search(r'name="?username', body) and re.search(r'name="?password', body)
    assert re.search(r'type="?hidden"?[^>]*name="?rd"?|name="?rd"?[^>]*type="?hidden', body), body
    assert 'value="/app/page?x=1"' in body, body
    assert "intranet.example" in body
    assert "<script" not in body.lower()


def test_login_page_target_is_rd_else_x_original_uri(srv):
    r = srv.request("GET", P + "/login", headers={"X-Original-URI": "/reports/q3?full=1"})
    assert r.status == 200
    assert 'value="/reports/q3?full=1"' in r.body.decode()
    r = srv.request("GET", P + "/login?rd=/from-query", headers={"X-Original-URI": "/from-header"})
    assert 'value="/from-query"' in r.body.decode()


def test_logged_in_user_is_sent_to_target(srv, tokens):
    r = srv.request("GET", P + "/login?rd=/dash", headers={"Cookie": "authToken=" + tokens["alice"]})
    assert r.status == 303 and r.headers["location"] == "/dash", r
    r = srv.request("GET", P + "/login", headers={"Cookie": "authToken=" + tokens["alice"],
                                                  "X-Original-URI": "/x?y=1"})
    assert r.status == 303 and r.headers["location"] == "/x?y=1", r
    r = srv.request("GET", P + "/login", headers={"Cookie": "authToken=garbage"})
    assert r.status == 200, "an invalid cookie shows the form"


def test_form_login_success(srv):
    body = urllib.parse.urlencode({"username": "alice", "password": PW["alice"],
                                   "rd": "/app/x?a=1&b=2"}).encode()
    r = srv.request("POST", P + "/login", headers=FORM, body=body)
    assert r.status == 303, r
    assert r.headers["location"] == "/app/x?a=1&b=2"
    tok = r.cookie()
    assert tok and claims_of(tok)["sub"] == "alice"
    assert srv.auth(tok).status == 200


def test_form_login_without_rd_goes_to_root(srv):
    body = urllib.parse.urlencode({"username": "alice", "password": PW["alice"]}).encode()
    r = srv.request("POST", P + "/login", headers=FORM, body=body)
    assert r.status == 303 and r.headers["location"] == "/"


def test_form_login_wrong_password(srv):
    body = urllib.parse.urlencode({"username": "alice", "password": "nope", "rd": "/keep"}).encode()
    r = srv.request("POST", P + "/login", headers=FORM, body=body)
    assert r.status == 401, r
    assert r.headers["content-type"].startswith("text/html")
    text = r.body.decode()
    assert "Invalid user name or password" in text
    assert 'value="/keep"' in text, "the return target survives a failed attempt"
    assert r.cookie() is None


def test_form_login_unknown_user(srv):
    body = urllib.parse.urlencode({"username": "nobody-here", "password": "x"}).encode()
    r = srv.request("POST", P + "/login", headers=FORM, body=body)
    assert r.status == 401 and b"Invalid user name or password" in r.body
    assert r.cookie() is None


def test_json_login(srv):
    r = srv.request("POST", P + "/login", body={"username": "carol", "password": PW["carol"]})
    assert r.status == 200, r
    assert r.json() == {"status": "ok", "user": "carol"}
    assert r.headers["content-type"].startswith("application/json")
    assert srv.auth(r.cookie()).status == 200


def test_json_login_with_charset(srv):
    r = srv.request("POST", P + "/login", headers={"Content-Type": "application/json; charset=utf-8"},
                    body=json.dumps({"username": "carol", "password": PW["carol"]}).encode())
    assert r.status == 200 and r.cookie()


def test_json_login_wrong(srv):
    r = srv.request("POST", P + "/login", body={"username": "carol", "password": "bad"})
    assert r.status == 401
    assert r.json() == {"status": "fail", "message": "Invalid credentials"}
    assert r.cookie() is None


def test_cookie_attributes_by_default(srv):
    """With no AUTH_COOKIE_* settings at all: HttpOnly, SameSite=Lax, Path=/, Secure."""
    r = srv.request("POST", P + "/login", body={"username": "alice", "password": PW["alice"]})
    (sc,) = r.header_values("set-cookie")
    name, value, attrs = cookie_attrs(sc)
    assert name == "authToken" and len(value) > 10
    assert attrs.get("path") == "/"
    assert "httponly" in attrs
    assert "secure" in attrs
    assert attrs.get("samesite") == "Lax"
    assert "domain" not in attrs
    assert "max-age" in attrs or "expires" in attrs
    if "max-age" in attrs:
        assert abs(int(attrs["max-age"]) - 7 * 86400) <= 2


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example", "Host": "site.example"},
    {"Origin": "https://site.example.evil.example", "Host": "site.example"},
    {"Origin": "null", "Host": "site.example"},
    {"Origin": "https://evil.example", "Host": "127.0.0.1", "X-Original-Host": "site.example"},
    {"Origin": "https://127.0.0.1", "X-Original-Host": "site.example"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "cross-site", "Origin": "https://site.example", "Host": "site.example"},
])
@pytest.mark.parametrize("kind", ["json", "form"])
def test_cross_site_login_is_refused(srv, headers, kind):
    if kind == "json":
        r = srv.request("POST", P + "/login", headers=headers,
                        body={"username": "alice", "password": PW["alice"]})
    else:
        r = srv.request("POST", P + "/login", headers=dict(FORM, **headers),
                        body=urllib.parse.urlencode({"username": "alice",
                                                     "password": PW["alice"]}).encode())
    assert r.status == 403, r
    assert not r.header_values("set-cookie"), r
    srv.healthy()


@pytest.mark.parametrize("headers", [
    {"Origin": "https://site.example", "Host": "site.example"},
    {"Origin": "https://site.example:8443", "Host": "site.example:8443"},
    {"Origin": "http://SITE.example", "Host": "site.example"},
    {"Origin": "https://site.example", "X-Original-Host": "site.example"},
    {"Sec-Fetch-Site": "same-origin", "Origin": "https://site.example", "Host": "site.example"},
    {"Sec-Fetch-Site": "none"},
])
def test_same_site_login_is_allowed(srv, headers):
    r = srv.request("POST", P + "/login", headers=headers,
                    body={"username": "alice", "password": PW["alice"]})
    assert r.status == 200 and r.cookie(), r


# --------------------------------------------------------------------------- return targets

BAD_TARGETS = [
    "//evil.example",
    "//evil.example/path",
    "/\\evil.example",
    "\\\\evil.example",
    "https://evil.example",
    "http://evil.example/",
    "HTTPS://evil.example",
    "javascript:alert(1)",
    "JavaScript:alert(document.cookie)",
    "data:text/html,<script>alert(1)</script>",
    "evil.example",
    "/ok\r\nSet-Cookie: pwned=1",
    "/ok\nLocation: https://evil.example",
    "/ok\rx",
    "/\t/evil.example",
    "/ok\x00",
    "/ok\x7f",
    "",
]


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_open_redirect_targets_on_form_login(srv, target):
    body = urllib.parse.urlencode({"username": "alice", "password": PW["alice"],
                                   "rd": target}).encode()
    r = srv.request("POST", P + "/login", headers=FORM, body=body)
    assert r.status == 303, r
    assert r.headers["location"] == "/", r
    assert not any("pwned" in v for v in r.header_values("set-cookie"))
    srv.healthy()


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_open_redirect_targets_when_logged_in(srv, tokens, target):
    r = srv.request("GET", P + "/login?" + urllib.parse.urlencode({"rd": target}),
                    headers={"Cookie": "authToken=" + tokens["alice"]})
    assert r.status == 303, r
    assert r.headers["location"] == "/", r


@pytest.mark.parametrize("target", ["/", "/a", "/a/b?c=d&e=%2F%2F", "/x#frag", "/%2F%2Fpath",
                                    "/caf%C3%A9", "/a:b", "/?next=https://x.example"])
def test_good_targets_are_kept(srv, tokens, target):
    r = srv.request("GET", P + "/login?" + urllib.parse.urlencode({"rd": target}),
                    headers={"Cookie": "authToken=" + tokens["alice"]})
    assert r.status == 303 and r.headers["location"] == target, r


def test_x_original_uri_bad_target(srv, tokens):
    r = srv.request("GET", P + "/login", headers={"Cookie": "authToken=" + tokens["alice"],
                                                  "X-Original-URI": "//evil.example/x"})
    assert r.status == 303 and r.headers["location"] == "/", r


# =========================================================================== logout, who am I, misc

@pytest.mark.parametrize("method", ["GET", "POST"])
def test_logout_clears_the_cookie_and_redirects_to_login(srv, tokens, method):
    r = srv.request(method, P + "/logout", headers={"Cookie": "authToken=" + tokens["alice"]})
    assert r.status == 303, r
    assert r.headers["location"].startswith(P + "/login")
    sc = auth_cookie_header(r)
    assert sc and is_clearing(sc), r
    _, value, attrs = cookie_attrs(sc)
    assert value == "" or value == '""'
    assert attrs.get("path") == "/"
    assert "domain" not in attrs


def test_logout_json(srv, tokens):
    r = srv.request("POST", P + "/logout", body={},
                    headers={"Cookie": "authToken=" + tokens["alice"], "Accept": "application/json"})
    assert r.status == 200, r
    assert r.headers["content-type"].startswith("application/json")
    assert isinstance(r.json(), dict)
    assert is_clearing(auth_cookie_header(r))


def test_logout_without_cookie(srv):
    r = srv.request("GET", P + "/logout")
    assert r.status == 303 and r.headers["location"].startswith(P + "/login")


@pytest.mark.parametrize("path", [P + "/", P + "/logged-in"])
def test_who_am_i_page_names_the_user_and_offers_logout(srv, tokens, path):
    r = srv.auth(tokens["bob"], path)
    assert r.status == 200, r
    assert r.headers["content-type"].startswith("text/html")
    body = r.body.decode()
    assert "bob" in body
    assert re.search(r"admin", body, re.I)
    assert re.search(r'<form[^>]*action="%s/logout"' % re.escape(P), body), body
    assert re.search(r'method="?post', body, re.I)
    r2 = srv.auth(tokens["alice"], path)
    assert r2.status == 200 and "alice" in r2.body.decode()
    r = srv.request("GET", path)
    assert r.status == 303 and r.headers["location"].startswith(P + "/login"), r
    r = srv.auth("garbage", path)
    assert r.status == 303 and r.headers["location"].startswith(P + "/login"), r


def test_who_am_i_admin_flag_differs(srv, tokens):
    """The page tells an admin from a non-admin (not just by the name)."""
    dave = srv.auth(tokens["dave"], P + "/").body.decode().replace("dave", "NAME")
    bob = srv.auth(tokens["bob"], P + "/").body.decode().replace("bob", "NAME")
    assert re.search(r"admin", bob, re.I)
    assert bob != dave


def test_healthz_answers_ok_without_a_cookie(srv):
    r = srv.request("GET", P + "/healthz")
    assert r.status == 200 and r.body.strip() == b"ok"
    assert r.headers.get("cache-control") == "no-store"


@pytest.mark.parametrize("path", [P + "/nope", P + "/auth/extra", P + "/login/x", P + "x",
                                  P + "/../etc/passwd", P + "/.env", "/", "/other", P + "/healthz/"])
def test_unknown_paths_404(srv, path):
    r = srv.request("GET", path)
    assert r.status == 404, (path, r)
    assert r.headers.get("cache-control") == "no-store"


@pytest.mark.parametrize("method,path,allowed", [
    ("DELETE", P + "/login", {"GET", "POST"}),
    ("PUT", P + "/login", {"GET", "POST"}),
    ("POST", P + "/healthz", {"GET"}),
    ("DELETE", P + "/logout", {"GET", "POST"}),
    ("POST", P + "/", {"GET"}),
    ("PUT", P + "/logged-in", {"GET"}),
])
def test_wrong_method_405_with_allow(srv, method, path, allowed):
    r = srv.request(method, path)
    assert r.status == 405, r
    got = {m.strip() for m in r.headers["allow"].split(",")}
    assert allowed <= got and got <= allowed | {"HEAD", "OPTIONS"}, got
    assert r.headers.get("cache-control") == "no-store"


def test_cache_control_no_store_everywhere(srv, tokens):
    cookie = {"Cookie": "authToken=" + tokens["alice"]}
    now = int(time.time())
    cases = [
        ("GET", P + "/auth", cookie, None),
        ("GET", P + "/auth", None, None),
        ("GET", P + "/auth", {"Cookie": "authToken=bad"}, None),
        ("GET", P + "/auth", {"Cookie": "authToken=" + remint(tokens["alice"], iat=now - 90, auth_time=now - 90)}, None),
        ("GET", P + "/admin", cookie, None),
        ("GET", P + "/auth?group=nobody", cookie, None),
        ("GET", P + "/login", None, None),
        ("GET", P + "/login", cookie, None),
        ("POST", P + "/login", None, {"username": "alice", "password": PW["alice"]}),
        ("POST", P + "/login", None, {"username": "alice", "password": "bad"}),
        ("POST", P + "/login", {"Origin": "https://evil.example"}, {"username": "a", "password": "b"}),
        ("POST", P + "/login", FORM, b"username=alice&password=bad"),
        ("POST", P + "/login", FORM, b"x" * 9000),
        ("GET", P + "/logout", cookie, None),
        ("GET", P + "/", cookie, None),
        ("GET", P + "/", None, None),
        ("GET", P + "/logged-in", cookie, None),
        ("GET", P + "/healthz", None, None),
        ("GET", P + "/missing", None, None),
        ("DELETE", P + "/login", None, None),
    ]
    for method, path, headers, body in cases:
        r = srv.request(method, path, headers=headers, body=body)
        assert r.headers.get("cache-control") == "no-store", (method, path, r)


def _html_responses(srv, tokens):
    yield srv.request("GET", P + "/login")
    yield srv.request("POST", P + "/login", headers=FORM, body=b"username=alice&password=bad")
    yield srv.auth(tokens["alice"], P + "/")
    yield srv.auth(tokens["alice"], P + "/logged-in")


def test_html_security_headers(srv, tokens):
    for r in _html_responses(srv, tokens):
        assert r.headers["content-type"].startswith("text/html"), r
        assert r.headers.get("x-content-type-options") == "nosniff"
        assert r.headers.get("referrer-policy") == "same-origin"
        csp = r.headers.get("content-security-policy", "")
        directives = {d.strip().split()[0]: d.strip().split()[1:]
                      for d in csp.split(";") if d.strip()}
        assert directives.get("frame-ancestors") == ["'none'"], csp
        assert "default-src" in directives, csp
        script = directives.get("script-src", directives["default-src"])
        assert "'unsafe-inline'" not in script and "'unsafe-eval'" not in script, csp
        assert "*" not in script, csp
        body = r.body.decode()
        assert "<script" not in body.lower(), "no JavaScript at all"
        assert not re.search(r"\son[a-z]+\s*=", body, re.I), "no inline event handlers"
        # inline CSS is allowed by a hash that matches it
        for css in re.findall(r"<style[^>]*>(.*?)</style>", body, re.S):
            h = "'sha256-%s'" % base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
            assert h in csp, "style block not allowed by CSP hash %s: %s" % (h, csp)
        assert not re.search(r'\sstyle="', body), "style attributes are blocked by a hash CSP"


def test_html_escaping_of_user_supplied_text(srv, tokens):
    evil_rd = '/x"><script>alert(1)</script><b a=\''
    r = srv.request("GET", P + "/login?" + urllib.parse.urlencode({"rd": evil_rd}))
    body = r.body.decode()
    assert "<script>alert(1)" not in body
    assert '"><script' not in body
    evil_name = "<script>alert(2)</script>"
    r = srv.request("POST", P + "/login", headers=FORM, body=urllib.parse.urlencode(
        {"username": evil_name, "password": "x", "rd": evil_rd}).encode())
    assert r.status == 401
    assert "<script>alert" not in r.body.decode()
    r = srv.request("GET", P + "/login", headers={"X-Original-Host": "<b>h</b>.example"})
    assert r.status < 500 and b"<b>h</b>" not in r.body
    r = srv.request("GET", P + "/login", headers={"X-Original-URI": '/q?a="><img src=x>'})
    assert r.status == 200 and b"<img src=x>" not in r.body


def test_html_escaping_of_user_name(srv, tokens):
    r = srv.auth(tokens[ODD])
    assert r.status == 200 and r.headers["x-auth-user"] == ODD
    r = srv.auth(tokens[ODD], P + "/")
    assert r.status == 200
    body = r.body.decode()
    assert ODD not in body
    assert "&lt;i&gt;&amp;" in body


# =========================================================================== token

def test_cookie_is_a_standard_hs256_jwt(srv, tokens):
    tok = tokens["alice"]
    assert b64u_decode(tok.split(".")[0]) == b'{"alg":"HS256","typ":"JWT"}'
    c = jwt.decode(tok, SECRET, algorithms=["HS256"])
    now = time.time()
    assert c["sub"] == "alice"
    assert isinstance(c["iat"], int) and abs(c["iat"] - now) < 600
    assert abs(c["exp"] - c["iat"] - 7 * 86400) <= 2
    assert "auth_time" in c and "pwh" in c
    assert PW["alice"] not in json.dumps(c)
    assert "$scrypt$" not in json.dumps(c)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tok, SECRET2, algorithms=["HS256"])


def test_signature_compare_is_constant_time():
    src = AUTHD.read_text(encoding="utf-8")
    assert "compare_digest" in src


# =========================================================================== revocation

def _rev_server(authd, **kw):
    users = [
        "# revocation",
        "alice:%s:staff" % fast_hash("a-pw"),
        "bob:%s:admin" % fast_hash("b-pw"),
        "carol:%s" % fast_hash("c-pw"),
    ]
    return authd(users=users, **kw)


def test_deluser_revokes_at_once(tmp_path, authd):
    d = _rev_server(authd)
    tok = d.login("alice", "a-pw")
    assert d.auth(tok).status == 200
    cp = _cli(tmp_path, "deluser", "alice")
    assert cp.returncode == 0, cp.stderr
    wait_until(lambda: d.auth(tok).status == 401, what="the deleted user's token to be refused")
    assert d.auth(tok, P + "/admin").status == 401
    assert d.proc.poll() is None
    assert d.auth(d.login("carol", "c-pw")).status == 200


def test_deleting_user_by_editing_file(tmp_path, authd):
    d = _rev_server(authd)
    tok = d.login("carol", "c-pw")
    lines = [l for l in d.users_file.read_text().splitlines() if not l.startswith("carol:")]
    write_users(d.users_file, lines)
    wait_until(lambda: d.auth(tok).status == 401, what="the deleted user's token to be refused")


def test_demoting_admin_revokes_admin_at_once(tmp_path, authd):
    d = _rev_server(authd)
    tok = d.login("bob", "b-pw")
    assert d.auth(tok, P + "/admin").status == 200
    lines = [("bob:" + l.split(":")[1] + ":ops") if l.startswith("bob:") else l
             for l in d.users_file.read_text().splitlines()]
    write_users(d.users_file, lines)
    wait_until(lambda: d.auth(tok, P + "/admin").status == 403, what="the demoted admin to lose /admin")
    r = d.auth(tok)
    assert r.status == 200 and r.headers["x-auth-admin"] == "false"
    assert r.headers["x-auth-groups"] == "ops"


def test_promotion_and_groups_change_without_new_login(tmp_path, authd):
    d = _rev_server(authd)
    tok = d.login("carol", "c-pw")
    assert d.auth(tok, P + "/admin").status == 403
    lines = [(l + ":admin,dev") if l.startswith("carol:") else l
             for l in d.users_file.read_text().splitlines()]
    write_users(d.users_file, lines)
    wait_until(lambda: d.auth(tok, P + "/admin").status == 200, what="the promoted user to get /admin")
    assert d.auth(tok, P + "/auth?group=dev").status == 200


def test_passwd_invalidates_old_tokens(tmp_path, authd):
    d = _rev_server(authd)
    tok = d.login("alice", "a-pw")
    assert d.auth(tok).status == 200
    cp = _cli(tmp_path, "passwd", "alice", input="new-alice-pw\n")
    assert cp.returncode == 0, cp.stderr
    wait_until(lambda: d.auth(tok).status == 401, what="the token from before passwd to be refused")
    d.login("alice", "a-pw", expect=401)
    tok2 = d.login("alice", "new-alice-pw")
    assert d.auth(tok2).status == 200
    assert d.auth(tok).status == 401
    # an aged old token is not resurrected by the refresh path either
    now = int(time.time())
    assert d.auth(remint(tok, iat=now - 120, auth_time=now - 120)).status == 401


def test_passwd_same_password_still_invalidates(tmp_path, authd):
    """A new salt means a new hash: tokens from before the change die even for the same password."""
    d = _rev_server(authd)
    tok = d.login("carol", "c-pw")
    cp = _cli(tmp_path, "passwd", "carol", "--allow-short", input="c-pw\n")
    assert cp.returncode == 0, cp.stderr
    wait_until(lambda: d.auth(tok).status == 401, what="the token from before passwd to be refused")


def test_broken_users_file_on_reload_keeps_old_users(tmp_path, authd):
    d = _rev_server(authd)
    tok = d.login("alice", "a-pw")
    lines = d.users_file.read_text().splitlines() + ["this line is broken"]
    write_users(d.users_file, lines)
    d.wait_log(line_ref(d.users_file, 5))                   # names file and line 5
    assert d.auth(tok).status == 200, "kept the users it had"
    assert d.login("bob", "b-pw")
    assert_no_traceback(d.log())
    assert d.proc.poll() is None
    # fixing the file is picked up again
    write_users(d.users_file, lines[:-1] + ["dave:" + fast_hash("d-pw")])
    wait_until(lambda: d.request("POST", P + "/login", body={"username": "dave", "password": "d-pw"}).status == 200,
               what="the fixed file to be read")


# =========================================================================== users file

def test_plaintext_password_is_hashed_at_start(tmp_path, authd):
    users = tmp_path / "users.txt"
    original = [
        "# header comment",
        "",
        "zed:%s:ops" % fast_hash("zed-pw"),
        "# middle comment: with colons:and stuff",
        "alice:plain-secret:staff,admin",
        "   ",
        "mike:mike-plain",
        "# trailing",
    ]
    write_users(users, original, mode=0o640)
    inode = users.stat().st_ino
    before = set(os.listdir(str(tmp_path)))
    d = authd()
    after_lines = users.read_text().splitlines()
    assert len(after_lines) == len(original)
    for old, new in zip(original, after_lines):
        if old.startswith(("alice:", "mike:")):
            name = old.split(":")[0]
            fields = new.split(":")
            assert fields[0] == name
            assert SCRYPT_RE.match(fields[1]), new
            assert new.count(":") == old.count(":")
            if name == "alice":
                assert fields[2] == "staff,admin"
        else:
            assert new == old
    assert "plain-secret" not in users.read_text()
    assert stat.S_IMODE(users.stat().st_mode) == 0o640
    assert users.stat().st_ino != inode, "rewrite must be a rename of a new file, not in place"
    leftovers = set(os.listdir(str(tmp_path))) - before - {".authd_secret", ".env"}
    leftovers = {n for n in leftovers if not n.endswith(".lock")}     # a lock file may stay
    assert not leftovers, "temporary files left behind: %s" % leftovers
    alice_hash = after_lines[4].split(":")[1]
    assert passlib_scrypt.identify(alice_hash) and passlib_scrypt.verify("plain-secret", alice_hash)
    assert not passlib_scrypt.verify("plain-secreT", alice_hash)
    tok = d.login("alice", "plain-secret")
    r = d.auth(tok, P + "/admin")
    assert r.status == 200
    assert d.login("mike", "mike-plain")
    # a second start leaves the now-hashed file alone
    d.stop()
    text = users.read_text()
    authd()
    assert users.read_text() == text


@pytest.mark.parametrize("bad_line", [
    "justaname",
    ":" + "$scrypt$ln=4,r=8,p=1$c2FsdA$aGFzaA",
    "bad name:{hash}",
    "tab\tname:{hash}",
    "comma,name:{hash}",
    "x" * 65 + ":{hash}",
    "ctl\x01name:{hash}",
    "alice:{hash}:staff:extra",
    "nohash:",
    "alice:$zz$unknownformat",
    "alice:$scrypt$garbage",
    "alice:$scrypt$ln=99,r=8,p=1$AAAA$" + "A" * 43,
    "alice:{SHA}notbase64!",
])
def test_malformed_users_line_refuses_start(tmp_path, bad_line):
    line = bad_line.replace("{hash}", fast_hash("pw"))
    rc, out = start_fails(tmp_path, ["# ok", "bob:" + fast_hash("pw"), line])
    assert re.search(line_ref(tmp_path / "users.txt", 3), out), "must name file and line 3:\n" + out


def test_duplicate_user_refuses_start(tmp_path):
    rc, out = start_fails(tmp_path, ["bob:" + fast_hash("a"), "# x", "bob:" + fast_hash("b")])
    assert "bob" in out and re.search(line_ref(tmp_path / "users.txt", 3), out), out


def test_user_names_of_1_to_64_allowed_characters_log_in(tmp_path, authd):
    name64 = "n" * 64
    d = authd(users=[name64 + ":" + fast_hash("pw"), "\u00e9t\u00e9:" + fast_hash("pw"),
                     "a.b-c_d@e:" + fast_hash("pw"), "x:" + fast_hash("pw")])
    r = d.auth(d.login(name64, "pw"))
    assert r.status == 200 and r.headers["x-auth-user"] == name64
    assert d.auth(d.login("a.b-c_d@e", "pw")).status == 200
    assert d.auth(d.login("x", "pw")).status == 200


def test_libpass_default_hash_logs_in(tmp_path, authd):
    """A libpass scrypt hash with its default (stronger) parameters works too."""
    h = passlib_scrypt.hash("strong-pw")
    d = authd(users=["alice:" + h])
    assert d.auth(d.login("alice", "strong-pw")).status == 200
    d.login("alice", "wrong", expect=401)


# =========================================================================== command line

def _fails_cleanly(cp, *words):
    assert cp.returncode != 0, cp
    assert cp.stderr.strip(), "error must be on stderr"
    assert_no_traceback(cp.stderr + cp.stdout)
    for w in words:
        assert w in cp.stderr, (w, cp.stderr)


@pytest.mark.parametrize("cmd", [[], ["serve"], ["hash"], ["adduser"], ["passwd"], ["deluser"],
                                 ["users"], ["check"]])
def test_help(tmp_path, cmd):
    cp = _cli(tmp_path, *(cmd + ["--help"]))
    assert cp.returncode == 0, cp
    assert "usage" in cp.stdout.lower(), cp.stdout
    if cmd:
        assert cmd[0] in cp.stdout
    assert not (tmp_path / "users.txt").exists()


def test_hash_command(tmp_path):
    cp = _cli(tmp_path, "hash", input="hunter2-pw\n")
    assert cp.returncode == 0, cp.stderr
    h = cp.stdout.strip()
    assert SCRYPT_RE.match(h), h
    assert passlib_scrypt.verify("hunter2-pw", h)
    assert not passlib_scrypt.verify("hunter2-pw ", h)
    cp2 = _cli(tmp_path, "hash", input="hunter2-pw\nsecond line ignored\n")
    assert cp2.stdout.strip() != h, "a fresh salt each time"
    assert passlib_scrypt.verify("hunter2-pw", cp2.stdout.strip())


def test_hash_without_password_fails_cleanly(tmp_path):
    _fails_cleanly(_cli(tmp_path, "hash", input=""))


def test_adduser_users_deluser_cycle(tmp_path, authd):
    write_users(tmp_path / "users.txt", ["# my users", "", "zed:" + fast_hash("z")], mode=0o640)
    cp = _cli(tmp_path, "adduser", "ann", "--admin", "--groups", "dev,ops", "--allow-short", input="ann-pw\n")
    assert cp.returncode == 0, cp.stderr
    cp = _cli(tmp_path, "adduser", "ben", "--allow-short", input="ben-pw\n")
    assert cp.returncode == 0, cp.stderr
    text = (tmp_path / "users.txt").read_text()
    lines = text.splitlines()
    assert lines[:3] == ["# my users", "", lines[2]] and lines[2].startswith("zed:")
    assert stat.S_IMODE((tmp_path / "users.txt").stat().st_mode) == 0o640
    ann = [l for l in lines if l.startswith("ann:")][0].split(":")
    assert SCRYPT_RE.match(ann[1]) and passlib_scrypt.verify("ann-pw", ann[1])
    assert set(ann[2].split(",")) == {"admin", "dev", "ops"}
    cp = _cli(tmp_path, "users")
    assert cp.returncode == 0, cp.stderr
    assert "$" not in cp.stdout and "scrypt" not in cp.stdout
    for word in ("ann", "ben", "zed", "admin", "dev", "ops"):
        assert word in cp.stdout
    d = authd()
    r = d.auth(d.login("ann", "ann-pw"), P + "/admin")
    assert r.status == 200 and set(r.headers["x-auth-groups"].split(",")) == {"admin", "dev", "ops"}
    tok = d.login("ben", "ben-pw")
    assert d.auth(tok, P + "/admin").status == 403
    cp = _cli(tmp_path, "deluser", "ben")
    assert cp.returncode == 0, cp.stderr
    assert "ben:" not in (tmp_path / "users.txt").read_text()
    wait_until(lambda: d.auth(tok).status == 401, what="the deleted user's token to be refused")
    assert "ben" not in _cli(tmp_path, "users").stdout.split()


def test_adduser_new_user_picked_up_by_running_server(tmp_path, authd):
    d = authd(users=["zed:" + fast_hash("z")])
    cp = _cli(tmp_path, "adduser", "newbie", input="newbie-pw\n")
    assert cp.returncode == 0, cp.stderr
    wait_until(lambda: d.request("POST", P + "/login", body={"username": "newbie", "password": "newbie-pw"}).status
               == 200, what="the new user to be read")


@pytest.mark.parametrize("args,words", [
    (["adduser", "zed"], ["zed"]),                      # exists
    (["adduser", "bad name"], []),
    (["adduser", "a:b"], []),
    (["adduser", "x" * 65], []),
    *[(["adduser", name], []) for name in ("a\nb", "a\rb", "a\u2028b", "a\x85b", "a,b", "", "#x")],
    (["passwd", "ghost"], ["ghost"]),
    (["deluser", "ghost"], ["ghost"]),
    (["adduser"], []),
    (["frobnicate"], []),
    (["serve", "--port", "notaport"], []),
])
def test_cli_errors_are_clean(tmp_path, args, words):
    write_users(tmp_path / "users.txt", ["zed:" + fast_hash("z")])
    before = (tmp_path / "users.txt").read_text()
    cp = _cli(tmp_path, *args, input="pw-pw-pw\n")
    _fails_cleanly(cp, *words)
    assert (tmp_path / "users.txt").read_text() == before, "a failed command must not edit"


def test_cli_on_malformed_file_names_the_line(tmp_path):
    write_users(tmp_path / "users.txt", ["zed:" + fast_hash("z"), "broken line here"])
    for args in (["users"], ["adduser", "new"], ["deluser", "zed"]):
        before = (tmp_path / "users.txt").read_text()
        cp = _cli(tmp_path, *args, input="pw\n")
        _fails_cleanly(cp)
        assert re.search(line_ref(tmp_path / "users.txt", 2), cp.stderr), cp.stderr
        assert (tmp_path / "users.txt").read_text() == before


def test_check_exits_0_on_valid_settings_and_users(tmp_path):
    write_users(tmp_path / "users.txt", ["# c", "zed:" + fast_hash("z") + ":admin"])
    cp = _cli(tmp_path, "check")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert_no_traceback(cp.stdout + cp.stderr)


def test_check_lists_every_problem(tmp_path):
    write_users(tmp_path / "users.txt", [
        "zed:" + fast_hash("z"),
        "broken line",
        "amy:" + fast_hash("a"),
        "zed:" + fast_hash("y"),
        "kim:$zz$nope",
    ])
    (tmp_path / ".env").write_text("AUTH_EXPIRY_DAYS=soon\n")
    cp = _cli(tmp_path, "check", "--env", tmp_path / ".env",
              env={"AUTH_TOKEN_SECRET": "short"})
    if cp.returncode == 2 and "unrecognized" in cp.stderr:      # --env before the command
        cp = _cli(tmp_path, "--env", tmp_path / ".env", "check", env={"AUTH_TOKEN_SECRET": "short"})
    out = cp.stdout + cp.stderr
    assert cp.returncode == 1, out
    assert_no_traceback(out)
    assert "AUTH_TOKEN_SECRET" in out, out
    assert "AUTH_EXPIRY_DAYS" in out, out
    for lineno in (2, 4, 5):
        assert re.search(line_ref(tmp_path / "users.txt", lineno), out), (lineno, out)


def test_check_does_not_modify_plaintext_file(tmp_path):
    write_users(tmp_path / "users.txt", ["zed:plain-pw"])
    cp = _cli(tmp_path, "check")
    assert cp.returncode == 0, cp.stdout + cp.stderr     # a plaintext password is hashed at start: valid
    assert_no_traceback(cp.stdout + cp.stderr)
    assert (tmp_path / "users.txt").read_text() == "zed:plain-pw\n", "check only looks"


# =========================================================================== robustness basics

def test_http10_and_keepalive(srv, tokens):
    r = raw_request(srv.port, b"GET " + P.encode() + b"/healthz HTTP/1.0\r\n\r\n")
    assert r.status == 200 and r.body.rstrip().endswith(b"ok")
    conn = srv.connect()
    try:
        for _ in range(3):
            r = srv.request("GET", P + "/auth", headers={"Cookie": "authToken=" + tokens["alice"]},
                            conn=conn)
            assert r.status == 200
            assert r.headers.get("connection", "").lower() != "close"
        r = srv.request("GET", P + "/auth", conn=conn)
        assert r.status == 401
        r = srv.request("GET", P + "/auth", headers={"Cookie": "authToken=" + tokens["alice"]},
                        conn=conn)
        assert r.status == 200, "a 401 must not end the keep-alive connection"
    finally:
        conn.close()
    r = raw_request(srv.port, b"GET " + P.encode() + b"/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.head.startswith(b"HTTP/1.1 200")


def test_odd_headers_on_auth(srv, tokens):
    for headers in (
        {"Cookie": ""},
        {"Cookie": ";;;=;"},
        {"Cookie": "authToken"},
        {"Cookie": "authToken=; authToken=" + tokens["alice"]},
        {"Cookie": "authToken=\"%s\"" % tokens["alice"]},
        {"Cookie": "authToken=" + "\u00ff" * 100},
        {"X-Auth-Bypass": "anything"},
        {"X-Real-IP": "not-an-ip", "Cookie": "authToken=x"},
    ):
        r = srv.request("GET", P + "/auth", headers=headers)
        assert r.status in (200, 401), (headers, r)
    assert srv.healthy()


def test_shared_server_logged_no_traceback(srv):
    assert srv.proc.poll() is None, "shared server died:\n" + srv.log()
    assert_no_traceback(srv.log())


# =========================================================================== interop, stdlib

def test_pyjwt_minted_token_is_accepted(srv, tokens):
    c = claims_of(tokens["carol"])
    assert srv.auth(jwt.encode(c, SECRET, algorithm="HS256")).headers.get("x-auth-user") == "carol"


# stdlib module names on Pythons without sys.stdlib_module_names (3.9)
_STDLIB_FALLBACK = set("""
__future__ abc argparse array ast asyncio atexit base64 binascii bisect builtins calendar
codecs collections concurrent contextlib copy csv ctypes dataclasses datetime decimal
email enum errno fcntl functools getpass gc glob grp hashlib heapq hmac html http io
ipaddress itertools json logging math mimetypes os pathlib platform pwd queue random re
secrets select selectors shlex shutil signal socket socketserver ssl stat string struct
subprocess sys tempfile termios textwrap threading time traceback tty types typing
unicodedata urllib uuid warnings weakref zlib posixpath fnmatch numbers operator pprint
syslog resource contextvars inspect locale getopt optparse sched crypt zoneinfo
sysconfig gzip zipfile hmac binascii urllib marshal
""".split())


def test_authd_imports_only_the_standard_library():
    tree = ast.parse(AUTHD.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in a single-file program"
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            pytest.fail("dynamic __import__ in authd.py")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module"):
            pytest.fail("importlib.import_module in authd.py")
    stdlib = getattr(sys, "stdlib_module_names", None) or _STDLIB_FALLBACK
    outside = sorted(n for n in names if n not in stdlib)
    assert not outside, "non-stdlib imports: %s" % outside
    assert names, "parsed no imports at all?"


def test_authd_runs_with_site_packages_disabled(tmp_path):
    """-I -S: no user or site packages on the path; the hash command still works."""
    cp = subprocess.run([sys.executable, "-I", "-S", str(AUTHD), "hash"], input="pw-pw\n",
                        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
                        env={"PATH": os.environ.get("PATH", "")})
    assert cp.returncode == 0, cp.stderr
    assert SCRYPT_RE.match(cp.stdout.strip())


# =========================================================================== pure functions, imported

import authd  # noqa: E402  (the module under test; importing it must not start anything)


@pytest.mark.parametrize("target,expected", [
    ("/", "/"), ("/a/b?c=d&e=f", "/a/b?c=d&e=f"), ("/x#y", "/x#y"), ("/a:b", "/a:b"),
    ("/caf\u00e9", "/caf%C3%A9"), ("/%2F%2Fx", "/%2F%2Fx"),
    ("//evil.example", "/"), ("/\\evil.example", "/"), ("\\\\evil", "/"),
    ("https://evil.example", "/"), ("javascript:alert(1)", "/"), ("evil.example", "/"),
    ("/a\r\nb", "/"), ("/a\nb", "/"), ("/a\tb", "/"), ("/a\x00", "/"), ("/a\x7f", "/"),
    ("", "/"), (None, "/"), ("/" + "a" * 5000, "/"),
])
def test_return_target_is_kept_only_when_it_is_a_local_path(target, expected):
    assert authd.safe_target(target) == expected


@pytest.mark.parametrize("line,expected", [
    ("", None), ("   ", None), ("# c", None), ("  # c=1", None),
    ("A=1", ("A", "1")), ("export A=1", ("A", "1")), ("A=", ("A", "")),
    ('A="x y"', ("A", "x y")), ("A='q#r'", ("A", "q#r")), ('A="v" # c', ("A", "v")),
    ("A=v # comment", ("A", "v")), ("A=v#kept", ("A", "v#kept")), ("  A = 1  ", ("A", "1")),
    ("A=a=b", ("A", "a=b")),
])
def test_env_line_syntax_quotes_export_and_comments(line, expected):
    assert authd.parse_env_line(line) == expected


@pytest.mark.parametrize("line", ["novalue", 'A="unterminated', "1A=x", "A B=1", 'A="x" y'])
def test_malformed_env_lines_are_errors(line):
    with pytest.raises(ValueError):
        authd.parse_env_line(line)


def test_settings_precedence_and_defaults(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("AUTH_PORT=3\nAUTH_COOKIE_NAME=file\nAUTH_NOPE=1\n")
    s, warnings = authd.load_settings({"AUTH_PORT": "1"}, {"AUTH_PORT": "2"}, str(env_file))
    assert s.port == 1 and s.cookie_name == "file"
    assert any("AUTH_NOPE" in w for w in warnings)
    s, _ = authd.load_settings({"AUTH_PORT": None}, {"AUTH_PORT": "2"}, str(env_file))
    assert s.port == 2
    s, _ = authd.load_settings({}, {}, str(env_file))
    assert s.port == 3
    s, _ = authd.load_settings({}, {}, str(tmp_path / "absent.env"))
    assert (s.host, s.port, s.cookie_name, s.cookie_samesite, s.cookie_secure, s.prefix) == \
        ("127.0.0.1", 3003, "authToken", "Lax", True, "/__auth")
    assert (s.expiry_days, s.max_age_days, s.login_rate, s.bypass, s.cookie_domain) == \
        (7, 30, (15, 900), None, None)
    assert s.secret_file == os.path.join(os.path.dirname(os.path.abspath(s.users_file)), ".authd_secret")


def test_settings_errors_name_every_bad_key_but_no_secret(tmp_path):
    with pytest.raises(authd.SettingsError) as e:
        authd.load_settings({}, {"AUTH_PORT": "x", "AUTH_EXPIRY_DAYS": "nan",
                                 "AUTH_TOKEN_SECRET": "short-but-secret"}, str(tmp_path / "none"))
    text = "\n".join(e.value.problems)
    for key in ("AUTH_PORT", "AUTH_EXPIRY_DAYS", "AUTH_TOKEN_SECRET"):
        assert key in text
    assert "short-but-secret" not in text, "a secret must not be echoed in an error"


def test_token_secrets_split_on_commas_and_spaces(tmp_path):
    s, _ = authd.load_settings({}, {"AUTH_TOKEN_SECRET": " %s ,\t%s " % (SECRET, SECRET2)},
                               str(tmp_path / "none"))
    assert authd.load_secrets(s) == [SECRET.encode(), SECRET2.encode()]


def test_issued_token_expires_no_later_than_max_age():
    s, _ = authd.load_settings({}, {"AUTH_MAX_AGE_DAYS": "1", "AUTH_EXPIRY_DAYS": "7"}, "/nonexistent/.env")
    user = authd.User("alice", fast_hash("pw"), ["staff"])
    now = int(time.time())
    tok, max_age = authd.issue_token(user, now - 3600, now, s, SECRET.encode())
    c = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert c["exp"] == now - 3600 + 86400 and max_age == c["exp"] - now
    assert c["auth_time"] == now - 3600 and c["pwh"] == user.fingerprint


def test_password_fingerprint_changes_with_the_hash_and_hides_it():
    a = authd.User("alice", fast_hash("pw"), [])
    b = authd.User("alice", fast_hash("pw"), [])
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint not in a.hash


@pytest.mark.parametrize("line,name,groups", [
    ("alice:{h}", "alice", ()), ("alice:{h}:a,b", "alice", ("a", "b")),
    ("al-ice.x@y:{h}:admin", "al-ice.x@y", ("admin",)),
])
def test_users_line_gives_name_groups_and_admin(line, name, groups):
    u = authd.parse_user_line(line.replace("{h}", fast_hash("pw")))
    assert (u.name, u.groups, u.admin) == (name, groups, "admin" in groups)


@pytest.mark.parametrize("line", ["", "  ", "# comment", "  # indented"])
def test_users_file_comments_and_blank_lines_are_not_users(line):
    assert authd.parse_user_line(line) is None


def test_plaintext_password_is_told_from_a_hash():
    assert authd.is_plaintext("hunter2") and authd.is_plaintext("SHA}x")
    assert not authd.is_plaintext("$scrypt$x") and not authd.is_plaintext("{SHA}x")


def test_users_file_errors_name_every_bad_line():
    text = "# c\nok:%s\nbad\nok:%s\nalso bad:x\n" % (fast_hash("a"), fast_hash("b"))
    with pytest.raises(authd.UsersFileError) as e:
        authd.parse_users_text(text, "/x/users.txt")
    joined = "\n".join(e.value.problems)
    for n in (3, 4, 5):
        assert re.search(line_ref("/x/users.txt", n), joined), (n, joined)


def test_users_file_rewrite_keeps_comments_and_order():
    text = "# a\n\nz:%s:g\n# b\na:%s\n" % (fast_hash("1"), fast_hash("2"))
    entries, users = authd.parse_users_text(text, "f")
    assert authd.render_users(entries) == text
    assert list(users) == ["z", "a"]


def test_scrypt_hashes_interoperate_with_libpass():
    h = fast_hash("pw")
    assert authd.verify_password("pw", h) and not authd.verify_password("pW", h)
    native = authd.hash_password("pw")
    assert SCRYPT_RE.match(native) and passlib_scrypt.verify("pw", native)
    n, r, p, salt, checksum = authd.parse_scrypt_hash(native)
    assert (n, r, p, len(salt), len(checksum)) == (2 ** 17, 8, 1, 16, 32)


def test_apr1_hash_matches_libpass():
    from passlib.hash import apr_md5_crypt
    for pw, salt in ((b"pw", b"abcdefgh"), (b"x" * 40, b"Zz./1234"), (b"", b"a")):
        expected = apr_md5_crypt.using(salt=salt.decode()).hash(pw.decode())
        assert authd.apr1_md5(pw, salt) == expected


@pytest.mark.parametrize("header,name,expected", [
    ("authToken=a", "authToken", ["a"]), ("x=1; authToken=b; y=2", "authToken", ["b"]),
    ('authToken="c"', "authToken", ["c"]), ("authToken=a; authToken=b", "authToken", ["a", "b"]),
    ("myauthToken=a", "authToken", []), ("authTokenx=a", "authToken", []), ("", "authToken", []),
])
def test_cookie_header_values_of_one_name(header, name, expected):
    assert authd.cookie_values(header, name) == expected


@pytest.mark.parametrize("host,expected", [
    ("Example.COM:8080", "example.com"), ("example.com", "example.com"), ("[::1]:80", "::1"),
    ("::1", "::1"), ("", ""),
])
def test_host_name_drops_port_and_case(host, expected):
    assert authd.host_name(host) == expected


def test_rate_limiter_window_refund_and_eviction():
    rl = authd.RateLimiter(2, 10, max_keys=3)
    assert rl.hit("a", 0) == 0 and rl.hit("a", 1) == 0
    assert rl.hit("a", 2) == 8
    rl.refund("a")
    assert rl.hit("a", 3) == 0 and rl.hit("a", 4) > 0
    assert rl.hit("a", 10) == 0, "a new window"
    for k in "bcdefg":
        rl.hit(k, 11)
    assert len(rl.entries) <= 3, "memory is bounded"


def test_quoted_log_value_is_one_short_line():
    q = authd.quoted('a"b\nc\r\x00' + "x" * 500)
    assert "\n" not in q and "\r" not in q and len(q) < 260
    assert q.startswith('"') and q.endswith('"')


@pytest.mark.parametrize("head,status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", 400),
    (b"GET http://evil/ HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
])
def test_malformed_request_heads_are_refused_with_their_status(head, status):
    with pytest.raises(authd.HTTPError) as e:
        authd.parse_head(head)
    assert e.value.status == status


def test_request_head_gives_method_path_query_headers_and_length():
    r = authd.parse_head(b"POST /__auth/login?rd=/x HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\n"
                         b"cookie: b=2\r\nContent-Length: 5\r\n\r\n")
    assert (r.method, r.path, r.query, r.keep_alive) == ("POST", "/__auth/login", "rd=/x", True)
    assert r.headers["cookie"] == "a=1; b=2"
    assert authd.body_length(r) == 5
