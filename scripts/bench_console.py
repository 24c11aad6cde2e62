#!/usr/bin/env python3
"""The web console's API calls with 10,000 simulated devices: server time
(the `Server-Timing: app;dur=` header every response carries) and the time
the client sees, for the device list and the device page.

Starts `m2mhub serve` on a fresh data directory (durable mode, the default),
pinned to core 0. Creates one device group, one device profile and one claim
token per simulated profile (factory, meter, truck, wearable, soil), then runs
the real simulator, `m2mhub sim --profile P --count 2000 --claim-token ...`,
once per profile, pinned to core 1: each device provisions itself by claim
token over HTTP, connects over MQTT with its own token and reports a reading
every --interval (5 s: 2,000 messages/s from 10,000 devices).

So that the device page's 24 h history charts read a real day of data (from
the 1 min rollups of sealed partitions, as after a day of operation), the
devices measured on the device page first get 24 h of readings, one a minute,
published over MQTT with their own credentials as timestamped JSON batches
(before their simulator connects), and the script waits for the store to
flush them (`M2MHUB_TELEMETRY_FLUSH_INTERVAL_SECS`, default here 60 s).

Once 10,000 devices are registered and connected and the readings arrive at
the expected rate, it issues the requests the console makes (crates/api/
console/app.js), one at a time over a keep-alive connection, from core 1,
while the fleet keeps reporting:

  device list  GET /devices?limit=50 (first page), ?search=...&limit=50,
               ?group=...&limit=50, ?profile=...&limit=50, ?enabled=...&limit=50,
               ?online=...&limit=50, several filters at once,
               ?limit=50&after=<an id near the end> (a late page)
  device page  GET /devices/{id}, /devices/{id}/tokens, /devices/{id}/certificates,
               /devices/{id}/events?limit=20, /devices/{id}/telemetry, per numeric
               metric /devices/{id}/telemetry/M?from=-5m&limit=600 (the live charts'
               seed) and /telemetry/aggregate?metric=M&device={id}&from=-24h&bucket=15m
               &fn=avg,min,max (the history charts), /devices/{id}/events?kind=
               connection&limit=20, /alarms?device={id}&status=active&limit=20,
               /devices/{id}/commands?limit=20, and /live?device={id} (server-sent
               events: time to the response headers; then closed)
               (/devices/{id}/series is measured too, for reference: the console
               does not call it, so it is not in the page total)

Prints p50/p95/p99/max of the server time and of the client time per request
(for the device page also of the page total: the sum of its requests), as a
Markdown table, and exits. Bounded by --deadline; stops every process it started.

Usage: scripts/bench_console.py [--bin target/release/m2mhub] [--per-profile 2000]
         [--list-reps 200] [--pages 250] [--interval 5s] [--deadline 1500]
--bin defaults to $CARGO_TARGET_DIR/release/m2mhub when that exists. The data
directory (under ./target) is removed at the end unless BENCH_KEEP_DATA is set.
"""

import argparse
import http.client
import json
import math
import os
import random
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
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROFILES = ["factory", "meter", "truck", "wearable", "soil"]

# The metrics each simulated profile reports (crates/sim/src/fleet.rs), with a
# base value and a daily swing for the backfilled history; `None` = boolean.
HISTORY = {
    "factory": {"temperature": (60, 10), "vibration": (2.5, 1), "rpm": (900, 300),
                "load": (0.6, 0.2), "fault": None},
    "meter": {"power_kw": (1.5, 1.0), "energy_kwh": (10_000, 0), "voltage": (230, 1.5)},
    "truck": {"lat": (48.137, 0.05), "lon": (11.575, 0.08), "speed_kmh": (50, 30),
              "fuel_pct": (60, 20), "odometer_km": (100_000, 0)},
    "wearable": {"heart_rate": (70, 15), "steps": (5_000, 4_000), "battery": (60, 20)},
    "soil": {"moisture": (30, 8), "temperature": (12, 5), "battery": (80, 5)},
}


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()

    def check(self, what):
        if self.left() <= 0:
            raise SystemExit(f"bench_console: deadline reached while {what}")


