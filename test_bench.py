"""The benchmark (bench/bench.py) runs once in its tiny mode so that it cannot rot.

No timing thresholds here: the checks are that every row is printed, that the numbers
are sane (positive, ordered, counted) and that nothing failed. The benchmark's real
figures go in README.md; run `python3 bench/bench.py` for them.
"""
import json
import subprocess
import sys

import pytest

from conftest import AUTHD, HERE, need

BENCH = HERE / "bench" / "bench.py"
CONNS = (16, 64)
RATE = 500
WRK_ROWS = {"a": "(a) nginx static file, no auth",
            "b": "(b) nginx + auth_request -> authd",
            "c": "(c) nginx + auth_request + micro-cache",
            "d": "(d) authd /__auth/auth directly"}
OTHER_ROWS = {"e-nginx": "(e) paced %d/s, nginx + authd" % RATE,
              "e-direct": "(e) paced %d/s, authd directly" % RATE,
              "f": "(f) logins/s, default-cost scrypt"}


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, str(BENCH)] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout)


def test_help_names_the_scenarios_and_tools():
    r = bench("--help")
    assert r.returncode == 0, r.stderr
    for word in ("nginx", "wrk", "--tiny", "--duration", "--connections", "--json",
                 "micro-cache", "logins"):
        assert word in r.stdout


def test_says_exactly_which_tool_is_missing(tmp_path):
    r = bench("--nginx", tmp_path / "no-nginx", "--wrk", tmp_path / "no-wrk", "--tiny")
    assert r.returncode == 2
    assert "missing: nginx, wrk" in r.stderr
    assert "apt-get install nginx-light wrk" in r.stderr
    assert "Traceback" not in r.stderr
    r = bench("--wrk", tmp_path / "no-wrk", "--tiny")
    assert r.returncode == 2
    assert "missing: wrk " in r.stderr, r.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import shutil
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    need(nginx and shutil.which("wrk"), "the benchmark needs nginx and wrk (apt-get install nginx-light wrk)")
    out = tmp_path_factory.mktemp("bench") / "result.json"
    # authd runs on the interpreter under test
    r = bench("--tiny", "--json", out, "--python", sys.executable, "--authd", AUTHD)
    assert r.returncode == 0, "bench failed:\n%s\n%s" % (r.stdout, r.stderr)
    return r.stdout, r.stderr, json.loads(out.read_text())


def test_prints_every_row_at_every_connection_count(tiny_run):
    stdout, _, _ = tiny_run
    lines = stdout.splitlines()
    for label in WRK_ROWS.values():
        conns = sorted(int(l[len(label):].split()[0]) for l in lines if l.startswith(label))
        assert conns == list(CONNS), (label, stdout)
    for label in OTHER_ROWS.values():
        assert sum(l.startswith(label) for l in lines) == 1, (label, stdout)
    for header in ("req/s", "p50 ms", "p99 ms", "us/req", "RSS", "other"):
        assert header in stdout
    assert "ratio (b)/(a): " in stdout and "ratio (c)/(a): " in stdout
    assert "authd memory: RSS " in stdout
    # the machine it ran on
    assert "CPUs" in stdout and "Linux" in stdout and "nginx/" in stdout and "wrk" in stdout
    assert "WARNING" not in stdout, stdout


def test_every_row_has_positive_ordered_error_free_figures(tiny_run):
    _, _, data = tiny_run
    rows = {(r["id"], r["conns"]): r for r in data["results"]}
    expected = [(i, c) for i in WRK_ROWS for c in CONNS] + [("e-nginx", 4), ("e-direct", 4), ("f", 4)]
    assert sorted(rows) == sorted(expected)
    for key, r in rows.items():
        assert r["requests"] > 0 and r["rps"] > 0, (key, r)
        assert 0 < r["p50_ms"] <= r["p99_ms"], (key, r)
        if key[0].startswith("e-"):  # the noise meter means nothing at low load
            assert r["other_cpu_pct"] is None, (key, r)
        else:
            assert 0 <= r["other_cpu_pct"] <= 100, (key, r)
        # non-2xx answers and broken connections are bugs, not slowness
        for kind in ("status", "connect", "read", "write"):
            assert r["error_detail"].get(kind, 0) == 0, (key, r)
        if key[0] != "a":
            assert r["authd_cpu_us"] is not None and r["authd_cpu_us"] >= 0, (key, r)
            assert 0 < r["authd_rss_kib"] <= r["authd_hwm_kib"], (key, r)
        if key[0] in "abc" or key[0] == "e-nginx":
            assert r["nginx_cpu_us"] is not None and r["nginx_cpu_us"] >= 0, (key, r)
    for num in ("b", "c"):
        for c in CONNS:
            ratio = data["ratios"]["%s/a@%d" % (num, c)]
            assert ratio == pytest.approx(rows[(num, c)]["rps"] / rows[("a", c)]["rps"])
    mem = data["memory"]
    assert 0 < mem["after_auth_kib"][0] <= mem["after_auth_kib"][1]


def test_paced_run_sends_its_whole_schedule(tiny_run):
    _, _, data = tiny_run
    for r in data["results"]:
        if r["id"].startswith("e-"):
            # the schedule is fixed: rate x duration requests, late or not
            assert r["errors"] == 0, r
            assert abs(r["requests"] - RATE * data["duration"]) <= 4, r


def test_micro_cache_answers_while_authd_is_paused(tiny_run):
    """(c) measures the cache: nginx answered a repeated request with authd stopped."""
    _, _, data = tiny_run
    for r in data["results"]:
        if r["id"] == "c":
            assert r["cache_verified"] is True, r


def test_logins_use_the_default_cost_hash(tiny_run):
    """(f) is realistic only with authd's default scrypt cost: each login costs far more
    CPU than an auth check (a CPU-time ratio, not a timing threshold)."""
    _, _, data = tiny_run
    rows = {(r["id"], r["conns"]): r for r in data["results"]}
    login = rows[("f", 4)]["authd_cpu_us"]
    check = rows[("d", 16)]["authd_cpu_us"]
    assert login > 100 * max(check, 1), (login, check)
