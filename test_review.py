"""Regression tests for the outside security review (issue 9, findings 1, 2
and 4-9). Each test was written before its fix and failed on a2595e4 for the
reason its docstring gives.

Real parts: authd.py as a subprocess, the real nginx running
nginx.example.conf (the Site of test_e2e.py), the real command line run as
root for the symlink tests. Only time is bent: the reload test shortens
authd's wait for a hash slot.
"""
import base64
import fcntl
import hashlib
import os
import re
import secrets
import signal
import socket
import ssl
import stat
import statistics
import subprocess
import sys
import threading
import time
import http.client
from pathlib import Path

import pytest

from conftest import (HERE, SECRET, Authd, Response, echo_of, fast_hash, need, run_cli, users_line, wait_until,
                      write_users)

P = "/__auth"
README = HERE / "README.md"


def patient_request(d, method, path, **kwargs):
    """d.request with a minute's patience: a default-cost scrypt can take
    seconds on a loaded machine (the test machine is shared)."""
    conn = d.connect(timeout=60)
    try:
        return d.request(method, path, conn=conn, **kwargs)
    finally:
        conn.close()


def request_with_headers(port, method, path, header_list, tls=False):
    """One request with HEADER_LIST sent as given (a name may repeat)."""
    if tls:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=20,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(method, path)
        for name, value in header_list:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def raw_exchange(port, data, timeout=10):
    """Send raw bytes; return everything the server sends until it closes or
    goes quiet (status line first)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


# ===========================================================================
# Finding 1: micro-cache poisoning with a second authToken value
# ===========================================================================

# Cookie headers where nginx's $cookie_authToken (the cache key) is empty --
# the key every visitor without a cookie shares -- while authd finds the
# valid token. Each was checked against nginx 1.22: nginx matches the name
# case-insensitively, splits on "," as well as ";", and does not see a name
# after a tab. {T} is a valid token.
POISONS = [
    ("empty first value", ["authToken=; authToken={T}"]),
    ("case variant first", ["AuthToken=; authToken={T}"]),
    ("space before =", ["authToken =; authToken={T}"]),
    ("comma-joined first", ["foo=bar,authToken=; authToken={T}"]),
    ("name without value", ["authToken; authToken={T}"]),
    ("tab before the name", ["a=1;\tauthToken={T}"]),
    ("two Cookie headers", ["authToken=", "authToken={T}"]),
]


def cookie_headers(values, token):
    return [("Cookie", v.replace("{T}", token)) for v in values]


def test_cache_header_only_for_a_single_unambiguous_cookie(authd):
    """Fails on a2595e4: X-Accel-Expires is sent for every variant below,
    because authd caches whenever the first *valid* value verifies."""
    d = authd(users=["carol:" + fast_hash("carol-pw")], env={"AUTH_CACHE_SECONDS": "5"})
    token = d.login("carol", "carol-pw")
    for values in (["authToken={T}"], ["a=1; authToken={T}"], ["a=1;authToken={T}; b=2"]):
        r = request_with_headers(d.port, "GET", P + "/auth", cookie_headers(values, token))
        assert r.status == 200 and r.header_values("x-accel-expires") == ["5"], (values, r)
    for what, values in POISONS:
        r = request_with_headers(d.port, "GET", P + "/auth", cookie_headers(values, token))
        assert r.status == 200 and r.headers["x-auth-user"] == "carol", (what, r)
        assert r.header_values("x-accel-expires") == [], (what, r)


def test_micro_cache_cannot_be_poisoned_for_anonymous_visitors(nginx_tools, cert, tmp_path):
    """Fails on a2595e4: after `Cookie: authToken=; authToken=<carol's token>`
    nginx stores carol's 200 under the empty key, and the next visitor without
    a cookie reaches the app as carol."""
    from test_e2e import PASSWORDS, Site, is_login_page
    s = Site(tmp_path, *cert, authd_env={"AUTH_CACHE_SECONDS": "5"}, cache=True)
    try:
        token = s.login("carol", PASSWORDS["carol"])
        for what, values in POISONS:
            r = request_with_headers(s.https_port, "GET", "/poison", cookie_headers(values, token), tls=True)
            assert r.status == 200, (what, r)  # carol herself is let in
            before = len(s.app.requests)
            r = s.fetch("GET", "/anonymous")
            assert is_login_page(r.body), (what, r, s.app.requests[before:])
            assert len(s.app.requests) == before, (what, s.app.requests[before:])
            r = s.fetch("GET", "/admin/anonymous")
            assert r.status != 200 or is_login_page(r.body), (what, r)
    finally:
        s.stop()


# ===========================================================================
# Finding 2: symlinks (and other non-regular files) planted by the service user
# ===========================================================================

SERVICE_UID = 4242  # the users file belongs to someone else: root's adduser hands the lock to them


@pytest.fixture
def as_root():
    need(os.geteuid() == 0, "the planted-symlink tests run as root (CI runs as root)")


def victim_file(tmp_path):
    """A root-owned file standing in for /etc/passwd."""
    victim = tmp_path / "victim"
    victim.write_text("root:x:0:0:root:/root:/bin/bash\n")
    os.chown(victim, 0, 0)
    os.chmod(victim, 0o644)
    return victim


def snapshot(path):
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), Path(path).read_bytes()


def service_users_file(tmp_path):
    users = write_users(tmp_path / "users.txt", ["alice:" + fast_hash("alice-pw")], mode=0o640)
    os.chown(users, SERVICE_UID, SERVICE_UID)
    return users


def adduser_as_root(users, tmp_path):
    return run_cli("adduser", "bob", "--users", users, input="bob-password-1\n", cwd=tmp_path)


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_lock_file_must_be_our_own_regular_file(as_root, tmp_path, plant):
    """Fails on a2595e4: root's adduser opens .users.txt.lock through the
    planted link and fchowns the target (/etc/passwd here) to the service
    user; a FIFO is taken as a lock file too."""
    users = service_users_file(tmp_path)
    before_users = users.read_text()
    victim = victim_file(tmp_path)
    before = snapshot(victim)
    lock = tmp_path / ".users.txt.lock"
    if plant == "symlink":
        os.symlink(victim, lock)
    elif plant == "hardlink":  # fs.protected_hardlinks stops the service user; root can plant it for the test
        os.link(victim, lock)
    else:
        os.mkfifo(lock)
    r = adduser_as_root(users, tmp_path)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert ".users.txt.lock" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert snapshot(victim) == before
    assert users.read_text() == before_users


def test_lock_file_symlink_creates_nothing(as_root, tmp_path):
    """Fails on a2595e4: O_CREAT through a dangling .users.txt.lock link
    creates a root-owned file wherever the link points."""
    users = service_users_file(tmp_path)
    target = tmp_path / "elsewhere" / "created-through-the-link"
    target.parent.mkdir()
    os.symlink(target, tmp_path / ".users.txt.lock")
    r = adduser_as_root(users, tmp_path)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert ".users.txt.lock" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not target.exists() and not os.path.lexists(target)
    assert users_line(users, "bob") is None


def test_planted_temporary_file_links_are_not_followed(as_root, tmp_path):
    """Passed on a2595e4 already (mkstemp uses O_CREAT|O_EXCL|O_NOFOLLOW and
    a random name, and stale temporary files are unlinked, not opened); kept
    so that a predictable temporary name never opens through a link."""
    users = service_users_file(tmp_path)
    victim = victim_file(tmp_path)
    before = snapshot(victim)
    dangling = tmp_path / "elsewhere" / "created-through-the-link"
    dangling.parent.mkdir()
    links = [tmp_path / ".users.txt.tmp-planted1", tmp_path / ".users.txt.tmp-planted2"]
    os.symlink(victim, links[0])
    os.symlink(dangling, links[1])
    r = adduser_as_root(users, tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert users_line(users, "bob") is not None
    assert not os.path.islink(users) and stat.S_ISREG(os.lstat(users).st_mode)
    assert snapshot(victim) == before
    assert not os.path.lexists(dangling)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def secret_env(path):
    return {"AUTH_SECRET_FILE": str(path)}


def serve_until_it_exits(folder, env, what):
    """`authd.py serve` that must refuse to start: its completed run."""
    try:
        return run_cli("serve", "--users", folder / "users.txt", "--env", "/dev/null", "--port", "0",
                       env=env, cwd=folder, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("serve started (or hung) " + what)


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_secret_file_must_be_a_regular_file(as_root, tmp_path, plant):
    """Fails on a2595e4: `check` and `serve` read the secret through a planted
    symlink (symlink), and hang for ever opening a planted FIFO (fifo)."""
    users = write_users(tmp_path / "users.txt", ["alice:" + fast_hash("alice-pw")])
    secret_file = tmp_path / ".authd_secret"
    if plant == "symlink":
        target = tmp_path / "someone-elses-secret"
        target.write_text(secrets.token_urlsafe(48) + "\n")
        os.chmod(target, 0o600)
        os.symlink(target, secret_file)
    else:
        os.mkfifo(secret_file)
    try:
        r = run_cli("check", "--users", users, env=secret_env(secret_file), cwd=tmp_path, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("check hung on the planted %s" % plant)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert ".authd_secret" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = serve_until_it_exits(tmp_path, secret_env(secret_file), "with a planted %s as its secret file" % plant)
    assert r.returncode != 0 and ".authd_secret" in r.stderr and "Traceback" not in r.stderr, r.stderr
    if plant == "symlink":
        assert os.path.islink(secret_file)


def test_secret_file_dangling_symlink_creates_nothing(as_root, tmp_path):
    """Passed on a2595e4 already (O_EXCL refuses an existing link); kept as a
    guard: authd never creates its secret through a planted link."""
    write_users(tmp_path / "users.txt", ["alice:" + fast_hash("alice-pw")])
    target = tmp_path / "elsewhere" / "secret-through-the-link"
    target.parent.mkdir()
    secret_file = tmp_path / ".authd_secret"
    os.symlink(target, secret_file)
    r = serve_until_it_exits(tmp_path, secret_env(secret_file), "with a dangling link as its secret file")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert not os.path.lexists(target)


# ===========================================================================
# Finding 4: /ADMIN/ and /admin;x/ reach the app past `location /admin/`
# ===========================================================================

@pytest.fixture(scope="module")
def site(nginx_tools, cert, tmp_path_factory):
    from test_e2e import Site
    s = Site(tmp_path_factory.mktemp("review-site"), *cert)
    yield s
    s.stop()


ADMIN_SPELLINGS = ["/ADMIN/secret", "/Admin/secret", "/admin;x/secret", "/ADMIN;jsessionid=1/secret",
                   "/admin%3Bx/secret", "/%41DMIN/secret", "/admin", "/admin;", "/Admin"]


def test_admin_location_holds_for_case_and_semicolon_spellings(site):
    """Fails on a2595e4: /ADMIN/secret and /admin;x/secret fall through to
    `location /`, so a non-admin reaches the app; Express routes them to
    /admin/secret (case-insensitive) and Java stacks strip ;x."""
    from test_e2e import PASSWORDS, is_login_page
    carol = site.login("carol", PASSWORDS["carol"])
    for path in ADMIN_SPELLINGS:
        before = len(site.app.requests)
        r = site.fetch("GET", path, token=carol)
        assert r.status == 403, (path, r)
        assert len(site.app.requests) == before, (path, site.app.requests[before:])
        assert is_login_page(site.fetch("GET", path).body), path
    alice = site.login("alice", PASSWORDS["alice"])
    for path in ("/ADMIN/secret", "/admin;x/secret", "/admin/secret"):
        r = site.fetch("GET", path, token=alice)
        assert r.status == 200 and echo_of(r.body)["headers"]["x-auth-user"] == ["alice"], (path, r)
    # not over-broad: a path that merely starts with the letters is an ordinary page
    r = site.fetch("GET", "/administrators-guide", token=carol)
    assert r.status == 200 and echo_of(r.body)["headers"]["x-auth-user"] == ["carol"], r


def readme_paragraphs():
    return [p.replace("\n", " ") for p in re.split(r"\n\s*\n", README.read_text())]


def test_readme_explains_the_admin_regex():
    """Fails on a2595e4: README does not say why /admin needs a
    case-insensitive location that also matches ';'."""
    assert any(re.search(r"/admin", p) and re.search(r"case", p, re.I) and ";" in p and re.search(r"~\*", p)
               for p in readme_paragraphs()), "README: explain the ~* /admin location (case, ';')"


# ===========================================================================
# Finding 5: a reload that cannot get a hash slot stopped the server
# ===========================================================================

def slow_scrypt_hash():
    """A well-formed scrypt hash that takes seconds to check (p=16 multiplies
    the time, not the memory: 64 MiB); its checksum matches no password."""
    salt = base64.b64encode(secrets.token_bytes(16)).decode().rstrip("=").replace("+", ".")
    digest = base64.b64encode(secrets.token_bytes(32)).decode().rstrip("=").replace("+", ".")
    return "$scrypt$ln=16,r=8,p=16$%s$%s" % (salt, digest)


def short_hash_wait_python(tmp_path, seconds):
    """A script that runs authd.py's main() with a shorter wait
    for a hash slot (time is the one thing the tests may bend)."""
    wrapper = tmp_path / "python-short-hash-wait"
    wrapper.write_text(
        "#!%s\nimport sys\nsys.path.insert(0, %r)\nimport authd\n"
        "assert hasattr(authd, 'HASH_WAIT'), 'authd.HASH_WAIT is gone: update test_review.py'\n"
        "authd.HASH_WAIT = %r\nsys.exit(authd.main(sys.argv[1:]))\n" % (sys.executable, str(HERE), seconds))
    wrapper.chmod(0o755)
    return str(wrapper)


def resident_mib(pid):
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS for %d" % pid)


def test_reload_while_hash_slots_are_busy_keeps_serving(tmp_path):
    """Fails on a2595e4: the reload hashes the new plaintext line, gets
    HashBusy, and authd exits with status 1."""
    need(os.path.exists("/proc/self/status"), "/proc is needed to see the hashes hold their memory")
    users = ["alice:" + fast_hash("alice-pw"), "slow:" + slow_scrypt_hash()]
    d = Authd(tmp_path, users=users, env={"AUTH_LOGIN_RATE": "1000/60"},
              script=short_hash_wait_python(tmp_path, 0.2))
    try:
        def slow_login():
            try:
                patient_request(d, "POST", P + "/login", body={"username": "slow", "password": "x"})
            except OSError:
                pass  # only the time it holds a hash slot matters

        slow_logins = [threading.Thread(target=slow_login) for _ in range(2)]
        for t in slow_logins:
            t.start()
        # Both slots are taken once both checks hold their 64 MiB: scrypt
        # fills its table in the first 1/32 of a p=16 run, so the rest of
        # each check (seconds) lies ahead, far beyond the 0.2 s the reload waits.
        baseline = resident_mib(d.proc.pid)
        wait_until(lambda: resident_mib(d.proc.pid) >= baseline + 110, timeout=30,
                   what="both slow password checks to hold their memory")
        with open(d.users_file, "a") as f:
            f.write("newbie:newbie-plain-pw\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.proc.poll() is not None or re.search(r"(?i)busy.*retr|retr.*busy", d.log()),
                   timeout=15, what="the reload to meet the busy hash slots")
        assert d.proc.poll() is None, "authd stopped on reload:\n" + d.log()
        for t in slow_logins:
            t.join(60)
        # the reload is retried once the slots are free
        wait_until(lambda: patient_request(d, "POST", P + "/login",
                                           body={"username": "newbie", "password": "newbie-plain-pw"}).status == 200,
                   timeout=30, what="newbie's plaintext line hashed by a later retry")
        assert users_line(d.users_file, "newbie").split(":")[1].startswith("$scrypt$")
        assert "Traceback" not in d.log(), d.log()
    finally:
        d.stop()


# ===========================================================================
# Finding 6: a legacy-hash upgrade undid a password change
# ===========================================================================

def sha_hash(password):
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


def lock_waiters(inode):
    """Processes blocked on a lock of the file with INODE (/proc/locks)."""
    waiting = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 6 and fields[1] == "->" and fields[6].rsplit(":", 1)[-1] == str(inode):
            waiting += 1
    return waiting


def test_legacy_upgrade_does_not_undo_a_password_change(authd, tmp_path):
    """Fails on a2595e4: the login verified the old {SHA} hash, then a
    password change landed, then the upgrade rewrote the line with a hash of
    the OLD password, so the old password worked again."""
    need(os.path.exists("/proc/locks"), "/proc/locks is needed to see the upgrade wait for the lock")
    d = authd(users=["old:" + sha_hash("old-password"), "alice:" + fast_hash("alice-pw")],
              env={"AUTH_LOGIN_RATE": "1000/60"})
    lock_path = tmp_path / ".users.txt.lock"
    fd = os.open(str(lock_path), os.O_RDWR | os.O_CREAT, 0o600)
    new_line = "old:" + fast_hash("new-password")
    result = {}
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # hold the users file, as a `passwd` in progress does
        login = threading.Thread(target=lambda: result.setdefault("r", patient_request(
            d, "POST", P + "/login", body={"username": "old", "password": "old-password"})))
        login.start()
        wait_until(lambda: lock_waiters(os.fstat(fd).st_ino) or "r" in result, timeout=30,
                   what="the upgrade to wait for the users-file lock")
        assert "r" not in result or result["r"].status == 200, result
        # the password change lands while the upgrade waits (what passwd writes, atomically)
        text = d.users_file.read_text().replace(users_line(d.users_file, "old"), new_line)
        temp = tmp_path / ".users.txt.tmp-test"
        temp.write_text(text)
        os.chmod(temp, 0o600)
        os.replace(temp, d.users_file)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    login.join(90)
    assert result["r"].status == 200, result
    # wait until the server answers to the new password, or the line was overwritten
    wait_until(lambda: users_line(d.users_file, "old") != new_line or d.request(
        "POST", P + "/login", body={"username": "old", "password": "new-password"}).status == 200,
        timeout=15, what="the new password to work")
    assert users_line(d.users_file, "old") == new_line, (users_line(d.users_file, "old"), d.log())
    d.login("old", "old-password", expect=401)
    assert users_line(d.users_file, "old") == new_line


# ===========================================================================
# Finding 7: failed logins of legacy accounts answered 800x faster
# ===========================================================================

def apr1_hash(password):
    from passlib.hash import apr_md5_crypt
    return apr_md5_crypt.hash(password)


def default_cost_scrypt(password):
    """An scrypt hash at authd's documented default cost (ln=17, r=8, p=1)."""
    from passlib.hash import scrypt
    return scrypt.using(rounds=17, block_size=8, parallelism=1).hash(password)