def api(base, method, path, token=None, body=None):
    req = urllib.request.Request(base + path, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, data=data, timeout=60) as r:
        return json.loads(r.read() or b"null")


def query(params):
    """Like the console's `query()` (URLSearchParams): empty values left out."""
    q = urllib.parse.urlencode([(k, v) for k, v in params if v not in ("", None)])
    return "?" + q if q else ""


# ---- a minimal MQTT 3.1.1 client, for the history backfill ------------------

from mqtt_wire import mqtt_str as _str, packet as _packet, varint as _varint  # noqa: E402


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("MQTT connection closed")
        buf += chunk
    return bytes(buf)


def _read_packet(sock):
    first = _recv_exact(sock, 1)[0]
    n, mult = 0, 1
    while True:
        b = _recv_exact(sock, 1)[0]
        n += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return first, _recv_exact(sock, n)


def history_batches(profile, index, end_ms, hours, step_s, per_batch):
    """Timestamped JSON readings of `profile` over `hours` up to `end_ms`."""
    rng = random.Random(index * 7919 + PROFILES.index(profile))
    phase = rng.uniform(0, 2 * math.pi)
    n = int(hours * 3600 / step_s)
    readings = []
    for i in range(n):
        ts = end_ms - (n - i) * step_s * 1000
        x = 2 * math.pi * (ts % 86_400_000) / 86_400_000 + phase
        r = {"ts": ts}
        for metric, shape in HISTORY[profile].items():
            if shape is None:
                r[metric] = rng.random() < 0.01
            elif shape[1] == 0:  # counters only grow
                r[metric] = round(shape[0] + i * 0.1, 2)
            else:
                r[metric] = round(shape[0] + shape[1] * math.sin(x) + 0.05 * shape[1] * rng.gauss(0, 1), 2)
        readings.append(r)
    return [json.dumps(readings[i:i + per_batch]).encode() for i in range(0, n, per_batch)]


