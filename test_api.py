"""Scripts and API clients (issue 13): HTTP Basic on P/auth and P/admin, app
tokens, honest 401 answers for non-browsers, and Prometheus metrics.

Against a real authd.py subprocess (most tests) and, for real clients (curl,
git over dumb HTTP, Python requests, Chromium), through a real nginx running
nginx.example.conf (the Site of test_e2e.py).

What the tests rely on (the interface, also in README.md):

- `authd.py token add NAME [--label L] [--days N]` prints one token matching
  TOKEN_RE; the tokens file is `tokens.txt` beside the users file, one token a
  line holding its owner, label, SHA-256 (hex), creation and expiry times (UTC
  epoch seconds), never the token itself. `token list [NAME]`, `token revoke
  NAME LABEL`.
- A non-browser request (it carries Authorization, or its Accept header lists
  no text/html and it has none of a browser's marks: Sec-Fetch-* headers, a
  "Mozilla/" User-Agent) that is not allowed gets 401 with
  `WWW-Authenticate: Basic realm="..."`. P/auth answers carry no body (SPEC);
  nginx passes P/auth's challenge on to the client. GET P/login (nginx's
  `error_page 401` target) answers such a client 401 with a JSON body instead
  of the login page, and adds the challenge only when asked directly (nginx
  has already added P/auth's otherwise).
- `GET P/metrics`: the Prometheus text format. Names used here:
  authd_auth_requests_total{result}, authd_logins_total{result},
  authd_hash_seconds (histogram; _count is the number of password hashes),
  authd_connections_open, authd_users_loaded, authd_reloads_total{result},
  authd_token_cache_entries, authd_basic_cache_entries, authd_app_tokens,
  authd_build_info{version}, process_resident_memory_bytes,
  process_cpu_seconds_total, process_start_time_seconds.

"A remembered pair costs no hash" is observed through authd_hash_seconds_count,
never through timing.
"""
import base64
import collections
import hashlib
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from conftest import AUTHD, SECRET, fast_hash, login_in_browser, need, run_cli, wait_until, write_users

P = "/__auth"
TOKEN_RE = re.compile(r"authd_[A-Za-z0-9_-]{43}")
BYPASS = "bypass-value-for-monitoring-0123456789"
TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
PW = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol pw:3 \u00fc", "mon": "mon-pw", "dave": "dave-pw"}
USERS = [
    "# api test users",
    "alice:%s:admin" % fast_hash(PW["alice"]),
    "bob:%s:staff" % fast_hash(PW["bob"]),
    "carol:%s" % fast_hash(PW["carol"]),
    "mon:%s:metrics" % fast_hash(PW["mon"]),
]
AUTH_RESULTS = ("allow", "deny", "forbidden", "bypass", "basic", "token")
LOGIN_RESULTS = ("ok", "fail", "rate-limited", "busy", "cross-site", "two-factor")
CURL_UA = {"Accept": "*/*", "User-Agent": "curl/8.0"}
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
           "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/130.0"}


# --------------------------------------------------------------------------- helpers

def basic(name, password, **extra):
    raw = name + ":" + password
    headers = {"Authorization": "Basic " + base64.b64encode(raw.encode("utf-8")).decode("ascii")}
    headers.update(extra)
    return headers


def bearer(token, **extra):
    headers = {"Authorization": "Bearer " + token}
    headers.update(extra)
    return headers


def tokens_file(users_file):
    return Path(users_file).parent / "tokens.txt"


def token_cli(users_file, *args, input=None):
    return run_cli("token", *args, "--users", users_file, input=input)


def add_token(users_file, name, label=None, days=None):
    args = ["add", name] + (["--label", label] if label else []) + (["--days", str(days)] if days else [])
    r = token_cli(users_file, *args)
    assert r.returncode == 0, r.stderr
    found = TOKEN_RE.findall(r.stdout + r.stderr)
    assert len(found) == 1, (r.stdout, r.stderr)
    assert found[0] in r.stdout, "the token goes to standard output"
    return found[0]


def challenge(r):
    """The WWW-Authenticate values of a response (exactly one Basic challenge expected)."""
    values = r.header_values("www-authenticate")
    assert len(values) == 1, r
    assert re.match(r'Basic realm="[^"\r\n]+"', values[0]), values
    return values[0]


def no_challenge(r):
    assert not r.header_values("www-authenticate"), r