def test_failed_logins_take_the_same_time_for_every_kind_of_account(authd):
    """Fails on a2595e4: a wrong password costs ~0.5 ms for {SHA} and $apr1$
    accounts and ~400 ms for scrypt accounts and unknown names, so a
    stopwatch tells which names are legacy accounts. Medians of interleaved
    rounds, compared as ratios (holds on a loaded machine)."""
    d = authd(users=["sha:" + sha_hash("sha-pw"), "apr:" + apr1_hash("apr-pw"),
                     "scr:" + default_cost_scrypt("scr-pw")], env={"AUTH_LOGIN_RATE": "1000/60"})
    kinds = ["sha", "apr", "scr", "unknown"]
    samples = {kind: [] for kind in kinds}
    for attempt in range(6):
        for kind in kinds:
            name = "nobody%d" % attempt if kind == "unknown" else kind
            started = time.perf_counter()
            r = patient_request(d, "POST", P + "/login", body={"username": name, "password": "wrong-password"})
            elapsed = time.perf_counter() - started
            assert r.status == 401, (kind, r)
            if attempt:  # the first round warms up
                samples[kind].append(elapsed)
    medians = {kind: statistics.median(values) for kind, values in samples.items()}
    for kind in kinds:
        ratio = medians[kind] / medians["scr"]
        assert 0.5 <= ratio <= 2.0, (kind, medians)