def backfill(mqtt, device_id, token, payloads, bad):
    """Publish `payloads` and `bad` undecodable ones (each becomes a device
    event) as the device, QoS 1, and wait for every PUBACK."""
    payloads = payloads + [b"not json {"] * bad
    host, port = mqtt.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(_packet(0x10, _str("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
                          + _str(device_id) + _str(device_id) + _str(token)))
        t, body = _read_packet(s)
        if t >> 4 != 2 or body[1] != 0:
            raise RuntimeError(f"{device_id}: CONNACK {body!r}")
        topic = _str(f"devices/{device_id}/telemetry")
        for pid, p in enumerate(payloads, 1):
            s.sendall(_packet(0x32, topic + struct.pack("!H", pid) + p))
        acked = 0
        while acked < len(payloads):
            t, _ = _read_packet(s)
            if t >> 4 == 4:
                acked += 1
        s.sendall(b"\xe0\x00")


# ---- measuring -------------------------------------------------------------

class Client:
    """One keep-alive HTTP/1.1 connection, like a browser tab's."""

    def __init__(self, http_addr, token):
        host, port = http_addr.rsplit(":", 1)
        self.addr = (host, int(port))
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.conn = None

    def get(self, path):
        """(server ms, client ms, JSON body) of GET /api/v1{path}."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(*self.addr, timeout=60)
            try:
                t0 = time.perf_counter()
                self.conn.request("GET", "/api/v1" + path, headers=self.headers)
                resp = self.conn.getresponse()
                body = resp.read()
                client_ms = (time.perf_counter() - t0) * 1000
                break
            except (http.client.HTTPException, ConnectionError):
                # A keep-alive connection the server closed: reconnect once.
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}: {body[:300]!r}")
        return server_timing(resp, path), client_ms, json.loads(body)


def seconds(d):
    """`5s`, `200ms`, `1m` or plain seconds, as `m2mhub sim --interval` takes them."""
    for unit, mult in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if d.endswith(unit):
            return float(d[:-len(unit)]) * mult
    return float(d)


def server_timing(resp, path):
    timing = resp.getheader("Server-Timing") or ""
    for metric in timing.split(","):
        parts = [p.strip() for p in metric.split(";")]
        if parts[0] == "app":
            for p in parts[1:]:
                if p.startswith("dur="):
                    return float(p[4:])
    raise RuntimeError(f"GET {path}: no Server-Timing app;dur= header ({timing!r})")


def open_stream(http_addr, token, path):
    """(server ms, client ms) to the headers of a server-sent-events stream,
    on a connection of its own (closed at once, as when leaving the page)."""
    host, port = http_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        t0 = time.perf_counter()
        conn.request("GET", "/api/v1" + path,
                     headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        client_ms = (time.perf_counter() - t0) * 1000
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}")
        return server_timing(resp, path), client_ms
    finally:
        conn.close()


def pct(values, p):
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def default_bin():
    target = os.environ.get("CARGO_TARGET_DIR")
    if target and os.path.exists(os.path.join(target, "release", "m2mhub")):
        return os.path.join(target, "release", "m2mhub")
    return "target/release/m2mhub"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=default_bin())
    ap.add_argument("--per-profile", type=int, default=2000, help="devices per profile (5 profiles)")
    ap.add_argument("--interval", default="5s", help="the simulator's reporting interval")
    ap.add_argument("--list-reps", type=int, default=200, help="requests per device-list variant")
    ap.add_argument("--pages", type=int, default=250, help="device pages (distinct devices)")
    ap.add_argument("--history-hours", type=float, default=24)
    ap.add_argument("--history-step", type=int, default=60, help="seconds between backfilled readings")
    ap.add_argument("--events", type=int, default=25,
                    help="undecodable payloads per device of the device page (the registry stores "
                         "at most 10 device events per device and minute)")
    ap.add_argument("--commands", type=int, default=25,
                    help="commands sent to (and answered by) each device of the device page")
    ap.add_argument("--flush-secs", type=int, default=60, help="telemetry.flush_interval_secs of the server")
    ap.add_argument("--settle", type=float, default=30, help="seconds of steady reporting before measuring")
    ap.add_argument("--deadline", type=float, default=1500, help="give up after this many seconds")
    ap.add_argument("--month-devices", type=int, default=20,
                    help="devices (of the device page's) given 30 days of history for the dashboard and 30-day charts")
    ap.add_argument("--month-step", type=int, default=600, help="seconds between their backfilled readings")
    ap.add_argument("--dashboard-reps", type=int, default=200, help="dashboard loads measured")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    total_devices = args.per_profile * len(PROFILES)
    deadline = Deadline(args.deadline)
    rnd = random.Random(args.seed)
    # A TERM (or Ctrl-C) still runs the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_console: terminated"))
    # This process is the load generator: core 1, like the simulators.
    try:
        os.sched_setaffinity(0, {1})
    except (AttributeError, OSError):
        pass

    parent = os.path.abspath("target") if os.path.isdir("target") else None
    data = tempfile.mkdtemp(prefix="m2mhub-bench-console-", dir=parent)
    # All devices connect from 127.0.0.1: lift the per-IP defences.
    env = dict(os.environ, RUST_LOG="warn",
               M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP="0", M2MHUB_MQTT_MAX_CONNECTIONS_PER_IP="0",
               M2MHUB_TELEMETRY_FLUSH_INTERVAL_SECS=str(args.flush_secs))
    for k in ("M2MHUB_CONFIG", "M2MHUB_SERVER", "M2MHUB_TOKEN", "M2MHUB_PROFILE", "M2MHUB_CLAIM_TOKEN"):
        env.pop(k, None)
    procs = []
    srv = subprocess.Popen(
        ["taskset", "-c", "0", args.bin, "serve", "--data-dir", os.path.join(data, "server"),
         "--mqtt-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
         "--mqtts-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0", "--coaps-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=open(os.path.join(data, "server.log"), "w"), text=True, env=env)
    procs.append(srv)
    try:
        user = password = mqtt = http_addr = None
        for line in srv.stdout:
            line = line.strip()
            if line.startswith("user:"):
                user = line.split()[-1]
            elif line.startswith("password:"):
                password = line.split()[-1]
            elif line.startswith("m2mhub ready"):
                fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
                mqtt, http_addr = fields["mqtt"], fields["http"]
                break
        if not http_addr:
            raise SystemExit("bench_console: the server did not start (see its log)")
        # Keep reading its stdout so it can never block on a full pipe.
        threading.Thread(target=lambda: [None for _ in srv.stdout], daemon=True).start()
        base = f"http://{http_addr}/api/v1"
        token = api(base, "POST", "/auth/login", body={"username": user, "password": password})["token"]
        log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

        # One group, one device profile and one claim token per simulated profile.
        claims = {}
        for p in PROFILES:
            api(base, "POST", "/tenants/default/groups", token, {"id": p, "name": f"Simulated {p} devices"})
            api(base, "POST", "/profiles", token, {"name": p, "description": f"simulated {p}"})
            claims[p] = api(base, "POST", "/claim-tokens", token, {
                "name": f"bench {p}", "group": p, "profile": p, "max_uses": args.per_profile})["secret"]

        state_dir = os.path.join(data, "sim")
        sim_env = dict(env, RUST_LOG="warn")

        def sim(p, extra, logfile):
            cmd = ["taskset", "-c", "1", args.bin, "sim", "--profile", p, "--count", str(args.per_profile),
                   "--mqtt", mqtt, "--server", f"http://{http_addr}", "--claim-token", claims[p],
                   "--state-dir", state_dir, "--interval", args.interval, "--seed", str(args.seed), *extra]
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                    stderr=open(os.path.join(data, logfile), "w"), env=sim_env)

        # 1. The devices provision themselves (the simulator, briefly).
        t0 = time.monotonic()
        log(f"provisioning {total_devices:,} devices by claim token ({len(PROFILES)} simulators)")
        first = [sim(p, ["--duration", "2s", "--progress-secs", "0"], f"sim-{p}-provision.log") for p in PROFILES]
        procs += first
        for p, proc in zip(PROFILES, first):
            try:
                rc = proc.wait(timeout=max(1, deadline.left()))
            except subprocess.TimeoutExpired:
                raise SystemExit("bench_console: deadline reached while provisioning")
            if rc != 0:
                with open(os.path.join(data, f"sim-{p}-provision.log")) as f:
                    raise SystemExit(f"bench_console: sim {p} failed:\n{f.read()[-2000:]}")
        creds = {}
        for p in PROFILES:
            with open(os.path.join(state_dir, f"{p}.json")) as f:
                creds[p] = json.load(f)
        registered = api(base, "GET", "/devices?limit=1", token)["total"]
        log(f"{registered:,} devices registered in {time.monotonic() - t0:.0f} s")
        if registered < total_devices:
            raise SystemExit(f"bench_console: only {registered} devices registered")

        # 2. A day of history for the devices the device page will show.
        per = math.ceil(args.pages / len(PROFILES))
        page_devices = []
        for p in PROFILES:
            for i in rnd.sample(range(len(creds[p])), min(per, len(creds[p]))):
                page_devices.append((p, i, creds[p][i]))
        page_devices = page_devices[:args.pages]
        end_ms = int(time.time() * 1000)
        t0 = time.monotonic()
        log(f"backfilling {args.history_hours:g} h of history (a reading every {args.history_step} s) "
            f"for the {len(page_devices)} devices of the device page")
        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(backfill, mqtt, c["device_id"], c["token"],
                                history_batches(p, i, end_ms, args.history_hours, args.history_step, 400),
                                args.events)
                    for p, i, c in page_devices]
            for j in jobs:
                j.result(timeout=max(1, deadline.left()))
        # 30 days for some of them (the dashboard's and the 30-day charts'),
        # ending where the day above begins.
        month_devices = page_devices[:args.month_devices]
        month_end = end_ms - int(args.history_hours * 3_600_000)
        log(f"backfilling 30 days (a reading every {args.month_step} s) for {len(month_devices)} devices")
        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(backfill, mqtt, c["device_id"], c["token"],
                                history_batches(p, i, month_end, 30 * 24 - args.history_hours, args.month_step, 400),
                                0)
                    for p, i, c in month_devices]
            for j in jobs:
                j.result(timeout=max(1, deadline.left()))
        stats = api(base, "GET", "/telemetry/stats", token)
        log(f"backfilled in {time.monotonic() - t0:.0f} s: {stats['points_appended']:,} points in the store")
        flushes_before = stats["flushes"]

        # 3. The whole fleet reports.
        run_for = f"{max(60, int(deadline.left()))}s"
        fleet = [sim(p, ["--duration", run_for, "--progress-secs", "10"], f"sim-{p}.log") for p in PROFILES]
        procs += fleet
        t0 = time.monotonic()
        log(f"starting the fleet: {total_devices:,} devices, a reading every {args.interval} each")
        while True:
            deadline.check("waiting for the devices to connect")
            for p, proc in zip(PROFILES, fleet):
                if proc.poll() is not None:
                    raise SystemExit(f"bench_console: sim {p} exited ({proc.returncode})")
            conns = api(base, "GET", "/broker", token)["connections"]
            if conns >= total_devices:
                break
            time.sleep(2)
        log(f"{conns:,} MQTT connections after {time.monotonic() - t0:.0f} s")
        # Readings arrive at the expected rate, and the backfill is flushed
        # into partitions (with rollups).
        expected = total_devices / seconds(args.interval)
        settle_until = time.monotonic() + args.settle
        while True:
            deadline.check("waiting for a steady rate and a flush")
            s0, w0 = api(base, "GET", "/telemetry/stats", token), time.monotonic()
            time.sleep(5)
            s1, w1 = api(base, "GET", "/telemetry/stats", token), time.monotonic()
            rate = (s1["ingest"]["messages"] - s0["ingest"]["messages"]) / (w1 - w0)
            log(f"telemetry {rate:,.0f} msg/s (expected {expected:,.0f}), "
                f"flushes {s1['flushes']}, partitions {s1['partitions']}, series {s1['series']:,}")
            if rate >= 0.9 * expected and s1["flushes"] > flushes_before and time.monotonic() >= settle_until:
                break

        # Commands for the devices of the device page, answered by the simulator.
        t0 = time.monotonic()
        log(f"sending {args.commands} commands to each of the {len(page_devices)} devices of the device page")

        def send_commands(c):
            for k in range(args.commands):
                api(base, "POST", f"/devices/{urllib.parse.quote(c['device_id'], safe='')}/commands", token,
                    {"name": "start", "params": {"n": k}, "timeout_secs": 30})

        with ThreadPoolExecutor(4) as pool:
            for j in [pool.submit(send_commands, c) for _, _, c in page_devices]:
                j.result(timeout=max(1, deadline.left()))
        log(f"sent in {time.monotonic() - t0:.0f} s")

        # 4. Measure.
        client = Client(http_addr, token)
        ids = []
        after = ""
        while True:
            _, _, r = client.get("/devices" + query([("limit", 1000), ("after", after)]))
            ids += [d["id"] for d in r["items"]]
            if not r["next"]:
                break
            after = r["next"]
        names = {}
        for p in PROFILES:
            for i, c in enumerate(creds[p]):
                names[c["device_id"]] = f"sim {p} {i + 1}"
        some = rnd.sample(ids, min(1000, len(ids)))

        def search_term():
            kind = rnd.randrange(4)
            if kind == 0:  # a name that matches one device (the whole list is scanned)
                return names.get(rnd.choice(some), "sim")
            if kind == 1:  # a profile's word: 2,000 matches, the first 50 shown
                return rnd.choice(PROFILES)
            if kind == 2:  # the start of an id
                return rnd.choice(some)[:8]
            return "no-such-device-" + str(rnd.randrange(10_000))  # nothing: a full scan

        list_variants = {
            "first page": lambda: [("limit", 50)],
            "search": lambda: [("search", search_term()), ("limit", 50)],
            "filter: group": lambda: [("group", rnd.choice(PROFILES)), ("limit", 50)],
            "filter: profile": lambda: [("profile", rnd.choice(PROFILES)), ("limit", 50)],
            "filter: enabled=true": lambda: [("enabled", "true"), ("limit", 50)],
            "filter: enabled=false (none: all scanned)": lambda: [("enabled", "false"), ("limit", 50)],
            "filter: online=true": lambda: [("online", "true"), ("limit", 50)],
            "filter: online=false (none: all scanned)": lambda: [("online", "false"), ("limit", 50)],
            "filter: group + profile + enabled + online": lambda: [
                ("group", rnd.choice(PROFILES)), ("profile", rnd.choice(PROFILES)),
                ("enabled", "true"), ("online", "true"), ("limit", 50)],
            "late page (after one of the last 1,000 ids)": lambda: [
                ("limit", 50), ("after", ids[rnd.randrange(max(0, len(ids) - 1000), len(ids) - 1)])],
        }
        results = {("list", name): ([], []) for name in list_variants}  # -> ([server ms], [client ms])
        msgs0 = api(base, "GET", "/telemetry/stats", token)["ingest"]["messages"]
        cpu0, wall0 = cpu_seconds(srv.pid), time.monotonic()
        for _ in range(5):  # warm-up
            client.get("/devices?limit=50")
        plan = [name for name in list_variants for _ in range(args.list_reps)]
        rnd.shuffle(plan)
        log(f"measuring the device list: {len(plan):,} requests")
        for name in plan:
            deadline.check("measuring the device list")
            sms, cms, r = client.get("/devices" + query(list_variants[name]()))
            if name == "first page" and r["total"] != total_devices:
                raise SystemExit(f"bench_console: total {r['total']} devices, expected {total_devices}")
            results[("list", name)][0].append(sms)
            results[("list", name)][1].append(cms)

        log(f"measuring the device page: {len(page_devices)} devices")
        page_order = list(page_devices)
        rnd.shuffle(page_order)
        totals = ([], [])
        aggregates_per_page = []
        sources = {"raw_points": 0, "rollup_rows": 0, "n": 0}
        listed = {"events": 0, "commands": 0}
        statuses = {}

        def note(key, sms, cms, tot):
            results.setdefault(("page", key), ([], []))
            results[("page", key)][0].append(sms)
            results[("page", key)][1].append(cms)
            if tot is not None:
                tot[0] += sms
                tot[1] += cms

        for p, i, c in page_order:
            deadline.check("measuring the device page")
            enc = urllib.parse.quote(c["device_id"], safe="")
            path = "/devices/" + enc
            tot = [0.0, 0.0]
            for key, sub in [("GET /devices/{id}", ""), ("GET /devices/{id}/tokens", "/tokens"),
                             ("GET /devices/{id}/certificates", "/certificates"),
                             ("GET /devices/{id}/events?limit=20", "/events?limit=20")]:
                sms, cms, body = client.get(path + sub)
                note(key, sms, cms, tot)
                if sub.startswith("/events"):
                    listed["events"] += len(body["items"])
            sms, cms, latest = client.get(path + "/telemetry")
            note("GET /devices/{id}/telemetry", sms, cms, tot)
            numeric = sorted(m["metric"] for m in latest["items"] if m["kind"] == "float")
            aggregates_per_page.append(len(numeric))
            for m in numeric:
                sms, cms, _ = client.get(f"{path}/telemetry/{urllib.parse.quote(m, safe='')}"
                                         + query([("from", "-5m"), ("limit", 600)]))
                note("GET /devices/{id}/telemetry/{metric}?from=-5m&limit=600, each", sms, cms, tot)
            for m in numeric:
                sms, cms, agg = client.get("/telemetry/aggregate" + query([
                    ("metric", m), ("device", c["device_id"]), ("from", "-24h"), ("bucket", "15m"),
                    ("fn", "avg,min,max")]))
                note("GET /telemetry/aggregate (24 h, 15 min buckets), each", sms, cms, tot)
                buckets = len((agg["series"] or [{"buckets": []}])[0]["buckets"])
                sources["raw_points"] += agg["sources"]["raw_points"]
                sources["rollup_rows"] += agg["sources"]["rollup_rows"]
                sources["n"] += 1
                if buckets < 0.9 * args.history_hours * 4:
                    raise SystemExit(f"bench_console: {c['device_id']} {m}: only {buckets} buckets in 24 h")
            sms, cms, _ = client.get(path + "/events" + query([("kind", "connection"), ("limit", 20)]))
            note("GET /devices/{id}/events?kind=connection&limit=20", sms, cms, tot)
            sms, cms, _ = client.get("/alarms" + query([("device", c["device_id"]), ("status", "active"),
                                                        ("limit", 20)]))
            note("GET /alarms?device={id}&status=active&limit=20", sms, cms, tot)
            sms, cms, cmds = client.get(path + "/commands?limit=20")
            note("GET /devices/{id}/commands?limit=20", sms, cms, tot)
            listed["commands"] += len(cmds["items"])
            for x in cmds["items"]:
                statuses[x["status"]] = statuses.get(x["status"], 0) + 1
            sms, cms = open_stream(http_addr, token, "/live" + query([("device", c["device_id"])]))
            note("GET /live?device={id} (stream: to the headers)", sms, cms, tot)
            totals[0].append(tot[0])
            totals[1].append(tot[1])
            sms, cms, _ = client.get(path + "/series")
            note("(GET /devices/{id}/series, not in the page)", sms, cms, None)
        results[("page", "page total (sum of its requests)")] = totals

        # A dashboard of every widget kind over the month devices, loaded as
        # the console does (one request), and each month device's 30-day
        # chart as the device page draws it (2 h buckets, avg/min/max).
        truck = next(((p, i, c) for p, i, c in month_devices if p == "truck"), None)
        widgets = []
        for p, i, c in month_devices[:4]:
            m = next(iter(k for k, v in HISTORY[p].items() if v is not None))
            widgets += [
                {"type": "value", "device": c["device_id"], "metric": m},
                {"type": "gauge", "device": c["device_id"], "metric": m, "min": 0, "max": 1000},
                {"type": "chart", "device": c["device_id"], "metric": m, "range": "30d", "width": 2},
            ]
        widgets += [
            {"type": "map", "group": "truck", "width": 4},
            {"type": "alarms"},
            {"type": "devices", "group": "meter", "metrics": ["power_kw", "energy_kwh", "voltage"]},
            {"type": "group", "group": "meter", "metric": "power_kw", "fn": "avg", "range": "24h"},
            {"type": "group", "group": "factory", "metric": "temperature", "fn": "max", "range": "7d"},
        ]
        if truck:
            widgets.append({"type": "chart", "device": truck[2]["device_id"], "metric": "speed_kmh", "range": "30d"})
        board = api(base, "POST", "/dashboards", token, {"name": "bench", "layout": {"widgets": widgets}})
        log(f"measuring a dashboard of {len(widgets)} widgets ({args.dashboard_reps} loads) and 30-day charts")
        dash_key = f"GET /dashboards/{{id}}/data ({len(widgets)} widgets: 4 × 30-day chart, map of 2,000 trucks, group aggregates over 2,000 devices, …)"
        month_points = 0
        for _ in range(args.dashboard_reps):
            deadline.check("measuring the dashboard")
            sms, cms, d = client.get(f"/dashboards/{urllib.parse.quote(board['id'], safe='')}/data")
            results.setdefault(("dashboard", dash_key), ([], []))
            results[("dashboard", dash_key)][0].append(sms)
            results[("dashboard", dash_key)][1].append(cms)
            bad = [w for w in d["data"] if "error" in w]
            if bad:
                raise SystemExit(f"bench_console: dashboard widgets failed: {bad[:3]}")
        chart_key = "GET /telemetry/aggregate (30 d, 2 h buckets, avg/min/max), each"
        for _ in range(5):
            for p, i, c in month_devices:
                for m in (k for k, v in HISTORY[p].items() if v is not None):
                    sms, cms, agg = client.get("/telemetry/aggregate" + query([
                        ("metric", m), ("device", c["device_id"]), ("from", "-30d"), ("bucket", "2h"),
                        ("fn", "avg,min,max")]))
                    results.setdefault(("dashboard", chart_key), ([], []))
                    results[("dashboard", chart_key)][0].append(sms)
                    results[("dashboard", chart_key)][1].append(cms)
                    buckets = len((agg["series"] or [{"buckets": []}])[0]["buckets"])
                    if buckets < 0.9 * 360:
                        raise SystemExit(f"bench_console: {c['device_id']} {m}: only {buckets} 2 h buckets in 30 days")
                    month_points = max(month_points, agg["sources"]["rollup_rows"] + agg["sources"]["raw_points"])
        cpu1, wall1 = cpu_seconds(srv.pid), time.monotonic()
        s2 = api(base, "GET", "/telemetry/stats", token)
        conns = api(base, "GET", "/broker", token)["connections"]

        # 5. Report.
        nproc = os.cpu_count()
        model = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        print(f"\nm2mhub console API, {total_devices:,} simulated devices ({args.per_profile:,} per profile, "
              f"`m2mhub sim`), {conns:,} MQTT connections, telemetry "
              f"{(s2['ingest']['messages'] - msgs0) / (wall1 - wall0):,.0f} msg/s during the measurement, "
              f"{s2['series']:,} series, {s2['points_appended']:,} points; server on core 0 "
              f"({(cpu1 - cpu0) / (wall1 - wall0) * 100:.0f}% CPU during the measurement), "
              f"simulators and this client on core 1; {nproc} × {model}\n")
        print("| view | request | n | server p50 | p95 | p99 | max | client p50 | p95 | p99 | max |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        worst = 0.0
        for (view, name), (sv, cv) in results.items():
            cells = [f"{pct(sv, q):.2f}" for q in (50, 95, 99)] + [f"{max(sv):.2f}"]
            cells += [f"{pct(cv, q):.2f}" for q in (50, 95, 99)] + [f"{max(cv):.2f}"]
            label = {"list": "device list", "page": "device page", "dashboard": "dashboard"}[view]
            name_md = f"**{name}**" if name.startswith("page total") else name
            print(f"| {label} | {name_md} | {len(sv)} | " + " | ".join(cells) + " |")
            if view in ("list", "dashboard") or name.startswith("page total"):
                worst = max(worst, pct(sv, 99))
        print(f"\nTimes in ms. Server = the `Server-Timing: app;dur=` header (request in → response "
              f"headers out); client = request sent → body read, one keep-alive connection. "
              f"Numeric metrics charted per device page: {min(aggregates_per_page)}–{max(aggregates_per_page)} "
              f"(one raw and one aggregate request each); an aggregate read on average "
              f"{sources['rollup_rows'] / max(1, sources['n']):,.0f} rollup rows and "
              f"{sources['raw_points'] / max(1, sources['n']):,.0f} raw points. A device page listed on average "
              f"{listed['events'] / len(page_order):.1f} events and {listed['commands'] / len(page_order):.1f} commands "
              f"({', '.join(f'{n} {st}' for st, n in sorted(statuses.items()))}).")
        print(f"A 30-day chart read at most {month_points:,} rollup rows and raw points.")
        verdict = "meets" if worst < 300 else "MISSES"
        print(f"Worst p99 server time of a device-list request, a whole device page, a dashboard load or a "
              f"30-day chart: {worst:.2f} ms "
              f"({verdict} the < 300 ms bar).")
        for p in PROFILES:
            with open(os.path.join(data, f"sim-{p}.log")) as f:
                lines = [x.strip() for x in f if x.strip()]
            if lines:
                print(f"sim {p}: {lines[-1]}", file=sys.stderr)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.environ.get("BENCH_KEEP_DATA"):
            print(f"data kept in {data}", file=sys.stderr)
        else:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