class Metrics:
    """A scrape parsed by prometheus_client's reference parser."""

    def __init__(self, text):
        from prometheus_client.parser import text_string_to_metric_families
        self.text = text
        self.families = {}
        self.samples = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(self, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        assert key in self.samples, "%s%r not in the metrics:\n%s" % (name, labels, self.text)
        return self.samples[key]

    def type_of(self, family):
        assert family in self.families, "%s not in the metrics:\n%s" % (family, self.text)
        return self.families[family].type


def scrape(d, token=None):
    r = d.request("GET", P + "/metrics", headers=bearer(token or d.metrics_token))
    assert r.status == 200, r
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4"), r
    return Metrics(r.body.decode("utf-8"))


def hashes(d):
    return scrape(d).value("authd_hash_seconds_count")


def start(authd, tmp_path, users=None, env=None):
    """authd on USERS, with an app token for `mon` (group metrics) made before it starts."""
    write_users(tmp_path / "users.txt", USERS if users is None else users)
    token = add_token(tmp_path / "users.txt", "mon", label="prometheus")
    d = authd(env=env)
    d.metrics_token = token
    return d


def new_token(d, name, label, days=None):
    """`token add` for the running server D, once D takes it (it re-reads the tokens
    file by its mtime)."""
    token = add_token(d.users_file, name, label=label, days=days)
    wait_until(lambda: d.request("GET", P + "/auth", headers=bearer(token)).status == 200, what="the new token")
    return token


def healthy(d):
    assert d.request("GET", P + "/healthz").status == 200
    assert "Traceback" not in d.log() and "internal error" not in d.log(), d.log()


def login_json(d, name, password, **headers):
    return d.request("POST", P + "/login", headers=headers, body={"username": name, "password": password})


# =========================================================================== HTTP Basic

def test_basic_pair_on_auth_gives_identity_and_no_cookie(tmp_path, authd):
    d = start(authd, tmp_path)
    r = d.request("GET", P + "/auth", headers=basic("alice", PW["alice"]))
    assert r.status == 200, r
    assert (r.headers["x-auth-user"], r.headers["x-auth-groups"], r.headers["x-auth-admin"]) == \
        ("alice", "admin", "true")
    assert not r.header_values("set-cookie"), "an API client gets no session cookie"
    r = d.request("GET", P + "/auth", headers=basic("bob", PW["bob"]))
    assert (r.status, r.headers["x-auth-user"], r.headers["x-auth-admin"]) == (200, "bob", "false")
    # the scheme name is case-insensitive (RFC 7235)
    value = basic("bob", PW["bob"])["Authorization"].replace("Basic", "bAsIc")
    assert d.request("GET", P + "/auth", headers={"Authorization": value}).status == 200
    # any method, as for cookies
    for method in ("POST", "PUT", "DELETE", "HEAD", "OPTIONS"):
        assert d.request(method, P + "/auth", headers=basic("bob", PW["bob"])).status == 200, method
    healthy(d)


def test_basic_password_with_colon_space_and_utf8(tmp_path, authd):
    d = start(authd, tmp_path)
    r = d.request("GET", P + "/auth", headers=basic("carol", PW["carol"]))
    assert r.status == 200 and r.headers["x-auth-user"] == "carol", r
    # only the first colon separates (RFC 7617): "carol:pw:3" is not a pair for "carol:pw"
    assert d.request("GET", P + "/auth", headers=basic("carol", "carol pw")).status == 401


@pytest.mark.parametrize("path,allowed", [
    (P + "/admin", {"alice"}),
    (P + "/auth?group=staff", {"bob"}),
    (P + "/auth?group=staff,admin", {"alice", "bob"}),
    (P + "/auth?user=carol", {"carol"}),
    (P + "/auth?group=staff&user=carol", {"bob", "carol"}),
    (P + "/admin?group=staff", set()),
    (P + "/auth?grop=staff", set()),  # a typo in nginx.conf fails closed
])
def test_basic_on_admin_and_rules(tmp_path, authd, path, allowed):
    d = start(authd, tmp_path)
    for name in ("alice", "bob", "carol"):
        r = d.request("GET", path, headers=basic(name, PW[name]))
        assert r.status == (200 if name in allowed else 403), (path, name, r)
        if r.status == 200:
            assert r.headers["x-auth-user"] == name
    r = d.request("GET", path, headers=basic("bob", "wrong"))
    assert r.status == 401, r
    challenge(r)


def test_wrong_or_unknown_pair_is_401_with_challenge_logged_for_fail2ban(tmp_path, authd):
    d = start(authd, tmp_path)
    for name, password in (("alice", "wrong-pw-XYZ"), ("nobody", "other-pw-QRS"), ("alice", "")):
        r = d.request("GET", P + "/auth", headers=basic(name, password, **{"X-Real-IP": "192.0.2.44"}))
        assert r.status == 401 and r.body == b"", (name, r)
        challenge(r)
        assert not r.header_values("set-cookie"), r
    # the fail2ban filter's line; the password never reaches the log
    d.wait_log(r'login failed from 192\.0\.2\.44 user="alice"')
    d.wait_log(r'login failed from 192\.0\.2\.44 user="nobody"')
    assert "wrong-pw-XYZ" not in d.log() and "other-pw-QRS" not in d.log()
    healthy(d)


def test_remembered_pair_costs_no_second_hash(tmp_path, authd):
    d = start(authd, tmp_path)
    h0 = hashes(d)
    assert d.request("GET", P + "/auth", headers=basic("alice", PW["alice"])).status == 200
    h1 = hashes(d)
    assert h1 == h0 + 1, "a first pair costs exactly one hash"
    for path in (P + "/auth", P + "/admin", P + "/auth?group=admin") * 5:
        assert d.request("GET", path, headers=basic("alice", PW["alice"])).status == 200
    assert hashes(d) == h1, "a remembered pair must not be hashed again"
    # a wrong password for the same user is not remembered: each try is a hash
    for _ in range(2):
        assert d.request("GET", P + "/auth", headers=basic("alice", "nope")).status == 401
    assert hashes(d) == h1 + 2
    # another pair is its own entry
    assert d.request("GET", P + "/auth", headers=basic("bob", PW["bob"])).status == 200
    assert d.request("GET", P + "/auth", headers=basic("bob", PW["bob"])).status == 200
    m = scrape(d)
    assert m.value("authd_hash_seconds_count") == h1 + 3
    assert m.value("authd_basic_cache_entries") == 2
    assert m.value("authd_hash_seconds_sum") > 0


def test_a_pair_arriving_many_times_at_once_is_hashed_once_per_hash_thread(tmp_path, authd):
    """A client's first burst (or its pair expiring from the cache under load) must not
    queue one hash per request: a job that finds the pair verified by an earlier job
    costs none. Only the jobs already running (one per hash thread, 2) may each hash."""
    slow = "slowpw-" + "x" * 8
    d = start(authd, tmp_path, users=USERS + ["dave:%s" % fast_hash(slow, rounds=15)])
    h0 = hashes(d)
    barrier, statuses = threading.Barrier(12), []

    def one():
        conn = d.connect()
        barrier.wait()
        statuses.append(d.request("GET", P + "/auth", headers=basic("dave", slow), conn=conn).status)
        conn.close()
    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * 12, statuses
    assert 1 <= hashes(d) - h0 <= 2, "one hash per hash thread at most, not one per request"
    healthy(d)


def test_remembered_pair_dropped_on_passwd(tmp_path, authd):
    d = start(authd, tmp_path)
    old = basic("alice", PW["alice"])
    assert d.request("GET", P + "/auth", headers=old).status == 200
    r = run_cli("passwd", "alice", "--users", d.users_file, input="alice-new-pw\n")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: d.request("GET", P + "/auth", headers=old).status == 401, what="the old pair refused")
    h = hashes(d)
    assert d.request("GET", P + "/auth", headers=basic("alice", "alice-new-pw")).status == 200
    assert d.request("GET", P + "/auth", headers=basic("alice", "alice-new-pw")).status == 200
    assert hashes(d) == h + 1
    assert d.request("GET", P + "/auth", headers=old).status == 401


def test_remembered_pair_dropped_on_deluser(tmp_path, authd):
    d = start(authd, tmp_path)
    pair = basic("bob", PW["bob"])
    assert d.request("GET", P + "/auth", headers=pair).status == 200
    r = run_cli("deluser", "bob", "--users", d.users_file)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: d.request("GET", P + "/auth", headers=pair).status == 401, what="the deleted user refused")
    challenge(d.request("GET", P + "/auth", headers=pair))


def test_remembered_pair_dropped_when_groups_change(tmp_path, authd):
    """Same hash, new groups: the line changed, so the pair is checked afresh
    and the answer follows the new line at once."""
    d = start(authd, tmp_path)
    pair = basic("bob", PW["bob"])
    assert d.request("GET", P + "/auth?group=staff", headers=pair).status == 200
    h = hashes(d)
    text = d.users_file.read_text()
    bob_line = next(line for line in text.splitlines() if line.startswith("bob:"))
    d.users_file.write_text(text.replace(bob_line, bob_line[:-len(":staff")] + ":ops"))
    wait_until(lambda: d.request("GET", P + "/auth?group=staff", headers=pair).status == 403,
               what="bob's new groups")
    assert d.request("GET", P + "/auth?group=ops", headers=pair).status == 200
    assert hashes(d) == h + 1, "the changed line's pair is verified once more, then remembered"


