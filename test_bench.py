"""The benchmark (bench/bench.py) runs once in its tiny mode so that it cannot rot.

No timing thresholds here: the checks are that every row is printed with numbers or an
explicit "n/a (why)", that the numbers are sane (positive, ordered, counted, repeated)
and that nothing failed. The benchmark's real figures go in README.md; run
`python3 bench/bench.py` for them.
"""
import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import AUTHD, HERE, need

BENCH = HERE / "bench" / "bench.py"
ANCHOR = HERE / "bench" / "anchor_hs256.py"
RATE = 500
PACED_CONNS = 4
TINY_CONNS = 16
TINY_REPS = 2
# rows that must give numbers wherever the test runs (CI has every tool)
CORE_ROWS = ["static", "ceiling", "authd", "ceiling-unix", "authd-unix", "before", "anchor", "cache",
             "auth_basic-sha", "auth_basic-apr1", "authd-direct", "before-direct", "anchor-direct", "caddy-static"]
PACED_ROWS = ["paced-nginx", "paced-direct", "flood", "flood-before"]
# rows of features that other issues add (13: Basic, app tokens; 14: forward auth): a number or n/a
FEATURE_ROWS = ["basic", "token", "basic-direct", "token-direct", "caddy-forward"]


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, str(BENCH)] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout)


def test_help_names_the_rows_and_tools():
    r = bench("--help")
    assert r.returncode == 0, r.stderr
    for word in ("nginx", "wrk", "caddy", "htpasswd", "--tiny", "--duration", "--connections", "--reps",
                 "--before", "--json", "--only", "--skip", "micro-cache", "logins", "ceiling", "ThreadingHTTPServer",
                 "idle", "unix"):
        assert word in r.stdout, word


def test_says_exactly_which_tool_is_missing(tmp_path):
    r = bench("--nginx", tmp_path / "no-nginx", "--wrk", tmp_path / "no-wrk", "--tiny")
    assert r.returncode == 2
    assert "missing: nginx, wrk" in r.stderr
    assert "apt-get install nginx-light wrk" in r.stderr
    assert "Traceback" not in r.stderr
    r = bench("--wrk", tmp_path / "no-wrk", "--tiny")
    assert r.returncode == 2
    assert "missing: wrk " in r.stderr, r.stderr


def test_unknown_group_is_refused_with_the_list():
    r = bench("--only", "nginx,bogus", "--tiny")
    assert r.returncode == 2
    assert "bogus" in r.stderr and "ceiling" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    need(nginx and shutil.which("wrk"), "the benchmark needs nginx and wrk (apt-get install nginx-light wrk)")
    need(shutil.which("caddy"), "the Caddy rows need caddy (apt-get install caddy)")
    need(shutil.which("htpasswd"), "the auth_basic rows need htpasswd (apt-get install apache2-utils)")
    need(shutil.which("git") and (HERE / ".git").exists(), "the `authd before` rows need git and a checkout")
    out = tmp_path_factory.mktemp("bench") / "result.json"
    # authd runs on the interpreter under test
    r = bench("--tiny", "--json", out, "--python", sys.executable, "--authd", AUTHD)
    assert r.returncode == 0, "bench failed:\n%s\n%s" % (r.stdout, r.stderr)
    data = json.loads(out.read_text())
    return r.stdout, r.stderr, data, {(x["id"], x["conns"]): x for x in data["results"]}


def table_lines(stdout, label):
    return [line for line in stdout.splitlines() if line.startswith(label + " ")]


