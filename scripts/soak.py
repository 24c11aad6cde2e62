#!/usr/bin/env python3
"""Soak test: the whole platform under a realistic mixed load for a long
time; RSS, open files and latency must stay flat.

Starts `m2mhub serve` on a fresh data directory (under ./target when it
exists), pinned to core 0 with taskset when there are two cores or more;
everything else (simulators, this driver) runs on core 1. Then, for
--duration seconds:

  telemetry   `m2mhub sim` once per profile (factory, meter, truck, wearable,
              soil): --devices devices in all, provisioned by claim token,
              each reporting every --interval over MQTT with its own token;
  rules       three, created through the API: an overheating alarm (factory
              machines, a windowed average with hysteresis), a speeding
              republish (trucks, a filter rule, to `fleet/speeding/{device}`)
              and an echo of the probe device's readings (republish to
              `soak/echo/{device}`: the rule path's latency, see the probe);
  commands    a `start` command to a random simulated device every
              --command-every seconds (POST /devices/{id}/commands), each
              followed up (GET /commands/{id}) until the simulator's answer;
  API reads   --api-rate requests/s, one at a time on a keep-alive
              connection, in the console's shapes: device list views (first
              page, search, filters, a late page), device pages (device,
              latest values, connection history, active alarms, commands, a
              metric's last 5 min) and telemetry aggregates (a device's last
              hour by minute, a group's last 15 min);
  churn       --churn-rate MQTT connections/s from a pool of registered
              devices of their own (soak-churn-*): CONNECT with the device's
              token (MQTT 3.1.1, clean and persistent sessions alternately),
              SUBSCRIBE to its commands, one QoS 1 reading, then half end with
              DISCONNECT and half just drop the socket (a flaky cellular link);
              the pool is large enough to stay under the broker's flapping
              ban (mqtt.max_connects_per_client_id);
  probe       a registered device (soak-probe) publishes a numbered reading,
              QoS 1, --probe-rate times a second; a monitoring client (a
              --password-file user, as a backend would be) subscribes QoS 1 to
              that device's telemetry and to the echo rule's topic: end-to-end
              latency of the broker path and of the rule path, and loss
              (every reading must arrive both ways).

Every --sample seconds (10 by default) it writes a row of OUT/soak.csv: RSS,
open fds, threads and CPU of the server; probe p50/p99; connections,
sessions, subscriptions; telemetry ingest rate; the store's unflushed head
points (the one queue depth the platform exposes); the drop counters of
GET /api/v1/broker and /metrics; API requests, their client p50/p99 and
server p99 (Server-Timing); commands; churn connects and their p99; errors.
Rates, percentiles and counts are per interval; the drop counters,
probe_sent / probe_lost and *_total columns are cumulative.
At the end OUT/soak.png (matplotlib in a venv, target/soak-venv, made on
first use; --no-plot skips it), a summary (also OUT/summary.txt) and a
verdict. After the warm-up (the first 10 % of the run or 5 minutes, whichever
is less), it fails (exit 1) when:

  - RSS is not flat: its least-squares slope over the second half of the run
    exceeds --max-rss-growth % of its mean per hour and the rise over that
    half exceeds --rss-floor-mib (a short run cannot resolve less);
  - open fds spread by more than --max-fd-spread after the warm-up;
  - the server died, or did not stop within 30 s of SIGTERM;
  - a probe reading was lost (either path);
  - the load fell short: telemetry ingest < 80 % of devices / interval, or
    fewer than 99 % of the devices connected at the end;
  - drop counters moved (queue full, internal channels, rules, audit,
    webhooks, store write errors) or more than --max-errors errors were seen
    (failed API requests, unanswered commands, refused churn connects, probe
    reconnects, panics in the server log).

Defaults: 10,000 devices every 1 s (10,000 msg/s of telemetry), 10 API
reads/s, a command every 3 s, 5 connects/s of churn, a probe reading every
0.2 s, the store flushed every 60 s. On the 2-core development machine the
server sustained 20,000 msg/s of this mix with nothing lost, its core 67 %
busy and the probe's p99 at 45 ms (near the 50 ms bar of BENCHMARKS.md);
10,000 msg/s is half of that (47 % of the core). --interval 5s is
bench_console.py's fleet (2,000 msg/s, 23 % of the core). As of 2026-12-06 the
RSS check fails for a known reason: each flush of the store adds to the open
day partition's in-memory index (BENCHMARKS.md, "Soak").

Exit 2: the harness itself failed (setup, interrupted). The run is bounded:
setup by --setup-timeout, then --duration, then at most about a minute to
stop; every process it started is stopped (try/finally, SIGTERM/SIGINT
handlers, and the children get SIGTERM should this script die).

Usage:
  scripts/soak.py --bin target/release/m2mhub --duration 3600 --out target/soak
  scripts/soak.py --quick --bin target/debug/m2mhub --out target/soak-quick   # ~60 s, CI
Python standard library only (matplotlib only for the plot, in its venv).
"""

import argparse
import csv
import ctypes
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

PROFILES = ["factory", "meter", "truck", "wearable", "soil"]
# Numeric metrics each simulated profile reports (crates/sim/src/fleet.rs).
METRICS = {
    "factory": ["temperature", "vibration", "rpm", "load"],
    "meter": ["power_kw", "energy_kwh", "voltage"],
    "truck": ["speed_kmh", "fuel_pct", "odometer_km"],
    "wearable": ["heart_rate", "steps", "battery"],
    "soil": ["moisture", "temperature", "battery"],
}
PROBE_DEVICE = "soak-probe"
MONITOR_USER = "soak-monitor"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seconds(d):
    """`5s`, `200ms`, `1m` or plain seconds, as `m2mhub sim --interval` takes them."""
    d = str(d)
    for unit, mult in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if d.endswith(unit):
            return float(d[:-len(unit)]) * mult
    return float(d)


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def fit(xs, ys):
    """Least-squares slope and intercept."""
    n = len(xs)
    if n < 2:
        return 0.0, (ys[0] if ys else 0.0)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, my
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


# ---- child processes ---------------------------------------------------------

_libc = None