# ===========================================================================
# Finding 8: import-htpasswd took an htpasswd comment for groups
# ===========================================================================

def test_import_htpasswd_drops_the_comment_field(authd, tmp_path):
    """Fails on a2595e4: `ops:$apr1$...:admin` was imported as an admin, and a
    free-text comment made the line fail as a bad group name."""
    src = tmp_path / "htpasswd"
    src.write_text("ops:%s:admin\ndev:%s:Dev Team <dev@example.com>\nplain:%s\n"
                   % (apr1_hash("ops-pw"), apr1_hash("dev-pw"), apr1_hash("plain-pw")))
    write_users(tmp_path / "users.txt", ["alice:" + fast_hash("alice-pw") + ":admin"])
    r = run_cli("import-htpasswd", src, "--users", tmp_path / "users.txt", cwd=tmp_path)
    report = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in report, report
    for name in ("ops", "dev"):
        assert re.search(r"(?im)^.*\b%s\b.*comment.*$" % name, report), report  # says what it dropped
        assert users_line(tmp_path / "users.txt", name).count(":") == 1, (tmp_path / "users.txt").read_text()
    assert not re.search(r"(?im)^.*\bplain\b.*comment", report), report
    d = authd(users=None)
    r = patient_request(d, "POST", P + "/login", body={"username": "ops", "password": "ops-pw"})
    assert r.status == 200, r
    token = r.cookie()
    assert d.auth(token, P + "/admin").status == 403
    assert d.auth(token).headers.get("x-auth-groups", "") == ""