def test_every_row_is_printed_with_numbers_or_na(tiny_run):
    stdout, _, data, rows = tiny_run
    expected = [(rid, TINY_CONNS) for rid in CORE_ROWS + FEATURE_ROWS] + \
               [(rid, PACED_CONNS) for rid in PACED_ROWS + ["logins"]]
    assert sorted(rows) == sorted(expected), sorted(rows)
    for key, r in rows.items():
        lines = table_lines(stdout, r["label"])
        assert len(lines) == 1, (key, stdout)
        fields = lines[0][len(r["label"]):].split()
        assert int(fields[0]) == key[1], lines
        if r["na"]:
            assert key[0] in FEATURE_ROWS, ("a core row must measure", key, r["na"])
            assert fields[1] == "n/a" and len(lines[0]) > lines[0].index("n/a (") + 6, lines
        else:
            assert float(fields[1]) == pytest.approx(r["rps"], rel=0.01, abs=0.1), (lines, r)
    for header in ("req/s", "±%", "p50", "p99", "max", "us/req", "RSS MiB", "errors", "CPU%", "static", "ceil"):
        assert header in stdout, header
    # the machine and the versions it ran with
    model = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    for word in ["cores", "Linux", "authd on python", "nginx/", "Caddy 2", "wrk", "authd before = authd.py of "] + model[:1]:
        assert word in stdout, word
    assert "WARNING" not in stdout, stdout


def test_numbers_are_sane_and_repeated(tiny_run):
    _, _, data, rows = tiny_run
    assert data["reps"] == TINY_REPS
    for key, r in rows.items():
        if r["na"]:
            continue
        reps = 1 if key[0] in ("flood", "flood-before", "logins") else TINY_REPS
        assert r["repetitions"] == len(r["reps"]) == reps, (key, r)
        assert r["requests"] > 0 and r["rps"] > 0, (key, r)
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"], (key, r)
        if reps > 1:
            rps = sorted(x["rps"] for x in r["reps"])
            assert r["rps_spread_pct"] == pytest.approx(100 * (rps[1] - rps[0]) / 2 / r["rps"]), (key, r)
        # non-2xx answers and broken connections are bugs, not slowness
        assert r["errors"] == 0, (key, r)
        if r["section"] in ("nginx", "caddy") and key[0] not in ("static", "caddy-static") \
                and not key[0].startswith("auth_basic"):
            assert r["auth_cpu_us"] is not None and r["auth_cpu_us"] >= 0, (key, r)
            assert r["pct_static"] == pytest.approx(100 * r["rps"] / rows[("static" if r["section"] == "nginx"
                                                                            else "caddy-static", key[1])]["rps"])
        if r["section"] in ("nginx", "caddy") or key[0] == "paced-nginx":
            assert r["proxy_cpu_us"] is not None and r["proxy_cpu_us"] >= 0, (key, r)
        if key[0] in ("authd", "before", "anchor", "cache", "basic", "token"):
            assert r["pct_ceiling"] == pytest.approx(100 * r["rps"] / rows[("ceiling", key[1])]["rps"]), (key, r)
        if key[0] == "authd-unix":  # the unix-socket rows compare with the unix ceiling
            assert r["pct_ceiling"] == pytest.approx(100 * r["rps"] / rows[("ceiling-unix", key[1])]["rps"]), (key, r)
        if r["section"] != "paced":  # the noise meter means nothing at low load
            assert 0 <= r["other_cpu_pct"] <= 100, (key, r)
    assert rows[("static", TINY_CONNS)]["pct_static"] == pytest.approx(100)
    ratios = data["ratios"]
    c = TINY_CONNS
    assert ratios["authd/ceiling rps@%d" % c] == pytest.approx(rows[("authd", c)]["rps"] / rows[("ceiling", c)]["rps"])
    assert ratios["authd-unix/ceiling-unix rps@%d" % c] == pytest.approx(
        rows[("authd-unix", c)]["rps"] / rows[("ceiling-unix", c)]["rps"])
    assert ratios["authd-direct/before-direct rps@%d" % c] == pytest.approx(
        rows[("authd-direct", c)]["rps"] / rows[("before-direct", c)]["rps"])


def test_ratio_and_memory_lines(tiny_run):
    stdout, _, data, _ = tiny_run
    for phrase in ("nginx -> authd / ceiling, req/s: ", "nginx -> authd / ceiling over unix sockets, req/s: ",
                   "authd / authd before (", "authd / stdlib anchor",
                   "cached Basic pair / cookie", "Bearer token / cookie", "Caddy forward_auth -> authd / Caddy static",
                   "spread of req/s over repetitions: largest",
                   "authd, 300 idle keep-alive connections", "authd before, 300 idle keep-alive connections",
                   "authd, after all runs: RSS ", "authd before, after all runs: RSS "):
        assert phrase in stdout, phrase
    for name in ("authd", "authd before"):
        m = data["memory"][name]
        idle = m["idle"]
        # functional, not timing: the connections were answered and the server still answers
        assert idle["answered"] + idle["refused"] + idle["unanswered"] == idle["wanted"] == 300, idle
        assert idle["answered"] > 0 and 0 <= idle["still_open"] <= idle["answered"], idle
        assert idle["probe_status"] == 200, idle
        assert 0 < idle["rss_before_kib"] and 0 < idle["rss_held_kib"], idle
        assert 0 < m["after_all_kib"] <= m["peak_kib"], m