def test_wrong_pairs_count_against_the_login_rate_limit(tmp_path, authd):
    d = start(authd, tmp_path, env={"AUTH_LOGIN_RATE": "3/900"})
    ip = {"X-Real-IP": "198.51.100.7"}
    h = hashes(d)
    for i in range(3):
        r = d.request("GET", P + "/auth", headers=basic("alice", "guess-%d" % i, **ip))
        assert r.status == 401, r
    assert hashes(d) == h + 3
    # limit reached: even the right pair is refused, without a hash, and still only 401
    r = d.request("GET", P + "/auth", headers=basic("alice", PW["alice"], **ip))
    assert r.status == 401, r
    challenge(r)
    assert hashes(d) == h + 3
    d.wait_log(r"rate limit.*198\.51\.100\.7")
    # the same budget as the login form
    r = login_json(d, "carol", PW["carol"], **ip)
    assert r.status == 429 and "retry-after" in r.headers, r
    # other clients are not affected
    r = d.request("GET", P + "/auth", headers=basic("alice", PW["alice"], **{"X-Real-IP": "198.51.100.8"}))
    assert r.status == 200, r


def test_failed_logins_count_against_basic_too(tmp_path, authd):
    d = start(authd, tmp_path, env={"AUTH_LOGIN_RATE": "2/900"})
    ip = {"X-Real-IP": "198.51.100.9"}
    for _ in range(2):
        assert login_json(d, "bob", "wrong", **ip).status == 401
    r = d.request("GET", P + "/auth", headers=basic("bob", PW["bob"], **ip))
    assert r.status == 401, r


def test_two_factor_user_cannot_use_a_password_but_can_use_a_token(tmp_path, authd):
    users = USERS + ["dave:%s::%s" % (fast_hash(PW["dave"]), TOTP_SECRET)]
    d = start(authd, tmp_path, users=users)
    r = d.request("GET", P + "/auth", headers=basic("dave", PW["dave"]))
    assert r.status == 401, r
    challenge(r)
    assert d.request("GET", P + "/auth", headers=basic("dave", "wrong")).status == 401
    token = new_token(d, "dave", "ci")
    r = d.request("GET", P + "/auth", headers=basic("dave", token))
    assert r.status == 200 and r.headers["x-auth-user"] == "dave", r


# =========================================================================== app tokens: command line

def test_token_add_prints_it_once_and_stores_only_its_sha256(tmp_path):
    users = write_users(tmp_path / "users.txt", USERS)
    token = add_token(users, "alice", label="laptop", days=30)
    other = add_token(users, "alice", label="ci")
    assert token != other
    assert len(base64.urlsafe_b64decode(token[len("authd_"):] + "=")) == 32, "256 random bits"
    path = tokens_file(users)
    assert path.exists(), "the tokens file lives beside the users file"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token not in text and other not in text
    assert token[len("authd_"):] not in text
    for tok, label in ((token, "laptop"), (other, "ci")):
        digest = hashlib.sha256(tok.encode("ascii")).hexdigest()
        line = next(l for l in text.splitlines() if digest in l)
        assert "alice" in line and label in line, line
        times = [int(x) for x in re.findall(r"(?<![0-9a-f])\d{10}(?![0-9a-f])", line)]
        assert times and abs(times[0] - time.time()) < 300, line
        if label == "laptop":
            assert any(abs(t - times[0] - 30 * 86400) <= 1 for t in times[1:]), line
    # listing shows labels and dates, never a token or its hash
    r = token_cli(users, "list", "alice")
    assert r.returncode == 0, r.stderr
    assert "laptop" in r.stdout and "ci" in r.stdout
    assert token not in r.stdout and hashlib.sha256(token.encode()).hexdigest() not in r.stdout
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_token_list_revoke_and_errors(tmp_path):
    users = write_users(tmp_path / "users.txt", USERS)
    add_token(users, "alice", label="laptop")
    add_token(users, "alice", label="ci")
    add_token(users, "bob", label="phone")
    r = token_cli(users, "list")
    assert r.returncode == 0 and all(x in r.stdout for x in ("laptop", "ci", "phone", "alice", "bob")), r
    r = token_cli(users, "list", "bob")
    assert "phone" in r.stdout and "laptop" not in r.stdout, r.stdout
    r = token_cli(users, "revoke", "alice", "ci")
    assert r.returncode == 0, r.stderr
    r = token_cli(users, "list", "alice")
    assert "laptop" in r.stdout and not re.search(r"\bci\b", r.stdout), r.stdout
    failures = [
        ("revoke", "alice", "ci"),                      # already gone
        ("revoke", "nobody", "x"),
        ("add", "nobody"),                              # no such user
        ("add", "alice", "--label", "laptop"),          # label taken
        ("add", "alice", "--label", "has space"),
        ("add", "alice", "--label", "a:b"),
        ("add", "alice", "--days", "0"),
        ("add", "alice", "--days", "-3"),
        ("add", "alice", "--days", "soon"),
        ("list", "nobody"),
    ]
    for args in failures:
        r = token_cli(users, *args)
        assert r.returncode != 0, (args, r.stdout)
        assert r.stderr.strip() and "Traceback" not in r.stderr, (args, r.stderr)
        assert not TOKEN_RE.search(r.stdout), (args, "no token printed on failure")
    r = token_cli(users, "--help")
    assert r.returncode == 0 and "add" in r.stdout and "revoke" in r.stdout