def test_import_htpasswd_keeps_the_comment_as_groups_when_asked(tmp_path):
    """Fails on a2595e4: there is no --comment-as-groups option."""
    src = tmp_path / "htpasswd"
    src.write_text("ops:%s:admin,staff\ndev:%s:Dev Team\n" % (apr1_hash("ops-pw"), apr1_hash("dev-pw")))
    users = write_users(tmp_path / "users.txt", ["# ours"])
    r = run_cli("import-htpasswd", "--comment-as-groups", src, "--users", users, cwd=tmp_path)
    report = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in report, report
    assert users_line(users, "ops").split(":")[2] == "admin,staff"
    assert users_line(users, "dev") is None  # "Dev Team" is no group list: skipped, naming the line
    assert re.search(r"(?im)^skipped.*line 2", report), report


# ===========================================================================
# Finding 9: the smaller ones
# ===========================================================================

@pytest.mark.parametrize("rule", ["group=", "group=,", "user=", "user=,", "groups=", "group=&user=", "group=,,&user=,"])
def test_empty_rule_denies(authd, rule):
    """Fails on a2595e4: an empty list allowed every signed-in user."""
    d = authd(users=["carol:" + fast_hash("carol-pw") + ":staff"])
    token = d.login("carol", "carol-pw")
    assert d.auth(token, P + "/auth?group=staff").status == 200
    assert d.auth(token, P + "/auth").status == 200
    assert d.auth(token, P + "/auth?" + rule).status == 403
    assert d.auth(token, P + "/admin?" + rule).status == 403