def test_paced_runs_send_their_whole_schedule(tiny_run):
    _, _, data, rows = tiny_run
    for rid in PACED_ROWS:
        r = rows[(rid, PACED_CONNS)]
        for rep in r["reps"]:
            # the schedule is fixed: rate x duration requests, late or not
            assert rep["errors"] == 0, r
            assert abs(rep["requests"] - RATE * data["duration"]) <= 4, r


def test_login_flood_overlaps_the_paced_run(tiny_run):
    """While the paced run measured, default-cost hashes (128 MiB each) were running."""
    _, _, _, rows = tiny_run
    for rid in ("flood", "flood-before"):
        r = rows[(rid, PACED_CONNS)]
        assert r["auth_hwm_kib"] > 128 * 1024, r
        assert r["logins"] >= 0 and r["reps"][0]["login_errors"] == {}, r


def test_micro_cache_answers_while_authd_is_paused(tiny_run):
    """The micro-cache row measures the cache: nginx answered a repeated request with authd stopped."""
    _, _, _, rows = tiny_run
    assert rows[("cache", TINY_CONNS)]["cache_verified"] is True


def test_logins_use_the_default_cost_hash(tiny_run):
    """The login row is realistic only with authd's default scrypt cost: each login costs
    far more CPU than an auth check (a CPU-time ratio, not a timing threshold)."""
    _, _, _, rows = tiny_run
    login = rows[("logins", PACED_CONNS)]["auth_cpu_us"]
    check = rows[("authd-direct", TINY_CONNS)]["auth_cpu_us"]
    assert login > 100 * max(check, 1), (login, check)