def test_concurrent_token_adds_lose_nothing(tmp_path):
    users = write_users(tmp_path / "users.txt", USERS)
    procs = [subprocess.Popen([sys.executable, str(AUTHD), "token", "add", "alice", "--label", "t%d" % i,
                               "--users", str(users)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={k: v for k, v in os.environ.items() if not k.startswith("AUTH_")})
             for i in range(6)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    r = token_cli(users, "list", "alice")
    for i in range(6):
        assert re.search(r"\bt%d\b" % i, r.stdout), r.stdout
    assert len(TOKEN_RE.findall(b"".join(o for o, _ in outs).decode())) == 6


# =========================================================================== app tokens: the server

def test_bearer_and_token_as_basic_password_cost_no_hash(tmp_path, authd):
    d = start(authd, tmp_path)
    alice, bob = new_token(d, "alice", "laptop"), new_token(d, "bob", "ci")
    h = hashes(d)
    for _ in range(3):
        r = d.request("GET", P + "/auth", headers=bearer(alice))
        assert (r.status, r.headers.get("x-auth-user"), r.headers.get("x-auth-admin")) == (200, "alice", "true"), r
        assert not r.header_values("set-cookie")
        r = d.request("GET", P + "/auth", headers=basic("alice", alice))
        assert (r.status, r.headers.get("x-auth-user")) == (200, "alice"), r
    assert d.request("GET", P + "/admin", headers=bearer(alice)).status == 200
    assert d.request("GET", P + "/admin", headers=bearer(bob)).status == 403
    assert d.request("GET", P + "/auth?group=staff", headers=bearer(bob)).status == 200
    assert d.request("GET", P + "/auth?group=staff", headers=bearer(alice)).status == 403
    # a token is its owner's only: another name with it is refused
    r = d.request("GET", P + "/auth", headers=basic("bob", alice))
    assert r.status == 401, r
    challenge(r)
    assert hashes(d) == h, "tokens are checked by SHA-256, never by a password hash"
    assert scrape(d).value("authd_app_tokens") == 3  # alice, bob and mon's


def test_token_revoke_takes_effect_on_a_running_server(tmp_path, authd):
    d = start(authd, tmp_path)
    keep = add_token(d.users_file, "alice", label="keep")
    gone = new_token(d, "alice", "gone")
    r = token_cli(d.users_file, "revoke", "alice", "gone")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: d.request("GET", P + "/auth", headers=bearer(gone)).status == 401, what="revocation")
    challenge(d.request("GET", P + "/auth", headers=bearer(gone)))
    assert d.request("GET", P + "/auth", headers=basic("alice", gone)).status == 401
    assert d.request("GET", P + "/auth", headers=bearer(keep)).status == 200


def test_passwd_and_deluser_revoke_tokens(tmp_path, authd):
    d = start(authd, tmp_path)
    alice, bob = new_token(d, "alice", "a"), new_token(d, "bob", "b")
    assert run_cli("passwd", "alice", "--users", d.users_file, input="fresh-pw\n").returncode == 0
    wait_until(lambda: d.request("GET", P + "/auth", headers=bearer(alice)).status == 401,
               what="a password change revoking the token")
    assert run_cli("deluser", "bob", "--users", d.users_file).returncode == 0
    wait_until(lambda: d.request("GET", P + "/auth", headers=bearer(bob)).status == 401,
               what="deluser revoking the token")
    # a new user of the same name does not inherit the old one's token
    r = run_cli("adduser", "bob", "--users", d.users_file, input="bob-again\n")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: d.request("GET", P + "/auth", headers=basic("bob", "bob-again")).status == 200,
               what="the new bob")
    assert d.request("GET", P + "/auth", headers=bearer(bob)).status == 401
    assert d.request("GET", P + "/auth", headers=bearer(alice)).status == 401
    # a new token for the new password works
    fresh = new_token(d, "alice", "after")


def test_expired_token_is_refused(tmp_path, authd):
    d = start(authd, tmp_path)
    token = new_token(d, "alice", "short", days=1)
    digest = hashlib.sha256(token.encode("ascii")).hexdigest()
    path = tokens_file(d.users_file)
    lines = path.read_text().splitlines(True)
    i = next(i for i, l in enumerate(lines) if digest in l)
    times = re.findall(r"(?<![0-9a-f])\d{10}(?![0-9a-f])", lines[i])
    created, expires = int(times[0]), next(int(t) for t in times[1:] if int(t) - int(times[0]) in
                                           range(86400 - 1, 86400 + 2))
    # as if it had been made two days ago: expired yesterday
    lines[i] = lines[i].replace(str(expires), str(created - 86400)).replace(str(created), str(created - 2 * 86400))
    path.write_text("".join(lines))
    wait_until(lambda: d.request("GET", P + "/auth", headers=bearer(token)).status == 401, what="expiry")
    challenge(d.request("GET", P + "/auth", headers=bearer(token)))
    assert d.request("GET", P + "/auth", headers=basic("alice", token)).status == 401
    r = token_cli(d.users_file, "list", "alice")
    assert "short" in r.stdout and "expired" in r.stdout.lower(), r.stdout


def test_broken_tokens_file_keeps_the_tokens_it_had(tmp_path, authd):
    d = start(authd, tmp_path)
    token = new_token(d, "alice", "x")
    path = tokens_file(d.users_file)
    path.write_text(path.read_text() + "this line is not a token line\n")
    d.wait_log(r"tokens\.txt.*line \d")
    assert d.request("GET", P + "/auth", headers=bearer(token)).status == 200
    healthy(d)


def test_basic_and_token_answers_are_never_micro_cached(tmp_path, authd):
    """nginx's opt-in micro-cache keys on the cookie: an Authorization answer
    stored there would be served to the next client without a cookie."""
    d = start(authd, tmp_path, env={"AUTH_CACHE_SECONDS": "5"})
    token = new_token(d, "alice", "c")
    r = d.auth(d.login("bob", PW["bob"]))
    assert r.status == 200 and "x-accel-expires" in r.headers, "the cache setting is on for cookies"
    for headers in (basic("alice", PW["alice"]), basic("alice", PW["alice"]), bearer(token), basic("alice", token)):
        r = d.request("GET", P + "/auth", headers=headers)
        assert r.status == 200 and "x-accel-expires" not in r.headers, r


# =========================================================================== who gets a challenge

@pytest.mark.parametrize("headers,is_browser", [
    (CURL_UA, False),
    ({"Accept": "application/json"}, False),
    ({"Accept": "*/*", "User-Agent": "git/2.39.5"}, False),
    (dict(BROWSER), True),
    ({"Accept": "image/avif,image/webp,*/*", "Sec-Fetch-Dest": "image", "Sec-Fetch-Mode": "no-cors"}, True),
    ({"Accept": "*/*", "User-Agent": "Mozilla/5.0 (Macintosh) Safari/605.1.15"}, True),
    ({"Accept": "*/*", "Sec-Fetch-Mode": "cors"}, True),  # fetch() from a page: no dialog either
    ({}, True),  # no Accept at all: as before this change, the login page
])
def test_logged_out_non_browser_gets_a_challenge_browser_never(tmp_path, authd, headers, is_browser):
    d = start(authd, tmp_path)
    for path in (P + "/auth", P + "/admin", P + "/auth?group=staff"):
        r = d.request("GET", path, headers=headers)
        assert r.status == 401 and r.body == b"", (path, r)
        (no_challenge if is_browser else challenge)(r)
    # GET P/login: nginx's `error_page 401` target for a protected URL (X-Original-URI
    # outside P: nginx already passes P/auth's challenge on, so none here, or the
    # client would see two), or a direct request (with the challenge).
    for original, direct in (("/repo.git/info/refs", False), (P + "/login", True), (None, True)):
        extra = {"X-Original-URI": original} if original else {}
        r = d.request("GET", P + "/login", headers=dict(headers, **extra))
        if is_browser:
            assert r.status == 200 and b'name="password"' in r.body, r
            no_challenge(r)
            continue
        assert r.status == 401, r
        (challenge if direct else no_challenge)(r)
        assert r.headers["content-type"].startswith("application/json"), r
        assert r.json()["status"] == "fail" and b"<form" not in r.body


def test_any_authorization_header_makes_a_non_browser(tmp_path, authd):
    d = start(authd, tmp_path)
    for auth in ("Basic " + base64.b64encode(b"alice:wrong").decode(), "Bearer nonsense", "Negotiate abc"):
        r = d.request("GET", P + "/auth", headers=dict(BROWSER, Authorization=auth))
        assert r.status == 401, r
        challenge(r)
    # with a wrong pair and an invalid cookie: the cookie is still cleared
    r = d.request("GET", P + "/auth", headers=basic("alice", "wrong", Cookie="authToken=garbage"))
    assert r.status == 401 and any(v.startswith("authToken=;") for v in r.header_values("set-cookie")), r
    challenge(r)


