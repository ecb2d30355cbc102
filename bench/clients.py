"""Load clients of bench.py that wrk cannot be: a paced (open-loop) client, since
Debian's wrk has no -R and wrk2 is not packaged, and a holder of many idle keep-alive
connections. Raw sockets, HTTP/1.1, loopback only."""
import resource
import selectors
import socket
import threading
import time


def read_response(sock, buf):
    """Read one HTTP/1.1 response; return (status, keep_alive, rest_of_buffer)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response head")
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    status, length, chunked, keep = parse_head(head)
    if chunked:
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += sock.recv(65536)
            buf = buf[size + 2:]
            if size == 0:
                break
    else:
        while len(buf) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed in the body")
            buf += chunk
        buf = buf[length:]
    return status, keep, buf


def parse_head(head):
    """(status, content length, chunked, keep-alive) of a response head."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, chunked, keep = 0, False, True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection" and value == b"close":
            keep = False
    return status, length, chunked, keep


def percentile(sorted_values, pct):
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, int(round(pct / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def request_bytes(port, path, headers, method="GET"):
    head = "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (method, path, port)
    return (head + "".join(h + "\r\n" for h in headers) + "\r\n").encode("latin-1")


PACED_THREADS = 4


def run_paced(port, path, headers, rate, duration, threads=PACED_THREADS):
    """Open-loop load, wrk2-style: `rate` requests/s on a fixed schedule spread over
    `threads` keep-alive connections. A request's latency runs from its scheduled send
    time (so a stall counts for every request it delayed: no coordinated omission)."""
    raw = request_bytes(port, path, headers)
    interval = threads / float(rate)
    t_start = time.perf_counter() + 0.05
    t_end = t_start + duration
    lat, errors, lock = [], [0], threading.Lock()

    def worker(i):
        mine, failed = paced_worker(port, raw, t_start + i * interval / threads, interval, t_end)
        with lock:
            lat.extend(mine)
            errors[0] += failed

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(duration + 30)
    elapsed = max(time.perf_counter() - t_start, 1e-9)
    lat.sort()
    return {"requests": len(lat), "duration": elapsed, "rps": len(lat) / min(elapsed, duration + 0.5),
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
            "max_ms": (lat[-1] * 1000) if lat else 0.0,
            "errors": errors[0], "error_detail": {"status_or_io": errors[0]} if errors[0] else {}}


class Client:
    """One client's connection, reopened when the server closes it: the latencies
    (s) of its 2xx/3xx answers and the count of the rest (other statuses, I/O errors)."""

    def __init__(self, port, raw, timeout, nodelay=False):
        self.port, self.raw, self.timeout, self.nodelay = port, raw, timeout, nodelay
        self.sock, self.buf, self.lat, self.failed = None, b"", [], 0

    def request(self, since):
        """One request; its latency counts from SINCE (a perf_counter time)."""
        try:
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
                if self.nodelay:
                    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.buf = b""
            self.sock.sendall(self.raw)
            status, keep, self.buf = read_response(self.sock, self.buf)
            if 200 <= status < 400:
                self.lat.append(time.perf_counter() - since)
            else:
                self.failed += 1
            if not keep:
                self.close()
        except (OSError, ValueError, IndexError):
            self.failed += 1
            self.close()

    def close(self):
        if self.sock is not None:
            self.sock.close()
        self.sock = None


def paced_worker(port, raw, first, interval, t_end):
    """One connection's share of the schedule: (latencies in s, failures)."""
    client, k = Client(port, raw, 10, nodelay=True), 0
    while True:
        intended = first + k * interval
        if intended >= t_end:
            break
        k += 1
        now = time.perf_counter()
        if now < intended:
            time.sleep(intended - now)
        client.request(intended)
    client.close()
    return client.lat, client.failed


def raise_nofile(wanted):
    """Raise this process's soft RLIMIT_NOFILE (children inherit it); return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class IdleConnections:
    """Many keep-alive connections, each used for one request (answered 200) and then
    left idle, held by this process. open() never waits more than `timeout` seconds."""

    def __init__(self, port, raw_request):
        self.port, self.raw = port, raw_request
        self.socks = []          # answered 200 and kept open
        self.refused = 0         # connect failed, reset, closed, or not 200
        self.unanswered = 0      # still waiting at the deadline

    def open(self, count, timeout, in_flight=256):
        sel = selectors.DefaultSelector()
        deadline = time.monotonic() + timeout
        started = 0
        try:
            while (started < count or sel.get_map()) and time.monotonic() < deadline:
                while started < count and len(sel.get_map()) < in_flight:
                    self._connect(sel)
                    started += 1
                for key, events in sel.select(timeout=0.2):
                    self._step(sel, key.fileobj, key.data, events)
            for key in list(sel.get_map().values()):
                self.unanswered += 1
                sel.unregister(key.fileobj)
                key.fileobj.close()
        finally:
            sel.close()
        return len(self.socks)

    def _connect(self, sel):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        sel.register(s, selectors.EVENT_WRITE, {"state": "connect", "buf": b""})

    def _step(self, sel, s, data, events):
        try:
            if data["state"] == "connect":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, "connect")
                s.sendall(self.raw)  # small: fits the empty send buffer at once
                data["state"] = "read"
                sel.modify(s, selectors.EVENT_READ, data)
                return
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data["buf"] += chunk
            if b"\r\n\r\n" in data["buf"]:
                head, _, rest = data["buf"].partition(b"\r\n\r\n")
                status, length, _, keep = parse_head(head)
                if len(rest) < length:
                    return
                sel.unregister(s)
                if status == 200 and keep:
                    self.socks.append(s)
                else:
                    self.refused += 1
                    s.close()
        except (OSError, ValueError, IndexError):
            sel.unregister(s)
            s.close()
            self.refused += 1

    def still_open(self):
        """How many of the held connections the server has not closed."""
        alive = 0
        for s in self.socks:
            try:
                if s.recv(1, socket.MSG_PEEK) == b"":
                    continue  # closed by the server
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return alive

    def close(self):
        for s in self.socks:
            s.close()
        self.socks = []


def timed_request(port, raw, timeout):
    """Seconds one request on a new connection took until its answer, and its status;
    (None, reason) if no answer came within `timeout`."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(max(0.01, timeout - (time.perf_counter() - t0)))
            s.sendall(raw)
            status, _, _ = read_response(s, b"")
        return time.perf_counter() - t0, status
    except (OSError, ValueError, IndexError) as e:
        return None, "no answer within %.0f s (%s)" % (timeout, e.__class__.__name__)


def run_closed(port, raw, connections, duration, timeout=60):
    """Closed loop: each of `connections` clients sends the next request as soon as the
    last one is answered, until `duration` is over; a request in flight then is awaited,
    so every client completes at least one and slow requests (logins) still count."""
    t_start = time.perf_counter()
    t_end = t_start + duration
    lat, errors, lock = [], [0], threading.Lock()

    def client():
        c = Client(port, raw, timeout)
        while time.perf_counter() < t_end or not (c.lat or c.failed):
            c.request(time.perf_counter())
        c.close()
        with lock:
            lat.extend(c.lat)
            errors[0] += c.failed

    ts = [threading.Thread(target=client, daemon=True) for _ in range(connections)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(duration + timeout + 10)
    elapsed = max(time.perf_counter() - t_start, 1e-9)
    lat.sort()
    return {"requests": len(lat), "duration": elapsed, "rps": len(lat) / elapsed,
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
            "max_ms": (lat[-1] * 1000) if lat else 0.0,
            "errors": errors[0], "error_detail": {"status_or_io": errors[0]} if errors[0] else {}}