def bench_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("authd_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def wrk_percentile(sorted_us, p):
    """wrk's own rule (stats_percentile in its stats.c): the least latency whose
    cumulative count reaches round(p / 100 * count + 0.5)."""
    rank = min(max(round(p / 100 * len(sorted_us) + 0.5), 1), len(sorted_us))
    return sorted_us[rank - 1]


def wrk_part(latencies_us, seconds=1.0):
    """What parse_wrk makes of one wrk run that saw these latencies."""
    mod = bench_module()
    lat = sorted(latencies_us)
    q = [(p, (lat[0] if p == 0 else lat[-1] if p == 100 else wrk_percentile(lat, p)) / 1000) for p in mod.QUANTILES]
    return {"requests": len(lat), "duration": seconds, "quantiles_ms": q, "max_ms": q[-1][1], "errors": 0,
            "error_detail": {}, "auth_cpu_us": 20.0, "proxy_cpu_us": None, "other_cpu_pct": 1.0, "start_s": 0.0}


def test_the_slices_of_a_repetition_pool_their_latencies_like_one_run():
    """A repetition measured in slices reports the percentiles of all its requests
    together, checked against the exact percentile of the pooled samples."""
    import random
    mod = bench_module()
    rnd = random.Random(11)
    fast = [int(rnd.lognormvariate(6.2, 0.4)) + 1 for _ in range(90000)]   # about 0.5 ms
    slow = [int(rnd.lognormvariate(8.5, 0.5)) + 1 for _ in range(6000)]    # about 5 ms: a slow second
    for lat in (fast, slow):
        part = wrk_part(lat)
        for p, ms in part["quantiles_ms"][1:-1]:  # one slice: exactly its own figures
            assert mod.pooled_percentile([part], p) == pytest.approx(ms, rel=1e-9), p
    parts = [wrk_part(fast[:45000]), wrk_part(slow), wrk_part(fast[45000:])]
    pooled = sorted(fast + slow)
    for p in (50, 90, 99):
        exact = wrk_percentile(pooled, p) / 1000
        assert mod.pooled_percentile(parts, p) == pytest.approx(exact, rel=0.02), p
    merged = mod.merge_slices(parts)
    assert merged["requests"] == len(pooled) and merged["duration"] == 3.0
    assert merged["rps"] == pytest.approx(len(pooled) / 3.0)
    assert merged["max_ms"] == max(pooled) / 1000 and merged["proxy_cpu_us"] is None
    assert merged["p50_ms"] < merged["p99_ms"] <= merged["max_ms"]


def test_a_repetition_is_slices_spread_over_the_run():
    """With --duration 2 each wrk row's repetition is two 1 s runs, and the slices of the
    two repetitions alternate in time: a slow stretch of the machine falls on both."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    need(nginx and shutil.which("wrk"), "the benchmark needs nginx and wrk (apt-get install nginx-light wrk)")
    r = bench("--tiny", "--duration", "2", "--only", "nginx", "--skip", "basic,token,auth_basic,before",
              "--python", sys.executable, "--authd", AUTHD, "--json", "/dev/stdout")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout[r.stdout.index("{\n"):])
    rows = {x["id"]: x for x in data["results"] if not x["na"]}
    assert {"static", "authd"} <= set(rows), sorted(rows)
    assert "wrk rows in 2 slices of 1 s spread over the run" in r.stdout
    for rid, row in rows.items():
        assert len(row["reps"]) == TINY_REPS and row["errors"] == 0, row
        starts = sorted((t, i) for i, rep in enumerate(row["reps"]) for t in rep["slice_starts_s"])
        assert [i for _, i in starts] == [0, 1, 0, 1], (rid, starts)
        for rep in row["reps"]:
            assert rep["requests"] > 0 and 0 < rep["p50_ms"] <= rep["p99_ms"] <= rep["max_ms"], rep


def test_a_slice_that_does_not_divide_the_duration_is_refused():
    r = bench("--duration", "5", "--slice", "2")
    assert r.returncode == 2 and "--slice" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- the stdlib anchor

def hs256(claims, key, alg="HS256"):
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = enc(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = enc(json.dumps(claims).encode())
    sig = enc(hmac.new(key.encode(), ("%s.%s" % (head, body)).encode(), hashlib.sha256).digest())
    return "%s.%s.%s" % (head, body, sig)


def test_anchor_verifies_hs256_cookies_like_a_jwt_library(tmp_path):
    """The anchor is a fair comparison only if it does the real work: tokens made by PyJWT
    (the reference library) pass; forged, expired, `none` and unknown users do not."""
    import http.client
    import jwt
    from conftest import SECRET
    users = tmp_path / "users.txt"
    users.write_text("# comment\nalice:$scrypt$x\n")
    env = dict(os.environ, AUTH_TOKEN_SECRET=SECRET)
    proc = subprocess.Popen([sys.executable, str(ANCHOR), "--port", "0", "--users", str(users)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        now = int(time.time())

        def status(token):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/__auth/auth", headers={"Cookie": "other=1; authToken=%s" % token})
                r = conn.getresponse()
                r.read()
                return r.status, r.getheader("X-Auth-User")
            finally:
                conn.close()

        good = jwt.encode({"sub": "alice", "iat": now, "exp": now + 60}, SECRET, algorithm="HS256")
        assert status(good) == (200, "alice")
        assert status(jwt.encode({"sub": "alice", "exp": now + 60}, "another-secret-" * 3, algorithm="HS256"))[0] == 401
        assert status(jwt.encode({"sub": "alice", "exp": now - 1}, SECRET, algorithm="HS256"))[0] == 401
        assert status(jwt.encode({"sub": "mallory", "exp": now + 60}, SECRET, algorithm="HS256"))[0] == 401
        assert status(hs256({"sub": "alice", "exp": now + 60}, SECRET, alg="none"))[0] == 401
        assert status(good[:-2] + ("AA" if not good.endswith("AA") else "BB"))[0] == 401
        assert status("not-a-token")[0] == 401
    finally:
        proc.terminate()
        proc.wait(10)