def test_login_form_post_never_challenges(tmp_path, authd):
    """A wrong password at the login form or the JSON API must not make a
    browser pop its Basic dialog."""
    d = start(authd, tmp_path)
    r = login_json(d, "alice", "wrong", **CURL_UA)
    assert r.status == 401 and r.json()["status"] == "fail", r
    no_challenge(r)
    r = d.request("POST", P + "/login", headers=dict(BROWSER, **{"Content-Type": "application/x-www-form-urlencoded"}),
                  body=b"username=alice&password=wrong")
    assert r.status == 401 and b'name="password"' in r.body, r
    no_challenge(r)


def test_cookie_sessions_unchanged(tmp_path, authd):
    d = start(authd, tmp_path)
    token = d.login("bob", PW["bob"])
    r = d.auth(token, headers=CURL_UA)
    assert r.status == 200 and r.headers["x-auth-user"] == "bob"
    no_challenge(r)


# =========================================================================== metrics: access

def test_metrics_only_for_an_app_token_of_admin_or_metrics(tmp_path, authd):
    d = start(authd, tmp_path, env={"AUTH_BYPASS": BYPASS})
    admin = add_token(d.users_file, "alice", label="prom")
    plain, staff = new_token(d, "carol", "prom"), new_token(d, "bob", "prom")
    for token in (d.metrics_token, admin):
        assert scrape(d, token).type_of("authd_auth_requests") == "counter"
    # the token as the password of a Basic pair (Prometheus' basic_auth) works too
    r = d.request("GET", P + "/metrics", headers=basic("mon", d.metrics_token))
    assert r.status == 200 and b"authd_auth_requests_total" in r.body, r
    cookie = d.login("alice", PW["alice"])
    refused = [
        {},                                                  # anonymous
        dict(CURL_UA),
        dict(BROWSER),
        {"Cookie": "authToken=" + cookie},                   # an admin's browser session: not an app token
        basic("alice", PW["alice"]),                         # an admin's password: not an app token
        basic("x", admin),                                   # a token under another name
        bearer(plain), bearer(staff), basic("carol", plain),  # tokens of users outside admin/metrics
        {"X-Auth-Bypass": BYPASS},
        bearer("authd_" + "A" * 43),
        bearer(d.metrics_token + "x"),
    ]
    for headers in refused:
        r = d.request("GET", P + "/metrics", headers=headers)
        assert r.status in (401, 403), (headers, r)
        assert b"authd_" not in r.body and b"process_" not in r.body, (headers, r)
    # the wrong method
    r = d.request("POST", P + "/metrics", headers=bearer(d.metrics_token))
    assert r.status == 405, r


# =========================================================================== metrics: content

def test_metrics_parse_and_hold_every_required_family(tmp_path, authd):
    d = start(authd, tmp_path)
    m = scrape(d)
    types = {
        "authd_auth_requests": "counter", "authd_logins": "counter", "authd_hash_seconds": "histogram",
        "authd_connections_open": "gauge", "authd_users_loaded": "gauge", "authd_reloads": "counter",
        "authd_token_cache_entries": "gauge", "authd_basic_cache_entries": "gauge", "authd_app_tokens": "gauge",
        "authd_build_info": "gauge", "process_resident_memory_bytes": "gauge", "process_cpu_seconds": "counter",
        "process_start_time_seconds": "gauge",
    }
    for family, kind in types.items():
        assert m.type_of(family) == kind, family
    for result in AUTH_RESULTS:
        assert m.value("authd_auth_requests_total", result=result) == 0
    for result in LOGIN_RESULTS:
        assert m.value("authd_logins_total", result=result) == 0
    for result in ("ok", "error"):
        m.value("authd_reloads_total", result=result)
    assert m.value("authd_users_loaded") == 4
    assert m.value("authd_app_tokens") == 1
    version = run_cli("--version").stdout.split()[-1]
    build = [k for k in m.samples if k[0] == "authd_build_info"]
    assert len(build) == 1 and ("version", version) in build[0][1], build
    assert m.samples[build[0]] == 1
    # histogram buckets are cumulative and end in +Inf == count
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in m.samples.items() if k[0] == "authd_hash_seconds_bucket")
    assert buckets[-1][0] == float("inf") and buckets[-1][1] == m.value("authd_hash_seconds_count")
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))


def test_process_metrics_match_the_kernel(tmp_path, authd):
    t0 = time.time()
    d = start(authd, tmp_path)
    t1 = time.time()
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")

    def cpu_seconds():
        fields = Path("/proc/%d/stat" % d.proc.pid).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    c0 = cpu_seconds()
    m = scrape(d)
    c1 = cpu_seconds()
    rss = int(Path("/proc/%d/statm" % d.proc.pid).read_text().split()[1]) * page
    assert c0 - 0.02 <= m.value("process_cpu_seconds_total") <= c1 + 0.02
    assert t0 - 2 <= m.value("process_start_time_seconds") <= t1 + 2
    assert 0.7 * rss <= m.value("process_resident_memory_bytes") <= 1.3 * rss


def test_the_session_cache_stays_bounded_as_cookies_are_re_signed(tmp_path, authd):
    """Every active user's cookie is re-signed once a minute and each new token is
    cached (~1.3 KiB): the cache is emptied at 1,024 entries, not at 10,000 (13 MiB)."""
    import jwt
    d = start(authd, tmp_path)
    real = jwt.decode(d.login("bob", PW["bob"]), SECRET, algorithms=["HS256"])
    conn = d.connect()
    for i in range(1100):
        shift = {k: real[k] - i for k in ("iat", "exp", "auth_time")}
        token = jwt.encode(dict(real, **shift), SECRET, algorithm="HS256")
        r = d.request("GET", P + "/auth", headers={"Cookie": "authToken=" + token}, conn=conn)
        assert r.status == 200, (i, r)
    conn.close()
    assert 1 <= scrape(d).value("authd_token_cache_entries") <= 1024
    healthy(d)