def test_token_verified_under_old_keys_is_not_cached_past_a_reload(tmp_path, monkeypatch):
    """Fails on a2595e4: session() read self.keys, verified, and then stored
    the claims in self.token_cache -- which a reload had meanwhile replaced,
    so the new cache served a token the new keys refuse."""
    import authd as A
    old_key, new_key = SECRET, "a-brand-new-secret-0123456789-abcdefghijklmnop"
    users = write_users(tmp_path / "users.txt", ["carol:" + fast_hash("carol-pw")])
    (tmp_path / "empty.env").write_text("")

    def settings(secret):
        s, _ = A.load_settings(environ={"AUTH_TOKEN_SECRET": secret, "AUTH_USERS_FILE": str(users)},
                               env_file=str(tmp_path / "empty.env"))
        return s

    store = A.UsersStore(str(users))
    store.load()
    app = A.App(settings(old_key), [old_key.encode()], store)
    now = int(time.time())
    token, _ = A.issue_token(store.users["carol"], now, now, app.settings, old_key.encode())
    request = A.Request()
    request.headers = {"cookie": "authToken=" + token}
    real_decode, reloads = A.decode_token, []

    def decode_then_reload(*args, **kwargs):
        claims = real_decode(*args, **kwargs)
        if not reloads:  # a SIGHUP lands right after this verification
            reloads.append(True)
            app.configure(settings(new_key), [new_key.encode()])
        return claims

    monkeypatch.setattr(A, "decode_token", decode_then_reload)
    app.session(request, now)  # in flight during the reload: either answer is fine
    assert reloads, "the reload hook never ran: update this test"
    monkeypatch.setattr(A, "decode_token", real_decode)
    assert app.session(request, now) == (None, None)