def _die_with_parent():
    """In the child: SIGTERM when this script dies (Linux), so nothing outlives it."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def pinned(core, argv):
    if PIN:
        return ["taskset", "-c", str(core)] + argv
    return argv


PIN = bool(shutil.which("taskset")) and (os.cpu_count() or 1) >= 2


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runq_wait_seconds(pid):
    """Time the process's threads spent runnable but waiting for a CPU
    (/proc/PID/task/*/schedstat, second field): what a shared machine costs it."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def host_pressure(kind):
    """`some avg10` of /proc/pressure/KIND (PSI), or "" where there is none."""
    try:
        with open(f"/proc/pressure/{kind}") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return ""


def core_busy_seconds(core):
    """Busy seconds of one CPU (/proc/stat: all but idle and iowait), steal included."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def self_cpu_seconds():
    t = os.times()
    return t.user + t.system


# ---- HTTP --------------------------------------------------------------------

class ApiError(Exception):
    pass


class Http:
    """One keep-alive HTTP/1.1 connection to the API (reconnects once when the
    server has closed an idle one)."""

    def __init__(self, http_addr, token=None, timeout=30):
        host, port = http_addr.rsplit(":", 1)
        self.addr = (host, int(port))
        self.token = token
        self.timeout = timeout
        self.conn = None

    def request(self, method, path, body=None, ok=(200, 201, 202, 204)):
        """(JSON body, client ms, server ms) of METHOD /api/v1{path}."""
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(*self.addr, timeout=self.timeout)
            try:
                t0 = time.perf_counter()
                self.conn.request(method, "/api/v1" + path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                client_ms = (time.perf_counter() - t0) * 1000
                break
            except (http.client.HTTPException, ConnectionError, socket.timeout, OSError) as e:
                self.conn.close()
                self.conn = None
                # Only an idle keep-alive connection closed under us is retried.
                if attempt or isinstance(e, socket.timeout):
                    raise ApiError(f"{method} {path}: {type(e).__name__}: {e}")
        server_ms = None
        for metric in (resp.getheader("Server-Timing") or "").split(","):
            parts = [p.strip() for p in metric.split(";")]
            if parts[0] == "app":
                for p in parts[1:]:
                    if p.startswith("dur="):
                        server_ms = float(p[4:])
        if resp.status not in ok:
            raise ApiError(f"{method} {path}: HTTP {resp.status}: {raw[:200]!r}")
        return (json.loads(raw) if raw else None), client_ms, server_ms

    def get(self, path):
        return self.request("GET", path)[0]

    def post(self, path, body):
        return self.request("POST", path, body)[0]

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None


def metrics_text(http_addr):
    host, port = http_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        if resp.status != 200:
            raise ApiError(f"GET /metrics: HTTP {resp.status}")
    finally:
        conn.close()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            parts = line.rsplit(" ", 1)
            if len(parts) == 2 and "{" not in parts[0]:
                try:
                    out[parts[0]] = float(parts[1])
                except ValueError:
                    pass
    return out


# ---- a minimal MQTT 3.1.1 client ---------------------------------------------

from mqtt_wire import mqtt_str as _str, packet as _packet, varint as _varint  # noqa: E402


class Mqtt:
    def __init__(self, addr, client_id, username, password, keepalive=60, clean=True, timeout=15):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lock = threading.Lock()
        self.buf = bytearray()
        flags = 0xC0 | (0x02 if clean else 0)
        self.send(_packet(0x10, _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
                          + _str(client_id) + _str(username) + _str(password)))
        t, body = self.read()
        if t >> 4 != 2 or len(body) < 2 or body[1] != 0:
            self.close()
            raise ConnectionError(f"{client_id}: CONNACK {body!r}")

    def send(self, data):
        with self.lock:
            self.sock.sendall(data)

    def read(self):
        """The next packet (type byte, body). Nothing is consumed until a whole
        packet is buffered, so a socket timeout can be retried."""
        while True:
            if len(self.buf) >= 2:
                n, mult, i = 0, 1, 1
                while i < len(self.buf) and i <= 4:
                    b = self.buf[i]
                    n += (b & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not b & 0x80:
                        if len(self.buf) >= i + n:
                            first, body = self.buf[0], bytes(self.buf[i:i + n])
                            del self.buf[:i + n]
                            return first, body
                        break
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("MQTT connection closed by the server")
            self.buf += chunk

    def subscribe(self, pid, filters):
        body = struct.pack("!H", pid) + b"".join(_str(f) + bytes([q]) for f, q in filters)
        self.send(_packet(0x82, body))
        while True:
            t, body = self.read()
            if t >> 4 == 9:
                if any(c >= 0x80 for c in body[2:]):
                    raise ConnectionError(f"SUBACK refused {list(body[2:])}")
                return

    def publish(self, topic, payload, qos=0, pid=0):
        body = _str(topic) + (struct.pack("!H", pid) if qos else b"") + payload
        self.send(_packet(0x30 | (qos << 1), body))

    def puback(self, pid):
        self.send(b"\x40\x02" + struct.pack("!H", pid))

    def ping(self):
        self.send(b"\xc0\x00")

    def disconnect(self):
        try:
            self.send(b"\xe0\x00")
        except OSError:
            pass
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def parse_publish(first, body):
    qos = (first >> 1) & 3
    tlen = struct.unpack("!H", body[:2])[0]
    topic = body[2:2 + tlen].decode(errors="replace")
    i = 2 + tlen
    pid = None
    if qos:
        pid = struct.unpack("!H", body[i:i + 2])[0]
        i += 2
    return topic, qos, pid, body[i:]


def find_key(v, key):
    """The value of `key` anywhere in a JSON value (a republished row may nest it)."""
    if isinstance(v, dict):
        if key in v:
            return v[key]
        for x in v.values():
            r = find_key(x, key)
            if r is not None:
                return r
    elif isinstance(v, list):
        for x in v:
            r = find_key(x, key)
            if r is not None:
                return r
    return None


# ---- the load ------------------------------------------------------------------

class Stats:
    """Thread-safe accumulators, drained by the sampler every interval."""

    def __init__(self):
        self.lock = threading.Lock()
        self.errors = []  # (time, where, message) of this interval
        self.error_total = 0
        self.error_kinds = {}
        self.reset()
        self.commands_sent = self.commands_answered = self.commands_bad = 0
        self.slowest = []  # (client ms, server ms, path, wall clock) of the slowest API requests
        self.churn_total = 0

    def reset(self):
        self.api = []  # (client ms, server ms)
        self.probe = []  # direct path latencies, ms
        self.echo = []  # rule path latencies, ms
        self.churn = []  # connect → CONNACK ms
        self.commands_i = 0

    def error(self, where, msg, errlog):
        with self.lock:
            self.errors.append((time.time(), where, msg))
            self.error_total += 1
            self.error_kinds[where] = self.error_kinds.get(where, 0) + 1
        errlog(f"{where}: {msg}")

    def drain(self):
        with self.lock:
            out = (self.api, self.probe, self.echo, self.churn, self.errors, self.commands_i)
            self.reset()
            self.errors = []
        return out


class Probe:
    """One publisher (the probe device, QoS 1) and one subscriber (the
    monitor, QoS 1, direct topic and the echo rule's topic)."""

    def __init__(self, mqtt_addr, token, monitor_password, rate, stats, stop, errlog):
        self.mqtt_addr, self.token, self.monitor_password = mqtt_addr, token, monitor_password
        self.rate, self.stats, self.stop, self.errlog = rate, stats, stop, errlog
        self.lock = threading.Lock()
        self.sent = {}  # seq -> perf_counter at send
        self.got = set()
        self.got_echo = set()
        self.dups = 0
        self.acked = 0
        self.seq = 0
        self.paused = threading.Event()  # set: stop publishing (the end of the run)
        self.direct_topic = f"devices/{PROBE_DEVICE}/telemetry"
        self.echo_topic = f"soak/echo/{PROBE_DEVICE}"
        self.pub = self.sub = None
        self.threads = []
        self.reconnecting = threading.Lock()

    def connect_sub(self):
        sub = Mqtt(self.mqtt_addr, "soak-monitor-probe", MONITOR_USER, self.monitor_password, keepalive=60)
        sub.subscribe(1, [(self.direct_topic, 1), (self.echo_topic, 1)])
        sub.sock.settimeout(5)
        return sub

    def connect_pub(self):
        pub = Mqtt(self.mqtt_addr, PROBE_DEVICE, PROBE_DEVICE, self.token, keepalive=60)
        pub.sock.settimeout(5)
        return pub

    def start(self):
        self.sub = self.connect_sub()
        self.pub = self.connect_pub()
        for target in (self.sub_loop, self.pub_loop, self.puback_loop, self.ping_loop):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self.threads.append(t)
        self.pub_thread = self.threads[1]

    def sub_loop(self):
        while not self.stop.is_set():
            try:
                first, body = self.sub.read()
            except socket.timeout:
                continue
            except (OSError, ConnectionError) as e:
                if self.stop.is_set():
                    return
                self.stats.error("probe", f"subscriber connection lost: {e}", self.errlog)
                self.sub.close()
                while not self.stop.is_set():
                    try:
                        self.sub = self.connect_sub()
                        break
                    except (OSError, ConnectionError) as e2:
                        self.stats.error("probe", f"subscriber reconnect failed: {e2}", self.errlog)
                        time.sleep(1)
                continue
            now = time.perf_counter()
            if first >> 4 != 3:
                continue
            topic, qos, pid, payload = parse_publish(first, body)
            if qos and pid is not None:
                try:
                    self.sub.puback(pid)
                except OSError:
                    pass
            try:
                seq = find_key(json.loads(payload), "probe_seq")
            except ValueError:
                seq = None
            if not isinstance(seq, (int, float)):
                continue
            seq = int(seq)
            with self.lock:
                t0 = self.sent.get(seq)
                target = self.got if topic == self.direct_topic else self.got_echo
                if seq in target:
                    self.dups += 1
                    continue
                target.add(seq)
            if t0 is not None:
                ms = (now - t0) * 1000
                with self.stats.lock:
                    (self.stats.probe if topic == self.direct_topic else self.stats.echo).append(ms)

    def pub_loop(self):
        period = 1.0 / self.rate
        nxt = time.monotonic()
        while not self.stop.is_set() and not self.paused.is_set():
            nxt += period
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.monotonic()
            if self.stop.is_set() or self.paused.is_set():
                return
            with self.lock:
                self.seq += 1
                seq = self.seq
                self.sent[seq] = time.perf_counter()
            payload = json.dumps({"probe_seq": seq}).encode()
            pub = self.pub
            try:
                pub.publish(self.direct_topic, payload, qos=1, pid=(seq - 1) % 65535 + 1)
            except OSError as e:
                self.stats.error("probe", f"publisher send failed: {e}", self.errlog)
                self.reconnect_pub(pub)

    def reconnect_pub(self, broken):
        with self.reconnecting:
            if self.pub is not broken:
                return  # the other thread did it
            self._reconnect_pub()

    def _reconnect_pub(self):
        self.pub.close()
        while not self.stop.is_set():
            try:
                self.pub = self.connect_pub()
                return
            except (OSError, ConnectionError) as e:
                self.stats.error("probe", f"publisher reconnect failed: {e}", self.errlog)
                time.sleep(1)

    def puback_loop(self):
        while not self.stop.is_set():
            pub = self.pub
            try:
                first, _ = pub.read()
            except socket.timeout:
                continue
            except (OSError, ConnectionError) as e:
                if self.stop.is_set():
                    return
                if pub is self.pub:
                    self.stats.error("probe", f"publisher connection lost: {e}", self.errlog)
                    self.reconnect_pub(pub)
                else:
                    time.sleep(0.1)
                continue
            if first >> 4 == 4:
                with self.lock:
                    self.acked += 1

    def ping_loop(self):
        while not self.stop.wait(20):
            for c in (self.sub, self.pub):
                try:
                    c.ping()
                except OSError:
                    pass

    def lost(self, older_than=10.0):
        """Readings sent more than `older_than` s ago not received: (direct, echo)."""
        cut = time.perf_counter() - older_than
        with self.lock:
            old = [s for s, t in self.sent.items() if t < cut]
            return (sum(1 for s in old if s not in self.got),
                    sum(1 for s in old if s not in self.got_echo))

    def close(self):
        for c in (self.pub, self.sub):
            if c:
                c.disconnect()


def api_reader(http_addr, token, rate, devices, stats, stop, errlog, seed):
    """--api-rate requests/s in the console's shapes, one at a time."""
    rnd = random.Random(seed)
    client = Http(http_addr, token)
    plan = []
    groups = [p for p in PROFILES if devices.get(p)]
    all_ids = [(p, d) for p in groups for d in devices[p]]

    def q(params):
        return "?" + urllib.parse.urlencode([(k, v) for k, v in params if v not in ("", None)])

    def refill():
        kind = rnd.random()
        if kind < 0.35:  # a device list view
            v = rnd.randrange(6)
            if v == 0:
                plan.append("/devices" + q([("limit", 50)]))
            elif v == 1:
                term = rnd.choice([rnd.choice(PROFILES), rnd.choice(all_ids)[1][:8], "no-such-device"])
                plan.append("/devices" + q([("search", term), ("limit", 50)]))
            elif v == 2:
                plan.append("/devices" + q([("group", rnd.choice(groups)), ("limit", 50)]))
            elif v == 3:
                plan.append("/devices" + q([("online", "true"), ("profile", rnd.choice(groups)), ("limit", 50)]))
            elif v == 4:
                plan.append("/devices" + q([("limit", 50), ("after", rnd.choice(all_ids)[1])]))
            else:
                plan.append("/alarms" + q([("status", "active"), ("limit", 50)]))
        elif kind < 0.85:  # a device page
            p, d = rnd.choice(all_ids)
            enc = urllib.parse.quote(d, safe="")
            m = rnd.choice(METRICS[p])
            plan.extend([
                f"/devices/{enc}",
                f"/devices/{enc}/telemetry",
                f"/devices/{enc}/events" + q([("kind", "connection"), ("limit", 20)]),
                "/alarms" + q([("device", d), ("status", "active"), ("limit", 20)]),
                f"/devices/{enc}/commands" + q([("limit", 20)]),
                f"/devices/{enc}/telemetry/{m}" + q([("from", "-5m"), ("limit", 600)]),
                "/telemetry/aggregate" + q([("metric", m), ("device", d), ("from", "-1h"), ("bucket", "1m"),
                                            ("fn", "avg,min,max")]),
            ])
        else:  # a dashboard-style aggregate over a group
            p = rnd.choice(groups)
            plan.append("/telemetry/aggregate" + q([("metric", METRICS[p][0]), ("group", p), ("from", "-15m"),
                                                    ("bucket", "1m"), ("fn", "avg"), ("combine", "true")]))

    period = 1.0 / rate
    nxt = time.monotonic()
    while not stop.is_set():
        nxt += period
        delay = nxt - time.monotonic()
        if delay > 0:
            if stop.wait(delay):
                break
        else:
            nxt = time.monotonic()  # behind: do not burst to catch up
        if not plan:
            refill()
        path = plan.pop(0)
        try:
            _, cms, sms = client.request("GET", path)
            with stats.lock:
                stats.api.append((cms, sms))
                if len(stats.slowest) < 10 or cms > stats.slowest[-1][0]:
                    stats.slowest.append((cms, sms, path, time.strftime("%H:%M:%S")))
                    stats.slowest.sort(key=lambda x: -x[0])
                    del stats.slowest[10:]
        except ApiError as e:
            stats.error("api", str(e), errlog)
    client.close()


def commander(http_addr, token, every, devices, stats, stop, errlog, seed, pending):
    """A `start` command to a random simulated device every `every` s, each
    followed until answered (the simulator answers `start`)."""
    rnd = random.Random(seed + 1)
    client = Http(http_addr, token)
    ids = [d for p in PROFILES for d in devices.get(p, [])]
    n = 0
    nxt = time.monotonic()
    while not stop.is_set():
        if time.monotonic() >= nxt:
            nxt += every
            d = rnd.choice(ids)
            n += 1
            try:
                c = client.post(f"/devices/{urllib.parse.quote(d, safe='')}/commands",
                                {"name": "start", "params": {"soak": n}, "timeout_secs": 30})
                with stats.lock:
                    stats.commands_sent += 1
                    stats.commands_i += 1
                pending[c["id"]] = (time.monotonic(), d)
            except (ApiError, KeyError, TypeError) as e:
                stats.error("command", f"send to {d}: {e}", errlog)
        follow_commands(client, pending, stats, errlog, min_age=3)
        stop.wait(0.5)
    client.close()


def follow_commands(client, pending, stats, errlog, min_age):
    now = time.monotonic()
    for cid, (t0, d) in list(pending.items()):
        if now - t0 < min_age:
            continue
        try:
            c = client.get(f"/commands/{urllib.parse.quote(cid, safe='')}")
        except ApiError as e:
            stats.error("command", f"follow {cid}: {e}", errlog)
            continue
        status = c.get("status")
        if status == "answered":
            del pending[cid]
            with stats.lock:
                stats.commands_answered += 1
        elif status in ("failed", "timed_out") or now - t0 > 40:
            del pending[cid]
            with stats.lock:
                stats.commands_bad += 1
            stats.error("command", f"{cid} to {d}: {status} ({c.get('error')})", errlog)


def churner(mqtt_addr, pool, rate, stats, stop, errlog, seed):
    """Connect and disconnect registered devices continuously."""
    rnd = random.Random(seed + 2)
    period = 1.0 / rate
    nxt = time.monotonic()
    i = 0
    while not stop.is_set():
        nxt += period
        delay = nxt - time.monotonic()
        if delay > 0:
            if stop.wait(delay):
                break
        else:
            nxt = time.monotonic()
        dev, token = pool[i % len(pool)]
        clean = (i // len(pool)) % 2 == 0
        abrupt = i % 2 == 1
        i += 1
        t0 = time.perf_counter()
        try:
            c = Mqtt(mqtt_addr, dev, dev, token, keepalive=30, clean=clean, timeout=10)
        except (OSError, ConnectionError) as e:
            stats.error("churn", f"connect {dev}: {e}", errlog)
            continue
        ms = (time.perf_counter() - t0) * 1000
        try:
            c.subscribe(1, [(f"devices/{dev}/commands", 1)])
            c.publish(f"devices/{dev}/telemetry",
                      json.dumps({"rssi": -60 - rnd.randrange(40), "uptime_s": i}).encode(), qos=1, pid=2)
            while True:
                first, body = c.read()
                if first >> 4 == 4:
                    break
                if first >> 4 == 3:  # a queued message for a persistent session
                    _, qos, pid, _ = parse_publish(first, body)
                    if qos and pid is not None:
                        c.puback(pid)
            with stats.lock:
                stats.churn.append(ms)
                stats.churn_total += 1
        except (OSError, ConnectionError, struct.error) as e:
            stats.error("churn", f"{dev}: {e}", errlog)
        finally:
            if abrupt:
                c.close()
            else:
                c.disconnect()


# ---- the plot ------------------------------------------------------------------

PLOT = r'''
import csv, json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
path, out, meta = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
rows = list(csv.DictReader(open(path)))
def col(k):
    return [float(r[k]) if r[k] not in ("", None) else float("nan") for r in rows]
t = [x / 60 for x in col("elapsed_s")]
fig, ax = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
ax[0].plot(t, [x / 1024 for x in col("rss_kib")], label="server RSS")
if meta.get("fit"):
    a, b, x0, x1 = meta["fit"]
    ax[0].plot([x0 / 60, x1 / 60], [(a * x0 + b) / 1024, (a * x1 + b) / 1024], "r--",
               label=f"fit, second half: {meta['growth']}")
ax[0].set_ylabel("MiB"); ax[0].legend(loc="lower right")
ax[1].plot(t, col("fds"), label="server open fds", color="tab:green")
ax[1].set_ylabel("fds"); ax[1].legend(loc="lower right")
ax[1].yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
ax[2].plot(t, col("probe_p99_ms"), label="probe p99 (broker path)")
ax[2].plot(t, col("echo_p99_ms"), label="probe p99 (rule echo)")
ax[2].plot(t, col("api_p99_ms"), label="API p99 (client)")
ax[2].set_ylabel("ms"); ax[2].set_yscale("log"); ax[2].legend(loc="upper right")
ax[2].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
ax[2].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
ax[2].set_xlabel("minutes")
for a_ in ax:
    a_.axvspan(0, meta["warmup"] / 60, color="0.9")
    a_.axvline(meta["half"] / 60, color="0.6", ls=":")
    a_.grid(alpha=0.3)
fig.suptitle(meta["title"], fontsize=10)
fig.tight_layout()
fig.savefig(out, dpi=110)
'''


def plot(csv_path, png_path, meta):
    venv = os.path.join(REPO, "target", "soak-venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py) or subprocess.run([py, "-c", "import matplotlib"],
                                                 capture_output=True).returncode != 0:
        log(f"making {venv} with matplotlib (once)")
        os.makedirs(os.path.dirname(venv), exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
        subprocess.run([py, "-m", "pip", "install", "-q", "matplotlib"], check=True, timeout=600)
    subprocess.run([py, "-c", PLOT, csv_path, png_path, json.dumps(meta)], check=True, timeout=300)


# ---- main ----------------------------------------------------------------------

class Deadline(Exception):
    pass


def default_bin():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    return os.path.join(target, "release", "m2mhub")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--bin", default=default_bin())
    ap.add_argument("--out", default=None, help="output folder (default target/soak or ./soak-out)")
    ap.add_argument("--quick", action="store_true",
                    help="about 60 s, 250 devices, light rates: for CI (a debug build on 2 cores)")
    ap.add_argument("--duration", type=float, help="seconds of load (default 3600; --quick: 60)")
    ap.add_argument("--devices", type=int, help="simulated devices, all profiles (default 10000; --quick: 250)")
    ap.add_argument("--interval", default=None,
                    help="the simulators' reporting interval (default 1s: 10,000 msg/s from 10,000 devices, "
                         "half of what this harness measured the server to carry; --quick: 5s)")
    ap.add_argument("--sample", type=float, help="seconds between samples (default 10; --quick: 5)")
    ap.add_argument("--api-rate", type=float, help="API reads/s (default 10; --quick: 2)")
    ap.add_argument("--command-every", type=float, help="seconds between commands (default 3; --quick: 2)")
    ap.add_argument("--churn-rate", type=float, help="MQTT connects/s of the churn (default 5; --quick: 2)")
    ap.add_argument("--probe-rate", type=float, default=5, help="probe readings/s (default 5)")
    ap.add_argument("--flush-secs", type=int,
                    help="telemetry.flush_interval_secs of the server (default 60; --quick: 10): the "
                         "platform's default, 600, keeps up to 10 minutes of points in memory, a sawtooth "
                         "that hides a trend; each flush also adds to the open day partition's index "
                         "(BENCHMARKS.md, Soak), so 60 is a 10x acceleration of that")
    ap.add_argument("--max-rss-growth", type=float, default=5.0,
                    help="RSS growth allowed, %% of mean per hour, extrapolated (default 5)")
    ap.add_argument("--rss-floor-mib", type=float,
                    help="an RSS rise over the second half below this is within noise (default 4 MiB; "
                         "--quick: 16 MiB)")
    ap.add_argument("--max-fd-spread", type=int, default=12,
                    help="max - min of open fds after the warm-up (default 12)")
    ap.add_argument("--max-errors", type=int, default=0, help="errors tolerated (default 0)")
    ap.add_argument("--setup-timeout", type=float, default=300,
                    help="seconds allowed to start the server and connect the fleet")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--keep-data", action="store_true", help="keep the server's data folder")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    q = args.quick
    dflt = lambda v, normal, quick: v if v is not None else (quick if q else normal)
    args.duration = dflt(args.duration, 3600.0, 60.0)
    args.devices = dflt(args.devices, 10_000, 250)
    args.interval = dflt(args.interval, "1s", "5s")
    args.sample = dflt(args.sample, 10.0, 5.0)
    args.api_rate = dflt(args.api_rate, 10.0, 2.0)
    args.command_every = dflt(args.command_every, 3.0, 2.0)
    args.churn_rate = dflt(args.churn_rate, 5.0, 2.0)
    args.flush_secs = dflt(args.flush_secs, 60, 10)
    args.rss_floor_mib = dflt(args.rss_floor_mib, 4.0, 16.0)
    if args.out is None:
        args.out = os.path.join("target", "soak") if os.path.isdir("target") else "soak-out"
    os.makedirs(args.out, exist_ok=True)
    args.bin = os.path.abspath(args.bin)
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"soak: no executable at {args.bin} (--bin)")
    interval = seconds(args.interval)
    warmup = min(0.1 * args.duration, 300.0)
    half = args.duration / 2
    bound = args.setup_timeout + args.duration + 90

    # TERM, INT and the overall bound all end in the finally block below.
    def on_signal(signum, _frame):
        raise SystemExit(f"soak: {signal.Signals(signum).name}")

    def on_alarm(_signum, _frame):
        raise Deadline(f"soak: the overall bound ({bound:.0f} s) was reached")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(bound))
    if PIN:
        try:
            os.sched_setaffinity(0, {1})  # the driver is load: core 1
        except OSError:
            pass

    parent = os.path.join(REPO, "target") if os.path.isdir(os.path.join(REPO, "target")) else None
    if parent is None and os.path.isdir("target"):
        parent = os.path.abspath("target")
    data = tempfile.mkdtemp(prefix="m2mhub-soak-", dir=parent)
    errlog_f = open(os.path.join(args.out, "errors.log"), "w")
    errlog_lock = threading.Lock()

    def errlog(msg):
        with errlog_lock:
            errlog_f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            errlog_f.flush()

    log(f"soak: {args.bin}, {args.devices:,} devices every {args.interval}, {args.duration:.0f} s of load "
        f"(bounded at {bound:.0f} s in all), output in {args.out}, data in {data}"
        + ("" if PIN else " (no pinning: taskset or a second core missing)"))

    procs = []
    threads = []
    stop = threading.Event()
    exit_code = 2
    srv = None
    server_log_path = os.path.join(args.out, "server.log")
    try:
        # --- the server -------------------------------------------------------
        monitor_password = f"soak-{random.SystemRandom().randrange(10**12)}"
        pw = subprocess.run([args.bin, "passwd", MONITOR_USER], input=monitor_password + "\n",
                            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        passwd_file = os.path.join(data, "passwd")
        with open(passwd_file, "w") as f:
            f.write(pw + "\n")
        env = dict(os.environ, RUST_LOG=os.environ.get("SOAK_RUST_LOG", "warn"),
                   M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP="0", M2MHUB_MQTT_MAX_CONNECTIONS_PER_IP="0",
                   M2MHUB_TELEMETRY_FLUSH_INTERVAL_SECS=str(args.flush_secs))
        for k in ("M2MHUB_CONFIG", "M2MHUB_SERVER", "M2MHUB_TOKEN", "M2MHUB_PROFILE", "M2MHUB_CLAIM_TOKEN"):
            env.pop(k, None)
        out_path = os.path.join(data, "server.stdout")
        srv = subprocess.Popen(
            pinned(0, [args.bin, "serve", "--data-dir", os.path.join(data, "server"),
                       "--password-file", passwd_file,
                       "--mqtt-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                       "--mqtts-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0",
                       "--coaps-listen", "127.0.0.1:0"]),
            stdout=open(out_path, "w"), stderr=open(server_log_path, "w"), env=env,
            preexec_fn=_die_with_parent)
        procs.append(srv)
        user = password = mqtt = http_addr = None
        t_setup = time.monotonic()
        while not http_addr:
            if srv.poll() is not None:
                raise RuntimeError(f"the server exited ({srv.returncode}) at start: see {server_log_path}")
            if time.monotonic() - t_setup > min(120, args.setup_timeout):
                raise RuntimeError("the server did not print its ready line")
            time.sleep(0.2)
            with open(out_path) as f:
                for line in f:
                    line = line.strip()
                    if line.startswith("user:"):
                        user = line.split()[-1]
                    elif line.startswith("password:"):
                        password = line.split()[-1]
                    elif line.startswith("m2mhub ready"):
                        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
                        mqtt, http_addr = fields["mqtt"], fields["http"]
        token = Http(http_addr).post("/auth/login", {"username": user, "password": password})["token"]
        api = Http(http_addr, token)
        log(f"server pid {srv.pid}: mqtt {mqtt}, http {http_addr}")

        # --- groups, profiles, claim tokens, the probe and churn devices, rules ---
        per = {p: args.devices // len(PROFILES) + (1 if i < args.devices % len(PROFILES) else 0)
               for i, p in enumerate(PROFILES)}
        claims = {}
        for p in PROFILES:
            if not per[p]:
                continue
            api.post("/tenants/default/groups", {"id": p, "name": f"Simulated {p} devices"})
            api.post("/profiles", {"name": p, "description": f"simulated {p}"})
            claims[p] = api.post("/claim-tokens", {"name": f"soak {p}", "group": p, "profile": p,
                                                   "max_uses": per[p]})["secret"]
        api.post("/tenants/default/groups", {"id": "soak", "name": "Soak harness devices"})
        api.post("/devices", {"id": PROBE_DEVICE, "name": "soak latency probe", "group": "soak"})
        probe_token = api.post(f"/devices/{PROBE_DEVICE}/tokens", {})["secret"]
        # Each churn id reconnects at most every 8 s (the flapping ban counts
        # more than 20 unclean connects per client id per minute).
        pool_size = max(10, math.ceil(args.churn_rate * 8))
        pool = []
        for i in range(pool_size):
            dev = f"soak-churn-{i:03d}"
            api.post("/devices", {"id": dev, "name": f"soak churn {i}", "group": "soak"})
            pool.append((dev, api.post(f"/devices/{dev}/tokens", {})["secret"]))
        rules = [
            {"id": "soak-overheating", "name": "Overheating machine (soak)",
             "sql": "SELECT device, avg(temperature) AS t FROM 'devices/+/telemetry' "
                    "WHERE rpm IS NOT NULL AND temperature IS NOT NULL "
                    "GROUP BY device, TUMBLING(10s) HAVING avg(temperature) > 85 "
                    "CLEAR WHEN avg(temperature) < 75",
             "actions": [{"type": "alarm", "alarm_type": "overheating", "severity": "major"}]},
            {"id": "soak-speeding", "name": "Speeding truck (soak)",
             "sql": "SELECT device, speed_kmh FROM 'devices/+/telemetry' "
                    "WHERE coalesce(speed_kmh, 0) > 90 CLEAR WHEN coalesce(speed_kmh, 0) < 80",
             "actions": [{"type": "republish", "topic": "fleet/speeding/{device}", "qos": 0}]},
            {"id": "soak-probe-echo", "name": "Probe echo (soak)",
             "sql": f"SELECT * FROM 'devices/{PROBE_DEVICE}/telemetry'",
             "actions": [{"type": "republish", "topic": "soak/echo/{device}", "qos": 1}]},
        ]
        for r in rules:
            api.post("/rules", r)

        # --- the fleet: provision, then report for the whole run ----------------
        state_dir = os.path.join(data, "sim")
        sim_env = dict(env, RUST_LOG="warn")

        def sim(p, extra, logname):
            cmd = pinned(1, [args.bin, "sim", "--profile", p, "--count", str(per[p]), "--mqtt", mqtt,
                             "--server", f"http://{http_addr}", "--claim-token", claims[p],
                             "--state-dir", state_dir, "--interval", args.interval,
                             "--seed", str(args.seed), *extra])
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=sim_env,
                                    stderr=open(os.path.join(args.out, logname), "w"),
                                    preexec_fn=_die_with_parent)

        log(f"provisioning {args.devices:,} devices by claim token")
        first = [(p, sim(p, ["--duration", "2s", "--progress-secs", "0"], f"sim-{p}-provision.log"))
                 for p in claims]
        procs += [x for _, x in first]
        for p, x in first:
            left = args.setup_timeout - (time.monotonic() - t_setup)
            if x.wait(timeout=max(1, left)) != 0:
                raise RuntimeError(f"sim {p} (provisioning) exited {x.returncode}: "
                                   f"see {args.out}/sim-{p}-provision.log")
        devices = {}
        for p in claims:
            with open(os.path.join(state_dir, f"{p}.json")) as f:
                devices[p] = [c["device_id"] for c in json.load(f)]
        registered = api.get("/devices?limit=1")["total"]
        log(f"{registered:,} devices registered (fleet, probe, {pool_size} churn)")
        run_for = f"{int(args.duration + args.setup_timeout + 60)}s"  # they stop by themselves too
        fleet = [(p, sim(p, ["--duration", run_for, "--progress-secs", "60"], f"sim-{p}.log")) for p in claims]
        procs += [x for _, x in fleet]
        while True:
            for p, x in fleet:
                if x.poll() is not None:
                    raise RuntimeError(f"sim {p} exited {x.returncode}: see {args.out}/sim-{p}.log")
            conns = api.get("/broker")["connections"]
            if conns >= args.devices:
                break
            if time.monotonic() - t_setup > args.setup_timeout:
                raise RuntimeError(f"only {conns} of {args.devices} devices connected within --setup-timeout")
            time.sleep(1)
        log(f"{conns:,} MQTT connections, {time.monotonic() - t_setup:.0f} s after the start")

        # --- the load -------------------------------------------------------------
        stats = Stats()
        probe = Probe(mqtt, probe_token, monitor_password, args.probe_rate, stats, stop, errlog)
        probe.start()
        pending = {}
        for target, targs in [
            (api_reader, (http_addr, token, args.api_rate, devices, stats, stop, errlog, args.seed)),
            (commander, (http_addr, token, args.command_every, devices, stats, stop, errlog, args.seed, pending)),
            (churner, (mqtt, pool, args.churn_rate, stats, stop, errlog, args.seed)),
        ]:
            t = threading.Thread(target=target, args=targs, daemon=True)
            t.start()
            threads.append(t)
        expected = args.devices / interval
        log(f"load running for {args.duration:.0f} s: {expected:,.0f} msg/s of telemetry expected, "
            f"{args.api_rate:g} API reads/s, a command every {args.command_every:g} s, "
            f"{args.churn_rate:g} connects/s of churn, probe {args.probe_rate:g}/s; "
            f"warm-up {warmup:.0f} s, flatness judged from {half:.0f} s")

        csv_path = os.path.join(args.out, "soak.csv")
        cols = ["elapsed_s", "rss_kib", "fds", "threads", "server_cpu_pct", "load_cpu_pct",
                "server_runq_wait_pct", "core0_others_pct", "host_cpu_pressure", "host_io_pressure",
                "probe_sent", "probe_lost", "probe_p50_ms", "probe_p99_ms", "echo_lost", "echo_p50_ms",
                "echo_p99_ms", "connections", "sessions", "subscriptions", "ingest_msg_s", "ingest_points_s",
                "head_points", "flushes", "series", "alarms_active", "rules_outputs",
                "api_requests", "api_p50_ms", "api_p99_ms", "api_server_p99_ms",
                "commands_sent_total", "commands_answered_total", "churn_connects", "churn_p99_ms",
                "dropped_queue_full", "internal_dropped", "rules_dropped", "rules_action_failures",
                "audit_dropped", "webhooks_dropped", "outbox_dropped", "tsdb_write_errors", "store_errors",
                "rate_limited", "bans", "errors", "server_log_errors"]
        csv_f = open(csv_path, "w", newline="")
        writer = csv.DictWriter(csv_f, fieldnames=cols)
        writer.writeheader()
        rows = []
        drop_keys = {
            "dropped_queue_full": ("broker", "messages_dropped_queue_full"),
            "internal_dropped": ("broker", "internal_messages_dropped"),
            "store_errors": ("broker", "store_errors"),
            "rate_limited": ("broker", "publishes_rate_limited"),
            "bans": ("broker", "bans_automatic"),
            "rules_dropped": ("metrics", "m2mhub_rules_dropped_total"),
            "rules_action_failures": ("metrics", "m2mhub_rules_action_failures_total"),
            "audit_dropped": ("metrics", "m2mhub_identity_audit_dropped_total"),
            "webhooks_dropped": ("metrics", "m2mhub_rules_webhooks_dropped_total"),
            "outbox_dropped": ("metrics", "m2mhub_gateway_outbox_dropped_total"),
            "tsdb_write_errors": ("metrics", "m2mhub_tsdb_write_errors_total"),
        }
        load_pids = [x.pid for _, x in fleet]

        def load_cpu():
            s = self_cpu_seconds()
            for pid in load_pids:
                try:
                    s += cpu_seconds(pid)
                except OSError:
                    pass
            return s

        def server_log_errors():
            n = 0
            try:
                with open(server_log_path, errors="replace") as f:
                    for line in f:
                        line = ANSI.sub("", line)
                        if " ERROR " in line or "panicked" in line:
                            n += 1
            except OSError:
                pass
            return n

        mon = Http(http_addr, token)
        t0 = time.monotonic()
        prev = {"t": t0, "cpu": cpu_seconds(srv.pid), "load": load_cpu(), "runq": runq_wait_seconds(srv.pid),
                "core0": core_busy_seconds(0),
                "msgs": api.get("/telemetry/stats")["ingest"]}
        log_errors0 = server_log_errors()
        server_died = None
        last_report = t0
        next_sample = t0 + args.sample
        stats.drain()
        end = t0 + args.duration
        while True:
            now = time.monotonic()
            if now >= end:
                break
            time.sleep(max(0.0, min(next_sample, end) - now))
            if time.monotonic() < next_sample and time.monotonic() < end:
                continue
            next_sample += args.sample
            if srv.poll() is not None:
                server_died = f"the server exited with {srv.returncode} at {time.monotonic() - t0:.0f} s"
                log(server_died)
                break
            row = {"elapsed_s": round(time.monotonic() - t0, 1)}
            try:
                st = proc_status(srv.pid)
                row["rss_kib"] = int(st["VmRSS"].split()[0])
                row["threads"] = int(st["Threads"])
                row["fds"] = len(os.listdir(f"/proc/{srv.pid}/fd"))
                cpu = cpu_seconds(srv.pid)
                runq = runq_wait_seconds(srv.pid)
                core0 = core_busy_seconds(0)
                lc = load_cpu()
                broker = mon.get("/broker")
                tstats = mon.get("/telemetry/stats")
                metrics = metrics_text(http_addr)
                alarms = mon.get("/alarms/summary")
            except (OSError, ApiError, KeyError) as e:
                if srv.poll() is not None:
                    server_died = f"the server exited with {srv.returncode} at {time.monotonic() - t0:.0f} s"
                    log(server_died)
                    break
                stats.error("sampler", str(e), errlog)
                continue
            wall = time.monotonic() - prev["t"]
            row["server_cpu_pct"] = round((cpu - prev["cpu"]) / wall * 100, 1)
            row["load_cpu_pct"] = round((lc - prev["load"]) / wall * 100, 1)
            row["server_runq_wait_pct"] = round((runq - prev["runq"]) / wall * 100, 1)
            # Core 0 is the server's: what else ran there (other processes, interrupts).
            row["core0_others_pct"] = round(max(0.0, (core0 - prev["core0"]) - (cpu - prev["cpu"])) / wall * 100, 1) \
                if PIN else ""
            row["host_cpu_pressure"] = host_pressure("cpu")
            row["host_io_pressure"] = host_pressure("io")
            ing = tstats["ingest"]
            row["ingest_msg_s"] = round((ing["messages"] - prev["msgs"]["messages"]) / wall, 1)
            row["ingest_points_s"] = round((ing["points"] - prev["msgs"]["points"]) / wall, 1)
            prev = {"t": time.monotonic(), "cpu": cpu, "load": lc, "runq": runq, "core0": core0, "msgs": ing}
            row["head_points"] = tstats.get("head_points")
            row["flushes"] = tstats.get("flushes")
            row["series"] = tstats.get("series")
            row["connections"] = broker["connections"]
            row["sessions"] = broker["sessions"]
            row["subscriptions"] = broker["subscriptions"]
            row["alarms_active"] = alarms.get("total")
            row["rules_outputs"] = int(metrics.get("m2mhub_rules_outputs_total", 0))
            for k, (src, key) in drop_keys.items():
                row[k] = int(broker["counters"].get(key, 0)) if src == "broker" else int(metrics.get(key, 0))
            api_s, probe_s, echo_s, churn_s, errs, cmds_i = stats.drain()
            row["probe_sent"] = probe.seq
            row["probe_lost"], row["echo_lost"] = probe.lost()
            for k, v in (("probe", probe_s), ("echo", echo_s)):
                row[f"{k}_p50_ms"] = round(pct(v, 50), 2) if v else ""
                row[f"{k}_p99_ms"] = round(pct(v, 99), 2) if v else ""
            row["api_requests"] = len(api_s)
            row["api_p50_ms"] = round(pct([c for c, _ in api_s], 50), 2) if api_s else ""
            row["api_p99_ms"] = round(pct([c for c, _ in api_s], 99), 2) if api_s else ""
            srv_ms = [s for _, s in api_s if s is not None]
            row["api_server_p99_ms"] = round(pct(srv_ms, 99), 2) if srv_ms else ""
            with stats.lock:
                row["commands_sent_total"] = stats.commands_sent
                row["commands_answered_total"] = stats.commands_answered
            row["churn_connects"] = len(churn_s)
            row["churn_p99_ms"] = round(pct(churn_s, 99), 2) if churn_s else ""
            row["errors"] = len(errs)
            row["server_log_errors"] = server_log_errors() - log_errors0
            writer.writerow(row)
            csv_f.flush()
            rows.append(row)
            if time.monotonic() - last_report >= 60 or len(rows) == 1:
                last_report = time.monotonic()
                log(f"{row['elapsed_s']:>6.0f} s  RSS {row['rss_kib'] / 1024:.1f} MiB  fds {row['fds']}  "
                    f"cpu {row['server_cpu_pct']}%  ingest {row['ingest_msg_s']:,.0f} msg/s  "
                    f"conns {row['connections']:,}  probe p99 {row['probe_p99_ms']} ms  "
                    f"API p99 {row['api_p99_ms']} ms  errors {stats.error_total}")

        # --- wind down: stop the load, let the last probe readings arrive --------
        probe.paused.set()
        probe.pub_thread.join(timeout=5)  # its last reading is out
        stop_at = time.monotonic()
        while time.monotonic() - stop_at < 10 and server_died is None:
            with probe.lock:
                done = len(probe.got) >= len(probe.sent) and len(probe.got_echo) >= len(probe.sent)
            if done:
                break
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(timeout=15)
        follow_client = Http(http_addr, token) if server_died is None else None
        t_follow = time.monotonic()
        while pending and follow_client and time.monotonic() - t_follow < 15:
            follow_commands(follow_client, pending, stats, errlog, min_age=0)
            if pending:
                time.sleep(1)
        unresolved_commands = len(pending)
        probe.close()
        final_conns = rows[-1]["connections"] if rows else 0
        if server_died is None:
            try:
                final_conns = api.get("/broker")["connections"]
            except ApiError:
                pass

        # --- stop everything; the server must stop cleanly --------------------------
        for x in procs[1:]:
            if x.poll() is None:
                x.terminate()
        for x in procs[1:]:
            try:
                x.wait(timeout=20)
            except subprocess.TimeoutExpired:
                x.kill()
                x.wait()
        shutdown = None
        if srv.poll() is None:
            t_stop = time.monotonic()
            srv.terminate()
            try:
                rc = srv.wait(timeout=30)
                shutdown = (rc, time.monotonic() - t_stop)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
                shutdown = (None, 30.0)

        signal.alarm(0)  # everything is stopped: only reporting is left

        # --- verdict ------------------------------------------------------------------
        checks = []  # (ok, text)
        lines = []
        steady = [r for r in rows if r["elapsed_s"] >= warmup]
        second = [r for r in rows if r["elapsed_s"] >= max(half, warmup)]
        meta = {"warmup": warmup, "half": max(half, warmup)}
        if len(second) >= 3:
            xs = [r["elapsed_s"] / 3600 for r in second]
            ys = [r["rss_kib"] for r in second]
            slope, icpt = fit(xs, ys)  # KiB per hour
            mean = sum(ys) / len(ys)
            growth = slope / mean * 100
            rise_mib = slope * (xs[-1] - xs[0]) / 1024
            ok = growth <= args.max_rss_growth or rise_mib <= args.rss_floor_mib
            checks.append((ok, f"RSS flat: slope {slope:+,.0f} KiB/h over the second half "
                               f"({growth:+.2f} % of the mean {mean / 1024:,.1f} MiB per hour, "
                               f"a rise of {rise_mib:+.2f} MiB over {xs[-1] - xs[0]:.2f} h; allowed "
                               f"{args.max_rss_growth:g} %/h, or a rise within {args.rss_floor_mib:g} MiB)"))
            meta["fit"] = [slope / 3600, icpt, second[0]["elapsed_s"], second[-1]["elapsed_s"]]
            meta["growth"] = f"{slope:+,.0f} KiB/h ({growth:+.2f} %/h)"
            # Diagnostic: the lowest RSS of each flush period (the head is
            # emptied at each flush, so this is the memory that stays).
            blocks = {}
            for r in second:
                b = int(r["elapsed_s"] // args.flush_secs)
                if b not in blocks or r["rss_kib"] < blocks[b]["rss_kib"]:
                    blocks[b] = r
            mins = [blocks[b] for b in sorted(blocks)][1:-1]  # whole periods only
            if len(mins) >= 3:
                fs, _ = fit([r["elapsed_s"] / 3600 for r in mins], [r["rss_kib"] for r in mins])
                lines.append(f"RSS floor (lowest sample of each {args.flush_secs} s flush period, second half): "
                             + ", ".join(f"{r['rss_kib'] / 1024:.1f}" for r in mins[-8:])
                             + f" MiB; slope {fs:+,.0f} KiB/h ({fs / mean * 100:+.2f} %/h)")
            fx = [r["elapsed_s"] / 3600 for r in second]
            fslope, _ = fit(fx, [r["fds"] for r in second])
        else:
            checks.append((False, f"RSS flat: only {len(second)} samples in the second half (run longer)"))
            fslope = 0.0
        if steady:
            fds = [r["fds"] for r in steady]
            spread = max(fds) - min(fds)
            checks.append((spread <= args.max_fd_spread,
                           f"open fds flat: {min(fds)}–{max(fds)} after the warm-up (spread {spread}, "
                           f"allowed {args.max_fd_spread}; slope over the second half {fslope:+.1f}/h)"))
            thr = [r["threads"] for r in steady]
            lines.append(f"server threads {min(thr)}–{max(thr)}; RSS {min(r['rss_kib'] for r in steady) / 1024:,.1f}"
                         f"–{max(r['rss_kib'] for r in steady) / 1024:,.1f} MiB after the warm-up")
        checks.append((server_died is None, "server alive throughout" if server_died is None else server_died))
        if shutdown is not None:
            rc, took = shutdown
            checks.append((rc is not None and took < 30,
                           f"server stopped on SIGTERM: exit {rc} in {took:.1f} s" if rc is not None
                           else "server did NOT stop within 30 s of SIGTERM (killed)"))
        with probe.lock:
            sent = len(probe.sent)
            lost_direct = sum(1 for s in probe.sent if s not in probe.got)
            lost_echo = sum(1 for s in probe.sent if s not in probe.got_echo)
            dups = probe.dups
        all_probe = [float(r["probe_p99_ms"]) for r in steady if r["probe_p99_ms"] != ""]
        all_echo = [float(r["echo_p99_ms"]) for r in steady if r["echo_p99_ms"] != ""]
        checks.append((sent > 0 and lost_direct == 0 and lost_echo == 0,
                       f"probe: {sent:,} readings sent, {lost_direct} lost on the broker path, {lost_echo} "
                       f"lost on the rule echo, {dups} duplicates; worst interval p99 "
                       f"{max(all_probe) if all_probe else float('nan'):.1f} ms (broker), "
                       f"{max(all_echo) if all_echo else float('nan'):.1f} ms (rule echo)"))
        rates = [r["ingest_msg_s"] for r in steady]
        mean_rate = sum(rates) / len(rates) if rates else 0.0
        checks.append((mean_rate >= 0.8 * expected,
                       f"load: telemetry ingest {mean_rate:,.0f} msg/s after the warm-up "
                       f"(expected {expected:,.0f} from the simulators, at least 80 %)"))
        checks.append((final_conns >= 0.99 * args.devices,
                       f"load: {final_conns:,} MQTT connections at the end ({args.devices:,} devices)"))
        last, first_row = (rows[-1], rows[0]) if rows else ({}, {})
        moved = {k: last.get(k, 0) for k in ("dropped_queue_full", "internal_dropped", "rules_dropped",
                                             "audit_dropped", "webhooks_dropped", "outbox_dropped",
                                             "tsdb_write_errors", "store_errors") if last.get(k, 0)}
        checks.append((not moved, "no drops: " + (", ".join(f"{k} {v}" for k, v in moved.items())
                                                  if moved else "queue-full, internal, rules, audit, webhook, "
                                                                "outbox, store write counters all 0")))
        log_errs = server_log_errors() - log_errors0
        total_errors = stats.error_total + (unresolved_commands if server_died is None else 0) + log_errs
        kinds = dict(stats.error_kinds)
        if unresolved_commands:
            kinds["unanswered commands at the end"] = unresolved_commands
        if log_errs:
            kinds["ERROR/panic lines in the server log"] = log_errs
        checks.append((total_errors <= args.max_errors,
                       f"errors: {total_errors} (allowed {args.max_errors})"
                       + (": " + ", ".join(f"{k} {v}" for k, v in kinds.items()) if kinds else "")
                       + (f" — see {args.out}/errors.log" if stats.error_total else "")))
        api_p99 = [float(r["api_p99_ms"]) for r in steady if r["api_p99_ms"] != ""]
        api_n = sum(r["api_requests"] for r in rows)
        cpu = [r["server_cpu_pct"] for r in steady]
        lcpu = [r["load_cpu_pct"] for r in steady]
        lines.append(f"API: {api_n:,} requests, worst interval p99 {max(api_p99) if api_p99 else float('nan'):.1f} ms "
                     f"(client), median interval p99 {pct(api_p99, 50) if api_p99 else float('nan'):.1f} ms")
        lines.append(f"commands: {stats.commands_sent} sent, {stats.commands_answered} answered, "
                     f"{stats.commands_bad} failed or timed out, {unresolved_commands} unresolved at the end")
        lines.append(f"churn: {stats.churn_total:,} connect/subscribe/publish cycles; rule outputs "
                     f"{last.get('rules_outputs', 0):,}; active alarms at the end {last.get('alarms_active')}")
        with stats.lock:
            slowest = list(stats.slowest[:5])
        if slowest:
            lines.append("slowest API requests (client ms / server ms): " + "; ".join(
                f"{c:.0f}/{'-' if s_ is None else f'{s_:.0f}'} {path} at {when}" for c, s_, path, when in slowest))
        if cpu:
            runq_w = [r["server_runq_wait_pct"] for r in steady]
            others = [r["core0_others_pct"] for r in steady if r["core0_others_pct"] != ""]
            psi = [r["host_cpu_pressure"] for r in steady if r["host_cpu_pressure"] != ""]
            lines.append("machine: "
                         + (f"core 0 (the server's) was busy outside the server process {sum(others) / len(others):.0f} % "
                            f"of the time on average (max {max(others):.0f} %: other processes, and kernel work "
                            f"such as network softirqs); " if others else "")
                         + f"the server's threads waited for a CPU {sum(runq_w) / len(runq_w):.0f} % of the time "
                           f"(max {max(runq_w):.0f} %; summed over threads, so their queuing for one core counts)"
                         + (f"; host CPU pressure (PSI some avg10) {sum(psi) / len(psi):.0f} % on average, "
                            f"max {max(psi):.0f} %" if psi else ""))
            lines.append(f"CPU: server {sum(cpu) / len(cpu):.0f} % of a core on average (max {max(cpu):.0f} %), "
                         f"load generators {sum(lcpu) / len(lcpu):.0f} % (max {max(lcpu):.0f} %)")
        title = (f"m2mhub soak: {args.devices:,} devices every {args.interval}, {args.duration:.0f} s, "
                 f"{'PASS' if all(ok for ok, _ in checks) else 'FAIL'}")
        meta["title"] = title
        summary = [title] + [f"  {'PASS' if ok else 'FAIL'}  {t}" for ok, t in checks] + [f"  ----  {x}" for x in lines]
        summary.append(f"  CSV: {csv_path}")
        csv_f.close()
        if not args.no_plot and rows:
            png = os.path.join(args.out, "soak.png")
            try:
                plot(csv_path, png, meta)
                summary.append(f"  plot: {png}")
            except (subprocess.SubprocessError, OSError) as e:
                summary.append(f"  plot failed: {e} (--no-plot skips it)")
        text = "\n".join(summary)
        print(text)
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write(text + "\n")
        exit_code = 0 if all(ok for ok, _ in checks) else 1
    except (RuntimeError, ApiError, OSError, subprocess.SubprocessError, KeyError, Deadline) as e:
        print(f"soak: {e}", file=sys.stderr)
        exit_code = 2
    except SystemExit as e:
        print(e, file=sys.stderr)
        exit_code = 2
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        exit_code = 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop.set()
        for x in reversed(procs):
            if x.poll() is None:
                x.terminate()
        for x in reversed(procs):
            try:
                x.wait(timeout=20)
            except subprocess.TimeoutExpired:
                x.kill()
                x.wait()
        if args.keep_data:
            print(f"soak: data kept in {data}", file=sys.stderr)
        else:
            shutil.rmtree(data, ignore_errors=True)
        errlog_f.close()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