def test_connections_users_reloads_and_cache_gauges(tmp_path, authd):
    d = start(authd, tmp_path)
    # the scrape's own connection; a closed one may take the server a moment to notice
    wait_until(lambda: scrape(d).value("authd_connections_open") == 1, what="one connection")
    conns = [d.connect() for _ in range(3)]
    for c in conns:  # a request on each, so that the server has surely accepted them
        assert d.request("GET", P + "/healthz", conn=c).status == 200
    wait_until(lambda: scrape(d).value("authd_connections_open") == 4, what="four connections")
    for c in conns:
        c.close()
    wait_until(lambda: scrape(d).value("authd_connections_open") == 1, what="closed connections")

    m = scrape(d)
    ok, error = m.value("authd_reloads_total", result="ok"), m.value("authd_reloads_total", result="error")
    assert m.value("authd_token_cache_entries") == 0
    assert d.auth(d.login("bob", PW["bob"])).status == 200
    assert scrape(d).value("authd_token_cache_entries") == 1
    with open(d.users_file, "a") as f:
        f.write("erin:%s\n" % fast_hash("erin-pw"))
    wait_until(lambda: scrape(d).value("authd_users_loaded") == 5, what="the new user")
    # the count follows the swap of the users by a moment (another thread): wait for it
    wait_until(lambda: scrape(d).value("authd_reloads_total", result="ok") == ok + 1, what="the reload counted")
    with open(d.users_file, "a") as f:
        f.write("this line is broken\n")
    wait_until(lambda: scrape(d).value("authd_reloads_total", result="error") == error + 1, what="a failed reload")
    m = scrape(d)
    assert m.value("authd_users_loaded") == 5 and m.value("authd_reloads_total", result="ok") == ok + 1


def test_login_counters(tmp_path, authd):
    d = start(authd, tmp_path, env={"AUTH_LOGIN_RATE": "2/900"})
    before = scrape(d)
    assert login_json(d, "alice", PW["alice"]).status == 200
    assert login_json(d, "bob", PW["bob"], **{"X-Real-IP": "10.9.0.1"}).status == 200
    assert login_json(d, "alice", "wrong", **{"X-Real-IP": "10.9.0.2"}).status == 401
    assert login_json(d, "alice", "wrong", **{"X-Real-IP": "10.9.0.2"}).status == 401
    assert login_json(d, "alice", PW["alice"], **{"X-Real-IP": "10.9.0.2"}).status == 429
    assert login_json(d, "alice", PW["alice"], Origin="https://evil.example", Host="good.example").status == 403
    after = scrape(d)
    delta = {r: after.value("authd_logins_total", result=r) - before.value("authd_logins_total", result=r)
             for r in LOGIN_RESULTS}
    assert delta == {"ok": 2, "fail": 2, "rate-limited": 1, "busy": 0, "cross-site": 1, "two-factor": 0}
    # four password hashes: two right, two wrong; none for the refused ones
    assert after.value("authd_hash_seconds_count") - before.value("authd_hash_seconds_count") == 4


def test_auth_counters_exact_after_8_threads_doing_10000_requests(tmp_path, authd):
    d = start(authd, tmp_path, env={"AUTH_BYPASS": BYPASS})
    alice_cookie, bob_cookie = d.login("alice", PW["alice"]), d.login("bob", PW["bob"])
    token = new_token(d, "carol", "load")
    assert d.request("GET", P + "/auth", headers=basic("bob", PW["bob"])).status == 200  # remembered from now on
    kinds = {  # result: (path, headers, status)
        "allow": (P + "/auth", {"Cookie": "authToken=" + alice_cookie}, 200),
        "deny": (P + "/auth", dict(CURL_UA), 401),
        "forbidden": (P + "/admin", {"Cookie": "authToken=" + bob_cookie}, 403),
        "bypass": (P + "/auth", {"X-Auth-Bypass": BYPASS}, 200),
        "basic": (P + "/auth?group=staff", basic("bob", PW["bob"]), 200),
        "token": (P + "/auth", bearer(token), 200),
    }
    order = list(kinds)
    threads, total = 8, 10000
    per_thread = total // threads
    counts = [collections.Counter() for _ in range(threads)]
    errors = []
    before = scrape(d)

    def work(i):
        conn = d.connect()
        try:
            for j in range(per_thread):
                result = order[(i + j * 7) % len(order)]
                path, headers, status = kinds[result]
                r = d.request("GET", path, headers=headers, conn=conn)
                if r.status != status:
                    errors.append((result, r))
                    return
                counts[i][result] += 1
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)
        finally:
            conn.close()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
    assert not errors, errors[:3]
    expected = sum(counts, collections.Counter())
    assert sum(expected.values()) == total
    after = scrape(d)
    got = {r: after.value("authd_auth_requests_total", result=r) - before.value("authd_auth_requests_total", result=r)
           for r in AUTH_RESULTS}
    assert got == {r: expected[r] for r in AUTH_RESULTS}
    assert after.value("authd_hash_seconds_count") == before.value("authd_hash_seconds_count")


# =========================================================================== hostile input

def b64(data):
    return base64.b64encode(data).decode("ascii")


HOSTILE = [
    ("empty Basic", b"Basic"),
    ("Basic and a space", b"Basic "),
    ("bad base64", b"Basic !!!not-base64!!!"),
    ("only padding", b"Basic ===="),
    ("base64 with whitespace inside", b"Basic YWxp Y2U6YWxpY2UtcHc="),
    ("no colon", ("Basic " + b64(b"alicealice-pw")).encode()),
    ("empty name and password", ("Basic " + b64(b":")).encode()),
    ("empty name", ("Basic " + b64(b":alice-pw")).encode()),
    ("non-UTF-8 pair", ("Basic " + b64(b"al\xffice:alice-\xfepw")).encode()),
    ("non-UTF-8 raw header", b"Basic \xe9\xe9\xe9"),
    ("NUL in the name", ("Basic " + b64(b"alice\x00:alice-pw")).encode()),
    ("a user name with a colon", ("Basic " + b64(b"ali:ce:alice-pw")).encode()),
    ("10 KB of base64", ("Basic " + b64(b"alice:" + b"p" * 7600)).encode()),
    ("10 KB of junk", b"Basic " + b"A" * 10240),
    ("10 KB name", ("Basic " + b64(b"n" * 7600 + b":pw")).encode()),
    ("empty Bearer", b"Bearer"),
    ("Bearer and a space", b"Bearer "),
    ("token too short", b"Bearer authd_abc"),
    ("token too long", b"Bearer authd_" + b"A" * 44),
    ("token wrong prefix", b"Bearer ghp_" + b"A" * 43),
    ("token no prefix", b"Bearer " + b"A" * 49),
    ("token bad character", b"Bearer authd_" + b"A" * 42 + b"!"),
    ("token non-ASCII", b"Bearer authd_" + b"\xe9" * 43),
    ("10 KB Bearer", b"Bearer authd_" + b"A" * 10240),
    ("Digest", b'Digest username="alice", realm="x", nonce="1", uri="/", response="0"'),
    ("unknown scheme", b"Negotiate YIIBhg=="),
]