def test_http11_request_without_host_is_400(authd):
    """Fails on a2595e4: answered 200 (RFC 9112 section 3.2: MUST be 400)."""
    d = authd(users=["carol:" + fast_hash("carol-pw")])
    answer = raw_exchange(d.port, b"GET " + P.encode() + b"/healthz HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    answer = raw_exchange(d.port, b"GET " + P.encode() + b"/healthz HTTP/1.1\r\nHost: \r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer  # empty is allowed (RFC 9110 section 7.2)
    answer = raw_exchange(d.port, b"GET " + P.encode() + b"/healthz HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer  # HTTP/1.0 has no Host requirement


def test_short_bypass_is_refused_at_start(tmp_path):
    """Fails on a2595e4: AUTH_BYPASS had no minimum length."""
    write_users(tmp_path / "users.txt", ["carol:" + fast_hash("carol-pw")])
    short = "short-bypass-31-characters-long"
    assert len(short) == 31
    r = serve_until_it_exits(tmp_path, {"AUTH_BYPASS": short, "AUTH_TOKEN_SECRET": SECRET},
                             "with a 31-character AUTH_BYPASS")
    log = r.stdout + r.stderr
    assert r.returncode != 0 and "AUTH_BYPASS" in log and "32" in log, log
    assert short not in log and "Traceback" not in log, log
    r = run_cli("check", "--users", tmp_path / "users.txt", env={"AUTH_BYPASS": short, "AUTH_TOKEN_SECRET": SECRET})
    assert r.returncode == 1 and "AUTH_BYPASS" in r.stderr and short not in r.stderr + r.stdout, r


def test_wrong_bypass_is_logged_without_the_value(authd):
    """Fails on a2595e4: a wrong X-Auth-Bypass was refused silently."""
    bypass = "right-bypass-value-0123456789-abcdef"
    d = authd(users=["carol:" + fast_hash("carol-pw")], env={"AUTH_BYPASS": bypass})
    wrong = "wrong-guess-" + secrets.token_hex(8)
    r = d.request("GET", P + "/auth", headers={"X-Auth-Bypass": wrong, "X-Real-IP": "192.0.2.7"})
    assert r.status == 401
    assert d.request("GET", P + "/auth", headers={"X-Auth-Bypass": bypass}).status == 200
    wait_until(lambda: re.search(r"(?im)^.*bypass.*192\.0\.2\.7.*$", d.log()), 15, "a log line for the wrong bypass")
    assert wrong not in d.log() and bypass not in d.log(), d.log()


def test_logout_does_not_revoke_a_copied_token_and_readme_says_so(authd):
    """The behaviour passed on a2595e4 (it is the design); README's sentence
    about it was missing."""
    d = authd(users=["carol:" + fast_hash("carol-pw")])
    token = d.login("carol", "carol-pw")
    r = d.request("POST", P + "/logout", headers={"Cookie": "authToken=" + token, "Accept": "application/json"})
    assert r.status == 200 and r.cookie() == ""
    assert d.auth(token).status == 200  # a copy of the token still works after logout
    r = run_cli("passwd", "carol", "--users", d.users_file, input="another-pw-1\n")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: d.auth(token).status == 401, 15, "the password change to revoke the token")
    assert any(re.search(r"(?i)log ?out|sign out", p) and re.search(r"(?i)revoke", p)
               and re.search(r"(?i)cop(y|ied)", p) and re.search(r"(?i)password", p)
               for p in readme_paragraphs()), "README: say that logout does not revoke a copied token, and why"