@pytest.mark.parametrize("name,value", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_authorization_is_a_clean_401(tmp_path, authd, name, value):
    d = start(authd, tmp_path)
    for path in (P + "/auth", P + "/admin", P + "/auth?group=staff"):
        r = d.request("GET", path, headers={"Authorization": value})
        assert r.status in (400, 401), (name, path, r)  # 400 only for a header HTTP itself forbids
        if r.status == 401:
            challenge(r)
    healthy(d)


def test_hostile_values_cost_no_hash_and_leave_nothing_behind(tmp_path, authd):
    d = start(authd, tmp_path)
    h = hashes(d)
    cheap = [v for n, v in HOSTILE if n not in ("a user name with a colon", "empty name", "10 KB of base64")]
    for value in cheap:
        d.request("GET", P + "/auth", headers={"Authorization": value})
    m = scrape(d)
    assert m.value("authd_hash_seconds_count") == h, "malformed credentials are refused before any hash"
    assert m.value("authd_basic_cache_entries") == 0
    healthy(d)


def test_revoked_expired_and_foreign_tokens_as_basic_passwords(tmp_path, authd):
    d = start(authd, tmp_path)
    token = new_token(d, "alice", "x")
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    h = hashes(d)
    for headers in (basic("alice", flipped), bearer(flipped), basic("bob", token)):
        r = d.request("GET", P + "/auth", headers=headers)
        assert r.status == 401, (headers, r)
        challenge(r)
    assert hashes(d) == h, "a token-shaped secret is checked as a token only"
    # not token-shaped: an ordinary (wrong) password
    for headers in (basic("alice", token + "A"), basic("alice", token.upper())):
        r = d.request("GET", P + "/auth", headers=headers)
        assert r.status == 401, (headers, r)
        challenge(r)
    assert token_cli(d.users_file, "revoke", "alice", "x").returncode == 0
    wait_until(lambda: d.request("GET", P + "/auth", headers=basic("alice", token)).status == 401,
               what="revocation")


def test_flood_of_distinct_wrong_pairs_is_rate_limited_and_bounded(tmp_path, authd):
    """8 clients from one address send 4,000 distinct wrong pairs (unknown names:
    each one a full-cost dummy hash if it got that far). The address's login
    budget stops the hashing, memory stays bounded, and /auth keeps answering
    everyone else while the flood runs."""
    d = start(authd, tmp_path, env={"AUTH_LOGIN_RATE": "5/900"})
    cookie = d.login("alice", PW["alice"])
    rss = lambda: scrape(d).value("process_resident_memory_bytes")  # noqa: E731
    before = scrape(d)
    rss0 = before.value("process_resident_memory_bytes")
    statuses, challenged, errors = collections.Counter(), [0], []
    per_thread = 500

    def flood(i):
        conn = d.connect(timeout=60)
        try:
            for j in range(per_thread):
                r = d.request("GET", P + "/auth", conn=conn, headers=basic(
                    "flood-%d-%d" % (i, j), "guess-%d-%d" % (i, j), **{"X-Real-IP": "203.0.113.66"}))
                statuses[r.status] += 1
                challenged[0] += bool(r.header_values("www-authenticate"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    answered_during_flood = 0
    while any(t.is_alive() for t in threads):
        r = d.request("GET", P + "/auth", headers={"Cookie": "authToken=" + cookie, "X-Real-IP": "198.51.100.1"})
        assert r.status == 200, r
        if any(t.is_alive() for t in threads):
            answered_during_flood += 1
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert statuses == {401: 8 * per_thread} and challenged[0] == 8 * per_thread, statuses
    assert answered_during_flood >= 1
    after = scrape(d)
    spent = after.value("authd_hash_seconds_count") - before.value("authd_hash_seconds_count")
    assert 1 <= spent <= 5, "the address's budget (5) bounds the hashes: %s" % spent
    assert after.value("authd_basic_cache_entries") == 0
    assert rss() - rss0 < 64 << 20, "memory grew by %d MiB" % ((rss() - rss0) >> 20)
    # others still get in, with a pair too
    r = d.request("GET", P + "/auth", headers=basic("bob", PW["bob"], **{"X-Real-IP": "198.51.100.2"}))
    assert r.status == 200, r
    healthy(d)


# =========================================================================== unit: the pair cache

import authd as authd_module  # noqa: E402  (importing it must not start anything)


def test_pair_cache_unit_keyed_bounded_and_time_limited():
    cache = authd_module.PairCache(size=3, ttl=300)
    header = "Basic " + b64(b"alice:s3cret-pass")
    key = cache.key(header)
    assert isinstance(key, bytes) and len(key) >= 16
    for secret in (b"s3cret-pass", b"alice", header.encode(), header[6:].encode()):
        assert secret not in key
    assert key == cache.key(header)
    assert key != cache.key("Basic " + b64(b"alice:s3cret-pasS"))
    assert key != authd_module.PairCache(size=3, ttl=300).key(header), "a per-process random key"
    now = 1000.0
    cache.put(key, "line-1", now)
    assert cache.get(key, now + 299) == "line-1"
    assert cache.get(key, now + 301) is None, "forgotten after the time limit"
    assert len(cache) == 0
    for i in range(10):
        cache.put(cache.key("Basic " + b64(b"u%d:p" % i)), "line", now)
    assert len(cache) == 3
    assert cache.get(cache.key("Basic " + b64(b"u9:p")), now) == "line", "the newest entry stays"
    assert cache.get(cache.key("Basic " + b64(b"u0:p")), now) is None, "the oldest went first"
    cache.clear()
    assert len(cache) == 0


# =========================================================================== real clients through nginx

def tool_checks():
    need(shutil.which("curl"), "curl is missing (Debian: apt-get install curl)")
    need(shutil.which("git"), "git is missing (Debian: apt-get install git)")
    need(importlib.util.find_spec("requests") is not None, "the requests package is missing (requirements-test.txt)")


@pytest.fixture(scope="module")
def api_site(nginx_tools, cert, tmp_path_factory):
    from test_e2e import Site
    tool_checks()
    workdir = tmp_path_factory.mktemp("api-site")
    site = Site(workdir / "site", *cert)
    try:
        site.tokens = {name: new_token(site.authd, name, "api") for name in ("alice", "bob")}
        site.metrics_token = new_token(site.authd, "alice", "prometheus")
        site.repo = make_repo(site.root / "static" / "repo.git", workdir / "src")
        yield site
    finally:
        site.stop()


def git_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "AUTH_"))}
    env.update({"HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "",
                "SSH_ASKPASS": "", "LC_ALL": "C"})
    return env


def make_repo(bare, src):
    """A bare repository with one commit, ready for dumb HTTP (update-server-info)."""
    env = git_env(src.parent)
    run = lambda *a, cwd=None: subprocess.run(["git"] + list(a), cwd=cwd, env=env, check=True,  # noqa: E731
                                              capture_output=True, timeout=60)
    src.mkdir(parents=True)
    (src / "README").write_text("served by nginx behind authd\n")
    run("init", "-q", "-b", "main", str(src))
    run("-c", "user.name=t", "-c", "user.email=t@example.com", "add", "README", cwd=src)
    run("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "one", cwd=src)
    run("clone", "-q", "--bare", str(src), str(bare))
    run("update-server-info", cwd=bare)
    return bare


def curl(site, *args):
    r = subprocess.run(["curl", "-sk", "-o", "-", "-D", "/dev/stderr", "-w", "\n%{http_code}"] + list(args),
                       capture_output=True, timeout=60)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code), r.stderr.decode("latin-1"), body


def is_login_page(body):
    return b'name="password"' in body


def test_curl_through_nginx(api_site):
    url = api_site.url + "/static/page.html"
    expected = (api_site.root / "static" / "page.html").read_bytes()
    code, head, body = curl(api_site, "-u", "alice:" + "alice-pw-1", url)
    assert code == 200 and body == expected, (code, head)
    code, head, body = curl(api_site, "-u", "alice:" + api_site.tokens["alice"], url)
    assert code == 200 and body == expected, (code, head)
    code, head, body = curl(api_site, "-H", "Authorization: Bearer " + api_site.tokens["bob"], url)
    assert code == 200 and body == expected, (code, head)
    for args in (["-u", "alice:wrong"], ["-u", "alice:" + api_site.tokens["bob"]], []):
        code, head, body = curl(api_site, *args, url)
        assert code == 401, (args, code, head)
        assert len(re.findall(r"(?im)^www-authenticate: Basic realm=\"[^\"]+\"", head)) == 1, head
        assert not is_login_page(body) and b"<html" not in body.lower(), body[:300]
    # --fail makes a script stop, as with auth_basic
    r = subprocess.run(["curl", "-skf", "-u", "alice:wrong", url], capture_output=True, timeout=60)
    assert r.returncode == 22
    # the application behind location / too, with the identity headers
    code, head, body = curl(api_site, "-u", "bob:bob-pw-2", api_site.url + "/app/x")
    assert code == 200 and b"&quot;x-auth-user&quot;: [&quot;bob&quot;]" in body, body[:500]
    # rules: bob is no admin
    code, head, body = curl(api_site, "-u", "bob:bob-pw-2", api_site.url + "/admin/x")
    assert code == 403, code


def test_git_clone_over_dumb_http_through_nginx(api_site, tmp_path):
    base = api_site.url.replace("https://", "")
    env = git_env(tmp_path)

    def clone(userinfo, dest):
        url = "https://%s%s/static/repo.git" % (userinfo + "@" if userinfo else "", base)
        return subprocess.run(["git", "-c", "http.sslVerify=false", "-c", "credential.helper=", "clone", "-q",
                               url, str(tmp_path / dest)], env=env, capture_output=True, text=True, timeout=120)

    r = clone("alice:alice-pw-1", "with-password")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "with-password" / "README").read_text() == "served by nginx behind authd\n"
    r = clone("bob:" + api_site.tokens["bob"], "with-token")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "with-token" / "README").exists()
    r = clone("alice:wrong", "wrong")
    assert r.returncode != 0 and "Authentication failed" in r.stderr, r.stderr
    # no credentials: git got a 401 challenge and asked for a user name (prompts are off)
    r = clone("", "none")
    assert r.returncode != 0 and "could not read Username" in r.stderr, r.stderr


def test_python_requests_through_nginx(api_site):
    import requests
    import urllib3
    url = api_site.url + "/static/page.html"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        with requests.Session() as s:
            s.auth = ("alice", api_site.tokens["alice"])
            for _ in range(3):  # verify per request: a CA bundle in the environment overrides Session.verify
                r = s.get(url, timeout=30, verify=False)
                assert r.status_code == 200 and b"Protected static page" in r.content, r
        r = requests.get(url, auth=("alice", "alice-pw-1"), verify=False, timeout=30)
        assert r.status_code == 200
        for auth in (("alice", "wrong"), ("bob", api_site.tokens["alice"]), None):
            r = requests.get(url, auth=auth, verify=False, timeout=30)
            assert r.status_code == 401, (auth, r)
            assert re.match(r'Basic realm="[^"]+"', r.headers["WWW-Authenticate"]), r.headers
            assert not is_login_page(r.content)
            assert r.json()["status"] == "fail"


def test_metrics_through_nginx(api_site):
    r = api_site.fetch("GET", P + "/metrics")
    assert r.status in (401, 403, 404) and b"authd_" not in r.body, r
    r = api_site.fetch("GET", P + "/metrics", headers=BROWSER)
    assert r.status in (401, 403, 404) and b"authd_" not in r.body, r
    r = api_site.fetch("GET", P + "/metrics", headers=bearer(api_site.tokens["bob"]))
    assert r.status in (401, 403) and b"authd_" not in r.body, r
    r = api_site.fetch("GET", P + "/metrics", headers=bearer(api_site.metrics_token))
    assert r.status == 200, r
    Metrics(r.body.decode("utf-8")).value("authd_auth_requests_total", result="basic")


def test_browser_gets_the_login_page_with_401_and_never_a_challenge(api_site):
    """The example config serves the login page with the 401 status
    (`error_page 401 /__auth/login;`, no `=`), without WWW-Authenticate."""
    r = api_site.fetch("GET", "/some/page", headers=BROWSER)
    assert r.status == 401 and is_login_page(r.body), r
    no_challenge(r)
    r = api_site.fetch("GET", "/static/logo.png", headers={
        "Accept": "image/avif,image/webp,*/*", "Sec-Fetch-Dest": "image", "Sec-Fetch-Mode": "no-cors",
        "User-Agent": BROWSER["User-Agent"]})
    assert r.status == 401, r
    no_challenge(r)


def test_chromium_sees_401_login_page_and_no_basic_dialog(api_site, browser):
    ctx = browser.new_context(ignore_https_errors=True)
    page = ctx.new_page()
    responses = []
    page.on("response", lambda resp: responses.append(resp))
    nav = page.goto(api_site.url + "/static/page.html")
    assert nav.status == 401
    assert "www-authenticate" not in nav.all_headers()
    assert page.get_by_label("Password").is_visible()
    assert all("www-authenticate" not in resp.all_headers() for resp in responses)
    login_in_browser(page, "carol", "carol-pw-3")
    page.wait_for_url(api_site.url + "/static/page.html")
    assert page.locator("#marker").inner_text() == "Protected static page"
    ctx.close()


def test_micro_cache_never_hands_a_basic_answer_to_someone_else(nginx_tools, cert, tmp_path):
    """The example config with its micro-cache switched on: after a client got in
    with Basic or a token, a client without credentials still gets 401."""
    from test_e2e import Site
    tool_checks()
    site = Site(tmp_path / "site", *cert, authd_env={"AUTH_CACHE_SECONDS": "30"}, cache=True)
    try:
        token = new_token(site.authd, "alice", "c")
        url = site.url + "/static/page.html"
        for args in (["-u", "alice:alice-pw-1"], ["-H", "Authorization: Bearer " + token]):
            for _ in range(2):
                assert curl(site, *args, url)[0] == 200
            code, head, body = curl(site, url)
            assert code == 401 and b"Protected static page" not in body, (args, code, head)
            code, _, _ = curl(site, "-u", "alice:wrong", url)
            assert code == 401, args
    finally:
        site.stop()
