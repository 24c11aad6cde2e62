#!/usr/bin/env python3
"""Chaos harness for `m2mhub serve` (Python standard library only).

Parts (choose with --only; all four by default):

  kill9  Rounds of `kill -9` under a mixed load, on one data directory that is
         reopened every round. Load, from several threads: durable telemetry
         at QoS 1 (each reading carries a per-device sequence number, stamped
         ts = T0 + seq), QoS 1 messages for a persistent session that is
         offline (MQTT 5, clean start 0, session expiry 1 day), retained QoS 1
         messages over 50 topics, shadow updates (desired through
         PATCH /api/v1/devices/{id}/shadow, reported over MQTT
         devices/{id}/shadow/update, answered on …/update/accepted with the
         version), and admin API writes that are audited (POST /api/v1/devices).
         The server is killed with SIGKILL at a random moment, restarted on
         the same data directory, and the harness checks that every
         acknowledged thing is there:
           telemetry  every acknowledged reading is returned by the raw query
                      API (GET /devices/{id}/telemetry/seq), in every later
                      round too;
           queue      every message acknowledged for the offline session is
                      delivered when it reconnects (Session Present must be 1;
                      duplicates allowed, none missing);
           retained   per topic, the last acknowledged value or a newer one
                      that was sent;
           shadow     stored version >= every acknowledged version, stored
                      desired/reported values >= the last acknowledged ones;
           audit      every acknowledged device creation exists and has its
                      `device.create` record, every acknowledged PATCH of the
                      shadow its `shadow.update` record, and
                      GET /api/v1/audit/verify says the hash chain is intact.
  slow   One server, two subscribers to `slow/t` at QoS 1 that stop reading
         (an MQTT 5 persistent session with Receive Maximum 10, and an MQTT
         3.1.1 clean session, both with a 4 KiB socket receive buffer) while
         four publishers flood `slow/t` with --slow-messages QoS 1 messages of
         1 KiB; the slow subscribers then stay stuck for --slow-hold seconds
         (past mqtt.write_timeout_secs, 30 s) before they read again.
         Meanwhile another pair of clients exchanges QoS 1 and QoS 0 messages
         on other topics at --fast-rate: their latency (publish → delivery,
         and → PUBACK) before, during and after the flood, and any QoS 1 loss,
         are reported, with the server's RSS (before, peak, after), the drop
         counters of /metrics, the slow sessions (GET /api/v1/sessions/{id})
         and what each slow subscriber gets once it reads again. Fails on a
         lost QoS 1 message of the others, a p99 over --slow-p99-ms, RSS growth
         beyond what the queue limit (mqtt.max_queued_messages, 10,000) allows,
         or a server that stops serving.
  clock  The server under libfaketime (Debian package `faketime`; skipped when
         it is missing; FAKETIME_DONT_FAKE_MONOTONIC=1, so only the wall clock
         moves, as when NTP steps it), its wall clock stepped +2 h, back to +0,
         to -1 day and back to +0 while a device publishes telemetry at QoS 1
         and two rules (a filter and a 1-second tumbling window, both
         republishing) run. Checks per step: the server answers, a 1 h API
         token and a 1 h device token expire and un-expire with the clock,
         telemetry is acknowledged and queryable (`seq` kept forever, `temp`
         under a 2-day retention rule: all of it stays visible), both rules
         keep producing output, an offline persistent session (expiry 1 h)
         survives the +2 h step; at the end every acknowledged reading is
         there, the audit chain verifies, SIGTERM exits 0, no panic.
  disk   Root only: a tmpfs (--disk-mb) mounted as the data directory, with
         telemetry.min_free_mb = 8. A ballast file leaves 14 MiB free and
         telemetry is ingested until refused (PUBACK 0x97, HTTP 507); then the
         ballast fills the file system completely and queued and retained QoS 1
         messages, device creations and shadow PATCHes are tried (each answer
         recorded: a reason code or an HTTP problem; the server must keep
         serving); then the ballast is removed and telemetry, the broker and
         the API must accept writes again; finally the server is killed with
         SIGKILL, restarted, and everything acknowledged is checked as in
         kill9. The tmpfs is unmounted at the end, whatever happens.

Every part starts its own server(s) with port-0 listeners on a temporary data
directory (under ./target when it exists), with the per-address MQTT limits
lifted (M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP=0, ..._MAX_CONNECTIONS_PER_IP=0)
and the connect-flapping ban off (..._MAX_CONNECTS_PER_CLIENT_ID=0: the
harness reconnects the same client ids after every kill); other M2MHUB_*
variables of the caller's environment are not passed on. Non-device clients
log in as a password-file user (`m2mhub passwd`).

Every part is bounded (--deadline for the whole run) and stops every process
it started and unmounts what it mounted, also on errors, Ctrl-C and SIGTERM.
Exit status: 0 all checks passed, 1 something acknowledged was lost or a
check failed, 2 the harness could not run (server did not start, deadline).

Usage: scripts/chaos.py [--bin target/release/m2mhub] [--only kill9,slow,clock,disk]
         [--rounds 10] [--slow-messages 100000] [--quick] [--seed N] [--json FILE]
--quick: 3 rounds with a shorter kill window, 20,000 slow-subscriber messages
and no hold, shorter clock steps, a smaller tmpfs. The data directories (under
./target when it exists, else the system's temporary folder) are removed at the
end unless CHAOS_KEEP_DATA is set; the servers' logs are in them.
"""

import argparse
import errno
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

# ---------------------------------------------------------------------------
# Process and mount bookkeeping: everything started or mounted is undone in
# cleanup(), which runs from `finally`, atexit and the SIGTERM handler.

CHILDREN = []
MOUNTS = []
TEMP_DIRS = []
KEEP_DATA = bool(os.environ.get("CHAOS_KEEP_DATA"))


def cleanup():
    for p in list(CHILDREN):
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        CHILDREN.remove(p)
    for m in reversed(list(MOUNTS)):
        subprocess.run(["umount", m], stderr=subprocess.DEVNULL)
        if os.path.ismount(m):
            subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
        MOUNTS.remove(m)
    if not KEEP_DATA:
        for d in list(TEMP_DIRS):
            shutil.rmtree(d, ignore_errors=True)
            TEMP_DIRS.remove(d)


class HarnessError(Exception):
    """The harness could not do its job (exit 2), as opposed to a finding."""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()

    def check(self, what):
        if self.left() <= 0:
            raise HarnessError(f"deadline reached while {what}")


# ---------------------------------------------------------------------------
# A minimal MQTT 3.1.1 / 5.0 client over a plain socket.

from mqtt_wire import mqtt_str as _str, packet as _packet, varint as _varint  # noqa: E402


class MqttRefused(Exception):
    def __init__(self, code):
        super().__init__(f"CONNACK reason 0x{code:02x}")
        self.code = code


class Mqtt:
    def __init__(self, addr, client_id, user=None, password=None, v5=True, clean=True,
                 expiry=0, keepalive=60, receive_max=0, rcvbuf=0, timeout=10):
        host, port = addr.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect((host, int(port)))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.v5, self.buf, self.pos = s, v5, bytearray(), 0
        self.client_id = client_id
        flags = 0x02 if clean else 0
        payload = _str(client_id)
        if user is not None:
            flags |= 0x80
            payload += _str(user)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
        vh = _str("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack("!H", keepalive)
        if v5:
            props = b""
            if expiry:
                props += b"\x11" + struct.pack("!I", expiry)
            if receive_max:
                props += b"\x21" + struct.pack("!H", receive_max)
            vh += _varint(len(props)) + props
        s.sendall(_packet(0x10, vh + payload))
        t, _, body = self.read(timeout)
        if t != 2:
            self.close()
            raise ConnectionError(f"expected CONNACK, got packet type {t}")
        self.session_present = bool(body[0] & 1)
        if body[1] != 0:
            self.close()
            raise MqttRefused(body[1])

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def disconnect(self):
        try:
            self.sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.close()

    def _parse(self):
        buf, pos = self.buf, self.pos
        if len(buf) - pos < 2:
            return None
        n, mult, i = 0, 1, pos + 1
        while True:
            if i >= len(buf):
                return None
            b = buf[i]
            n += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        if len(buf) - i < n:
            return None
        first = buf[pos]
        body = bytes(buf[i:i + n])
        self.pos = i + n
        if self.pos == len(buf):
            self.buf, self.pos = bytearray(), 0
        elif self.pos > 1 << 20:
            del self.buf[:self.pos]
            self.pos = 0
        return first >> 4, first & 0x0F, body

    def read(self, timeout=10):
        """(type, flags, body) of the next packet; TimeoutError, or
        ConnectionError when the connection is gone (buffered packets are
        returned first)."""
        end = time.monotonic() + timeout
        while True:
            p = self._parse()
            if p:
                return p
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no packet")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(262144)
            except socket.timeout:
                raise TimeoutError("no packet") from None
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk

    def publish_bytes(self, topic, payload, qos=0, pid=0, retain=False):
        first = 0x30 | (qos << 1) | (1 if retain else 0)
        body = _str(topic) + (struct.pack("!H", pid) if qos else b"")
        if self.v5:
            body += b"\x00"
        return _packet(first, body + payload)

    def publish(self, topic, payload, qos=0, pid=0, retain=False):
        self.sock.sendall(self.publish_bytes(topic, payload, qos, pid, retain))

    def subscribe(self, pid, filters, timeout=10):
        """filters: [(filter, qos)]; returns the SUBACK codes."""
        body = struct.pack("!H", pid) + (b"\x00" if self.v5 else b"")
        for f, q in filters:
            body += _str(f) + bytes([q])
        self.sock.sendall(_packet(0x82, body))
        while True:
            t, _, b = self.read(timeout)
            if t == 9:
                rest = b[2:]
                if self.v5:
                    plen, k = _read_varint(rest, 0)
                    rest = rest[k + plen:]
                return list(rest)

    def puback(self, pid):
        self.sock.sendall(b"\x40\x02" + struct.pack("!H", pid))

    def parse_publish(self, flags, body):
        qos = (flags >> 1) & 3
        tlen = struct.unpack_from("!H", body, 0)[0]
        topic = body[2:2 + tlen].decode()
        i = 2 + tlen
        pid = None
        if qos:
            pid = struct.unpack_from("!H", body, i)[0]
            i += 2
        if self.v5:
            plen, k = _read_varint(body, i)
            i = k + plen
        return topic, body[i:], qos, pid, bool(flags & 1)


def _read_varint(b, i):
    n, mult = 0, 1
    while True:
        x = b[i]
        i += 1
        n += (x & 0x7F) * mult
        mult *= 128
        if not x & 0x80:
            return n, i


def parse_puback(body):
    pid = struct.unpack_from("!H", body, 0)[0]
    return pid, (body[2] if len(body) > 2 else 0)


def pipelined_publish(cli, make, window, on_ack, stop, limit=None, rate=None):
    """Publish QoS 1 messages with up to `window` unacknowledged, at most
    `rate` per second when given. make(pid) -> (token, packet bytes);
    on_ack(token, reason code). Returns when `stop` is set (after the
    outstanding acknowledgements, if the connection lives) or once `limit`
    messages are acknowledged; raises when the connection breaks (after every
    acknowledgement already received was handed to on_ack)."""
    inflight, pid, sent = {}, 0, 0
    start = time.monotonic()
    try:
        while True:
            while (not stop.is_set() and len(inflight) < window
                   and (limit is None or sent < limit)
                   and (rate is None or sent < rate * (time.monotonic() - start) + 1)):
                pid = pid % 65535 + 1
                while pid in inflight:
                    pid = pid % 65535 + 1
                token, pkt = make(pid)
                inflight[pid] = token
                sent += 1
                cli.sock.sendall(pkt)
            if not inflight:
                if stop.is_set() or (limit is not None and sent >= limit):
                    return sent
                time.sleep(min(0.01, 1 / rate) if rate else 0.01)
                continue
            try:
                t, _, body = cli.read(0.01 if rate else 10)
            except TimeoutError:
                if rate:
                    continue
                raise
            if t == 4:
                p, code = parse_puback(body)
                if p in inflight:
                    on_ack(inflight.pop(p), code)
            elif t == 14:
                raise ConnectionError("DISCONNECT from the server")
    except (OSError, ConnectionError):
        # The socket broke (sending or reading): hand over every PUBACK that
        # still sits in the socket buffer before giving up.
        try:
            while inflight:
                t, _, body = cli.read(2)
                if t == 4:
                    p, code = parse_puback(body)
                    if p in inflight:
                        on_ack(inflight.pop(p), code)
        except (OSError, ConnectionError, IndexError, struct.error):
            pass
        raise


# ---------------------------------------------------------------------------
# HTTP

class Api:
    """JSON API client on one keep-alive connection (reconnects when needed)."""

    def __init__(self, http_addr, token=None, timeout=30):
        host, port = http_addr.rsplit(":", 1)
        self.addr, self.token, self.timeout, self.conn = (host, int(port)), token, timeout, None
        self.relogin = None

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None

    def call(self, method, path, body=None, token=None, retry=True):
        """(status, parsed JSON or text, headers). Raises OSError when the
        server cannot be reached."""
        headers = {"Accept": "application/json"}
        tok = token or self.token
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(*self.addr, timeout=self.timeout)
            try:
                self.conn.request(method, "/api/v1" + path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt or not retry:
                    raise
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return resp.status, parsed, dict(resp.getheaders())

    def ok(self, method, path, body=None, token=None):
        st, b, _ = self.call(method, path, body, token)
        if not 200 <= st < 300:
            raise HarnessError(f"{method} {path}: HTTP {st}: {str(b)[:300]}")
        return b


def metrics(http_addr):
    host, port = http_addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            parts = line.split()
            if len(parts) >= 2:
                try:
                    out[parts[0]] = float(parts[1])
                except ValueError:
                    pass
    return out


def healthy(http_addr):
    host, port = http_addr.rsplit(":", 1)
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        c.request("GET", "/healthz")
        st = c.getresponse().status
        c.close()
        return st == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------
# The server

BASE_ENV = {
    "RUST_LOG": "warn",
    "M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP": "0",
    "M2MHUB_MQTT_MAX_CONNECTIONS_PER_IP": "0",
    "M2MHUB_MQTT_MAX_CONNECTS_PER_CLIENT_ID": "0",
}

MQTT_USER, MQTT_PASSWORD = "chaos", "chaos-harness-password"


def temp_dir(prefix):
    parent = os.path.abspath("target") if os.path.isdir("target") else None
    d = tempfile.mkdtemp(prefix=prefix, dir=parent)
    TEMP_DIRS.append(d)
    return d


class Server:
    """`m2mhub serve` on a data directory; start() may be called again after
    kill9() or stop() (a new process on the same data directory)."""

    def __init__(self, binary, workdir, data_dir=None, env=None, wrapper=None):
        self.bin, self.workdir = binary, workdir
        self.data = data_dir or os.path.join(workdir, "data")
        self.env = dict(env or {})
        self.wrapper = wrapper or []
        self.proc = None
        self.starts = 0
        self.password = None
        self.logs = []
        self.pwfile = os.path.join(workdir, "passwords")
        if not os.path.exists(self.pwfile):
            line = subprocess.run([self.bin, "passwd", MQTT_USER], input=MQTT_PASSWORD + "\n",
                                  capture_output=True, text=True, check=True).stdout.strip()
            with open(self.pwfile, "w") as f:
                f.write(line + "\n")

    def start(self, timeout=60):
        env = {k: v for k, v in os.environ.items() if not k.startswith("M2MHUB_")}
        env.update(BASE_ENV)
        env.update(self.env)
        self.starts += 1
        logpath = os.path.join(self.workdir, f"server-{self.starts}.log")
        self.logs.append(logpath)
        cmd = self.wrapper + [self.bin, "serve", "--data-dir", self.data, "--password-file", self.pwfile,
                              "--mqtt-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                              "--mqtts-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0",
                              "--coaps-listen", "127.0.0.1:0"]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(logpath, "w"),
                                     stdin=subprocess.DEVNULL, text=True, env=env)
        CHILDREN.append(self.proc)
        lines = []
        ready = threading.Event()
        result = {}

        def reader(proc=self.proc):
            for line in proc.stdout:
                line = line.strip()
                if not ready.is_set():
                    lines.append(line)
                    if line.startswith("password:"):
                        result["password"] = line.split()[-1]
                    elif line.startswith("m2mhub ready"):
                        result["fields"] = dict(w.split("=", 1) for w in line.split() if "=" in w)
                        ready.set()
            ready.set()

        threading.Thread(target=reader, daemon=True).start()
        ready.wait(timeout)
        if "fields" not in result:
            tail = self.log_tail()
            self.kill9()
            raise HarnessError(f"the server did not start (start {self.starts}); log:\n{tail}")
        if "password" in result:
            self.password = result["password"]
        f = result["fields"]
        self.mqtt, self.http = f["mqtt"], f["http"]
        self.start_secs = time.monotonic() - t0
        return self

    def log_tail(self, n=3000):
        try:
            with open(self.logs[-1], errors="replace") as f:
                return f.read()[-n:]
        except (OSError, IndexError):
            return ""

    def panics(self):
        found = []
        for p in self.logs:
            try:
                with open(p, errors="replace") as f:
                    for line in f:
                        if "panicked" in line:
                            found.append(f"{os.path.basename(p)}: {line.strip()[:300]}")
            except OSError:
                pass
        return found

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc:
            self.proc.wait()
            if self.proc in CHILDREN:
                CHILDREN.remove(self.proc)

    def stop(self, timeout=30):
        """SIGTERM; returns the exit code (None if it had to be killed)."""
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        if self.proc in CHILDREN:
            CHILDREN.remove(self.proc)
        return rc

    def rss_kb(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def api(self):
        a = Api(self.http)
        st, b, _ = a.call("POST", "/auth/login", {"username": "admin", "password": self.password})
        if st != 200:
            raise HarnessError(f"login: HTTP {st}: {b}")
        a.token = b["token"]
        return a

    def connect(self, client_id, **kw):
        return Mqtt(self.mqtt, client_id, MQTT_USER, MQTT_PASSWORD, **kw)


# ---------------------------------------------------------------------------
# Part 1: kill -9 rounds

class Worker(threading.Thread):
    """A load thread: runs fn(self) and records how it ended."""

    def __init__(self, name, fn):
        super().__init__(name=name, daemon=True)
        self.fn, self.error, self.ended = fn, None, None

    def run(self):
        try:
            self.fn(self)
        except Exception as e:  # the server was killed (expected) or a failure
            self.error = f"{type(e).__name__}: {e}"
        self.ended = time.monotonic()


class Kill9State:
    """Everything acknowledged so far (all rounds), and what was sent."""

    def __init__(self, n_tel, n_ret):
        self.t0 = (int(time.time() * 1000) // 3_600_000 - 48) * 3_600_000  # two days ago, on the hour
        self.tel_devices = [f"chaos-tel-{i}" for i in range(n_tel)]
        self.tel_secret = {}
        self.tel_next = {d: 0 for d in self.tel_devices}
        self.tel_acked = {d: set() for d in self.tel_devices}
        self.q_next = 0
        self.q_delivered = set()
        self.ret_topics = n_ret
        self.ret_next = 0
        self.ret_acked = {}  # topic index -> last acknowledged seq
        self.ret_sent = {}  # topic index -> last sent seq
        self.shadow_secret = None
        self.sh_n = 0
        self.sh_m = 0
        self.sh_version = 0
        self.sh_desired_acked = None
        self.sh_reported_acked = None
        self.sh_http_versions = set()
        self.admin_next = 0
        self.admin_acked = []


def kill9_setup(srv, api, st):
    for d in st.tel_devices + ["chaos-shadow"]:
        api.ok("POST", "/devices", {"id": d})
        secret = api.ok("POST", f"/devices/{d}/tokens", {})["secret"]
        if d == "chaos-shadow":
            st.shadow_secret = secret
        else:
            st.tel_secret[d] = secret
    # The persistent session, subscribed once and then offline.
    c = srv.connect("chaos-q-sub", clean=True, expiry=86_400)
    codes = c.subscribe(1, [("chaos/q/#", 1)])
    if codes != [1]:
        raise HarnessError(f"chaos-q-sub SUBACK {codes}")
    c.disconnect()


def kill9_round(srv, st, args, rnd, round_no, deadline):
    stop = threading.Event()
    r = {"round": round_no}
    acked = {"tel": {d: [] for d in st.tel_devices}, "q": [], "q_nosub": 0, "ret": [], "refused": {},
             "sh_http": [], "sh_mqtt": [], "admin": []}
    lock = threading.Lock()

    def refused(kind, code):
        with lock:
            key = kind if code is None else f"{kind} 0x{code:02x}"
            acked["refused"][key] = acked["refused"].get(key, 0) + 1

    def telemetry(dev):
        def run(w):
            c = Mqtt(srv.mqtt, dev, dev, st.tel_secret[dev], keepalive=60)
            topic = f"devices/{dev}/telemetry"

            def make(pid):
                seq = st.tel_next[dev]
                st.tel_next[dev] += 1
                body = json.dumps({"ts": st.t0 + seq, "seq": seq, "v": round(rnd.random(), 4)}).encode()
                return seq, c.publish_bytes(topic, body, 1, pid)

            def on_ack(seq, code):
                if code < 0x80:
                    acked["tel"][dev].append(seq)
                else:
                    refused("telemetry", code)
            pipelined_publish(c, make, args.window, on_ack, stop)
        return run

    def queue(w):
        c = srv.connect("chaos-q-pub", keepalive=60)

        def make(pid):
            seq = st.q_next
            st.q_next += 1
            return seq, c.publish_bytes("chaos/q/t", b"q%d" % seq, 1, pid)

        def on_ack(seq, code):
            if code == 0x10:  # no matching subscribers: the session's subscription is gone
                acked["q_nosub"] += 1
            if code < 0x80:
                acked["q"].append(seq)
            else:
                refused("queue", code)
        # The queue is drained every round; stay under max_queued_messages, and
        # spread the messages over the kill window so the kill lands among them.
        pipelined_publish(c, make, args.window, on_ack, stop, limit=args.queue_per_round,
                          rate=args.queue_per_round / args.kill_window[1])
        stop.wait()

    def retained(w):
        c = srv.connect("chaos-r-pub", keepalive=60)

        def make(pid):
            seq = st.ret_next
            st.ret_next += 1
            k = seq % st.ret_topics
            st.ret_sent[k] = seq
            return (k, seq), c.publish_bytes(f"chaos/ret/{k}", b"%d" % seq, 1, pid, retain=True)

        def on_ack(tok, code):
            if code < 0x80:
                acked["ret"].append(tok)
            else:
                refused("retained", code)
        pipelined_publish(c, make, 16, on_ack, stop)

    def shadow_http(w):
        a = Api(srv.http, token)
        while not stop.is_set():
            st.sh_n += 1
            n = st.sh_n
            s, b, _ = a.call("PATCH", "/devices/chaos-shadow/shadow", {"state": {"desired": {"n": n}}},
                             retry=False)
            if s == 200:
                acked["sh_http"].append((n, b["version"]))
            else:
                refused(f"shadow PATCH HTTP {s}", None)
                time.sleep(0.05)

    def shadow_mqtt(w):
        c = Mqtt(srv.mqtt, "chaos-shadow", "chaos-shadow", st.shadow_secret, keepalive=60)
        c.subscribe(1, [("devices/chaos-shadow/shadow/update/accepted", 0),
                        ("devices/chaos-shadow/shadow/update/rejected", 0)])
        pid = 0
        while not stop.is_set():
            st.sh_m += 1
            m = st.sh_m
            pid = pid % 65535 + 1
            tok = f"m{m}"
            c.publish("devices/chaos-shadow/shadow/update",
                      json.dumps({"state": {"reported": {"m": m}}, "clientToken": tok}).encode(), 1, pid)
            while True:
                t, flags, body = c.read(10)
                if t == 3:
                    topic, payload, _, _, _ = c.parse_publish(flags, body)
                    try:
                        doc = json.loads(payload)
                    except ValueError:
                        continue
                    if doc.get("clientToken") != tok:
                        continue
                    if topic.endswith("/accepted"):
                        acked["sh_mqtt"].append((m, doc["version"]))
                    else:
                        refused("shadow update rejected", doc.get("code", 0))
                    break

    def admin(w):
        a = Api(srv.http, token)
        while not stop.is_set():
            st.admin_next += 1
            dev = f"chaos-a-{st.admin_next:06d}"
            s, b, _ = a.call("POST", "/devices", {"id": dev, "labels": {"round": str(round_no)}}, retry=False)
            if s == 201:
                acked["admin"].append(dev)
            else:
                refused(f"POST /devices HTTP {s}", None)
                time.sleep(0.05)

    api = srv.api()
    token = api.token
    workers = [Worker(f"tel-{d}", telemetry(d)) for d in st.tel_devices]
    workers += [Worker("queue", queue), Worker("retained", retained), Worker("shadow-http", shadow_http),
                Worker("shadow-mqtt", shadow_mqtt), Worker("admin", admin)]
    rss_before = srv.rss_kb()
    for w in workers:
        w.start()
    delay = rnd.uniform(*args.kill_window)
    time.sleep(delay)
    premature = [(w.name, w.error) for w in workers if w.ended is not None]
    rss_at_kill = srv.rss_kb()
    srv.kill9()
    stop.set()
    for w in workers:
        w.join(timeout=30)
    stuck = [w.name for w in workers if w.is_alive()]
    r["kill_after_s"] = round(delay, 2)
    r["rss_mb_at_kill"] = round((rss_at_kill or 0) / 1024, 1)
    r["rss_mb_before"] = round((rss_before or 0) / 1024, 1)
    r["premature_worker_ends"] = premature
    r["stuck_workers"] = stuck

    # Fold this round's acknowledgements into the totals.
    for d in st.tel_devices:
        st.tel_acked[d].update(acked["tel"][d])
    q_round = set(acked["q"])
    for k, seq in acked["ret"]:
        st.ret_acked[k] = max(st.ret_acked.get(k, -1), seq)
    if acked["sh_http"]:
        st.sh_desired_acked = max(n for n, _ in acked["sh_http"])
        st.sh_http_versions.update(v for _, v in acked["sh_http"])
    if acked["sh_mqtt"]:
        st.sh_reported_acked = max(m for m, _ in acked["sh_mqtt"])
    versions = [v for _, v in acked["sh_http"]] + [v for _, v in acked["sh_mqtt"]]
    if versions:
        st.sh_version = max(st.sh_version, max(versions))
    st.admin_acked += acked["admin"]

    # Restart on the same data directory.
    deadline.check("restarting after kill -9")
    srv.start()
    r["restart_s"] = round(srv.start_secs, 2)
    api = srv.api()
    failures = []

    # Telemetry: every reading acknowledged in any round so far.
    tel_found = tel_missing = 0
    missing_examples = []
    for d in st.tel_devices:
        found = set()
        cursor = None
        while True:
            q = {"from": st.t0, "to": st.t0 + st.tel_next[d] + 1, "limit": 100000}
            if cursor:
                q["cursor"] = cursor
            page = api.ok("GET", f"/devices/{d}/telemetry/seq?" + urllib.parse.urlencode(q))
            for ts, v in page["points"]:
                if ts - st.t0 != int(v):
                    failures.append(f"telemetry {d}: point at {ts} has seq {v}")
                found.add(int(v))
            cursor = page.get("next")
            if not cursor:
                break
        missing = st.tel_acked[d] - found
        tel_found += len(found)
        tel_missing += len(missing)
        missing_examples += [f"{d}#{s}" for s in sorted(missing)[:5]]
    r["telemetry"] = {"acked_round": sum(len(v) for v in acked["tel"].values()),
                      "acked_total": sum(len(v) for v in st.tel_acked.values()),
                      "found_total": tel_found, "missing": tel_missing}
    if tel_missing:
        failures.append(f"telemetry: {tel_missing} acknowledged readings missing, e.g. {missing_examples[:10]}")

    # The persistent session's queue.
    c = srv.connect("chaos-q-sub", clean=False, expiry=86_400)
    session_present = c.session_present
    got = []
    try:
        while True:
            t, flags, body = c.read(2.0)
            if t == 3:
                _, payload, _, pid, _ = c.parse_publish(flags, body)
                got.append(int(payload[1:]))
                if pid is not None:
                    c.puback(pid)
    except TimeoutError:
        pass
    c.disconnect()
    got_set = set(got)
    q_missing = q_round - got_set
    dups = len(got) - len(got_set) + len(got_set & st.q_delivered)
    st.q_delivered |= got_set
    r["queue"] = {"acked_round": len(q_round), "delivered": len(got), "missing": len(q_missing),
                  "duplicates": dups, "session_present": session_present,
                  "acked_without_subscriber": acked["q_nosub"]}
    if not session_present:
        failures.append("queue: the persistent session was not present after the restart")
    if q_missing:
        failures.append(f"queue: {len(q_missing)} acknowledged messages not delivered, "
                        f"e.g. {sorted(q_missing)[:10]}")
    if acked["q_nosub"]:
        failures.append(f"queue: {acked['q_nosub']} messages acknowledged with 0x10 (no subscribers) "
                        f"although the persistent session is subscribed")

    # Retained messages.
    c = srv.connect("chaos-r-check", clean=True)
    c.subscribe(1, [("chaos/ret/#", 0)])
    stored = {}
    try:
        while True:
            t, flags, body = c.read(1.5)
            if t == 3:
                topic, payload, _, _, retain = c.parse_publish(flags, body)
                if retain:
                    stored[int(topic.rsplit("/", 1)[1])] = int(payload)
    except TimeoutError:
        pass
    c.disconnect()
    ret_bad = []
    for k, seq in st.ret_acked.items():
        s = stored.get(k)
        if s is None or s < seq or s > st.ret_sent.get(k, -1) or s % st.ret_topics != k:
            ret_bad.append(f"chaos/ret/{k}: acked {seq}, sent up to {st.ret_sent.get(k)}, stored {s}")
    r["retained"] = {"acked_round": len(acked["ret"]), "topics_acked": len(st.ret_acked),
                     "topics_stored": len(stored), "bad": len(ret_bad)}
    if ret_bad:
        failures.append(f"retained: {len(ret_bad)} topics lost their last acknowledged value: {ret_bad[:5]}")

    # The shadow.
    doc = api.ok("GET", "/devices/chaos-shadow/shadow")
    sv = doc["version"]
    desired = doc["state"].get("desired", {}).get("n")
    reported = doc["state"].get("reported", {}).get("m")
    r["shadow"] = {"acked_http_round": len(acked["sh_http"]), "acked_mqtt_round": len(acked["sh_mqtt"]),
                   "max_acked_version": st.sh_version, "stored_version": sv,
                   "desired_acked": st.sh_desired_acked, "desired_stored": desired,
                   "reported_acked": st.sh_reported_acked, "reported_stored": reported}
    if sv < st.sh_version:
        failures.append(f"shadow: stored version {sv} < acknowledged version {st.sh_version}")
    if st.sh_desired_acked is not None and (desired is None or desired < st.sh_desired_acked):
        failures.append(f"shadow: desired.n {desired} < acknowledged {st.sh_desired_acked}")
    if st.sh_reported_acked is not None and (reported is None or reported < st.sh_reported_acked):
        failures.append(f"shadow: reported.m {reported} < acknowledged {st.sh_reported_acked}")
    # The shadow's versions must continue from the stored one, so that the
    # next round's acknowledged versions are comparable.
    st.sh_n = max(st.sh_n, desired or 0)
    st.sh_m = max(st.sh_m, reported or 0)

    # The audit log and the devices.
    def audit_targets(action):
        items, after = [], None
        while True:
            q = {"action": action, "limit": 1000}
            if after is not None:
                q["after"] = after
            page = api.ok("GET", "/audit?" + urllib.parse.urlencode(q))
            items += page["items"]
            after = page.get("next")
            if after is None:
                return items
    created = {x["target"] for x in audit_targets("device.create") if x["outcome"] == "ok"}
    sh_audit = {x["detail"].get("version") for x in audit_targets("shadow.update")
                if x["target"] == "chaos-shadow"}
    existing = set()
    after = ""
    while True:
        q = {"search": "chaos-a-", "limit": 1000}
        if after:
            q["after"] = after
        page = api.ok("GET", "/devices?" + urllib.parse.urlencode(q))
        existing |= {d["id"] for d in page["items"]}
        after = page.get("next")
        if not after:
            break
    no_device = [d for d in st.admin_acked if d not in existing]
    no_audit = [d for d in st.admin_acked if d not in created]
    sh_no_audit = sorted(st.sh_http_versions - sh_audit)
    verify = api.ok("GET", "/audit/verify")
    r["audit"] = {"device_creates_acked_round": len(acked["admin"]),
                  "device_creates_acked_total": len(st.admin_acked),
                  "devices_missing": len(no_device), "device_create_records_missing": len(no_audit),
                  "shadow_update_records_missing": len(sh_no_audit),
                  "chain": verify.get("reason"), "chain_ok": verify.get("ok")}
    if no_device:
        failures.append(f"audit: {len(no_device)} acknowledged devices do not exist: {no_device[:5]}")
    if no_audit:
        failures.append(f"audit: {len(no_audit)} acknowledged device creations have no device.create "
                        f"record: {no_audit[:5]}")
    if sh_no_audit:
        failures.append(f"audit: {len(sh_no_audit)} acknowledged shadow PATCHes have no shadow.update "
                        f"record (versions {sh_no_audit[:5]})")
    if not verify.get("ok"):
        failures.append(f"audit: the hash chain does not verify: {verify}")
    if premature:
        failures.append(f"load threads ended before the kill: {premature}")
    if stuck:
        failures.append(f"load threads still running 30 s after the kill: {stuck}")
    r["refused"] = acked["refused"]
    r["failures"] = failures
    api.close()
    return r


def run_kill9(args, rnd, deadline, out):
    work = temp_dir("m2mhub-chaos-kill9-")
    srv = Server(args.bin, work)
    srv.start()
    st = Kill9State(args.tel_devices, 50)
    api = srv.api()
    kill9_setup(srv, api, st)
    api.close()
    rounds = []
    ok = True
    try:
        for i in range(1, args.rounds + 1):
            deadline.check(f"kill9 round {i}")
            r = kill9_round(srv, st, args, rnd, i, deadline)
            rounds.append(r)
            t, q, ret, sh, au = r["telemetry"], r["queue"], r["retained"], r["shadow"], r["audit"]
            print(f"kill9 round {i}: killed after {r['kill_after_s']} s (RSS {r['rss_mb_at_kill']} MB), "
                  f"restarted in {r['restart_s']} s\n"
                  f"  telemetry  acked {t['acked_round']} this round, {t['acked_total']} in all; "
                  f"found {t['found_total']}; missing {t['missing']}\n"
                  f"  queue      acked {q['acked_round']}; delivered after restart {q['delivered']} "
                  f"(duplicates {q['duplicates']}); missing {q['missing']}; session present "
                  f"{q['session_present']}\n"
                  f"  retained   acked {ret['acked_round']} over {ret['topics_acked']} topics; "
                  f"{ret['topics_stored']} stored; topics behind their last ack {ret['bad']}\n"
                  f"  shadow     acked {sh['acked_http_round']} PATCH + {sh['acked_mqtt_round']} MQTT "
                  f"updates; max acked version {sh['max_acked_version']}, stored {sh['stored_version']}; "
                  f"desired.n acked {sh['desired_acked']} stored {sh['desired_stored']}; reported.m "
                  f"acked {sh['reported_acked']} stored {sh['reported_stored']}\n"
                  f"  audit      {au['device_creates_acked_round']} device creations acked "
                  f"({au['device_creates_acked_total']} in all); devices missing {au['devices_missing']}, "
                  f"device.create records missing {au['device_create_records_missing']}, shadow.update "
                  f"records missing {au['shadow_update_records_missing']}; chain: {au['chain']}"
                  + (f"\n  refused    {r['refused']}" if r["refused"] else ""), flush=True)
            for f in r["failures"]:
                print(f"  LOSS/FAIL  {f}", flush=True)
            if r["failures"]:
                ok = False
        # A graceful stop at the end, and the offline audit check of the CLI.
        rc = srv.stop()
        audit = subprocess.run([args.bin, "audit", "verify", "--data-dir", srv.data],
                               capture_output=True, text=True)
        print(f"kill9: graceful stop exit code {rc}; `m2mhub audit verify --data-dir`: exit "
              f"{audit.returncode}: {(audit.stdout + audit.stderr).strip()[:300]}", flush=True)
        if rc != 0:
            ok = False
            print("  FAIL  the server did not exit 0 on SIGTERM", flush=True)
        if audit.returncode != 0:
            ok = False
        panics = srv.panics()
        if panics:
            ok = False
            print(f"  FAIL  panics in the server log: {panics[:5]}", flush=True)
    finally:
        srv.kill9()
    out["kill9"] = {"rounds": rounds, "ok": ok}
    return ok


# ---------------------------------------------------------------------------
# Part 2: a slow subscriber

def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def run_slow(args, rnd, deadline, out):
    work = temp_dir("m2mhub-chaos-slow-")
    srv = Server(args.bin, work)
    srv.start()
    ok = True
    res = {}
    try:
        api = srv.api()
        max_queued = 10000  # mqtt.max_queued_messages, the default
        payload_size = 1024
        # The two slow subscribers: they subscribe, then never read again.
        slow5 = srv.connect("slow-v5", v5=True, clean=False, expiry=3600, receive_max=10, rcvbuf=4096,
                            keepalive=0)
        slow5.subscribe(1, [("slow/t", 1)])
        slow3 = srv.connect("slow-v3", v5=False, clean=True, rcvbuf=4096, keepalive=0)
        slow3.subscribe(1, [("slow/t", 1)])
        # The other clients: a subscriber that reads, a publisher at a fixed rate.
        fast_sub = srv.connect("fast-sub", keepalive=60)
        fast_sub.subscribe(1, [("fast/q1", 1), ("fast/q0", 0)])
        fast_pub = srv.connect("fast-pub", keepalive=60)
        stop_fast, stop_pub = threading.Event(), threading.Event()
        lat = {0: [], 1: []}  # (send monotonic, latency ms)
        recv_seq = {0: set(), 1: set()}
        sent_seq = {0: 0, 1: 0}
        puback_lat = []
        pub_times = {}

        def sub_loop():
            while not stop_fast.is_set():
                try:
                    t, flags, body = fast_sub.read(0.5)
                except TimeoutError:
                    continue
                if t == 3:
                    now = time.perf_counter_ns()
                    topic, payload, qos, pid, _ = fast_sub.parse_publish(flags, body)
                    seq, ts = struct.unpack("!QQ", payload[:16])
                    q = 1 if topic == "fast/q1" else 0
                    lat[q].append((ts, (now - ts) / 1e6))
                    recv_seq[q].add(seq)
                    if pid is not None:
                        fast_sub.puback(pid)

        def pub_reader():
            while not stop_fast.is_set():
                try:
                    t, _, body = fast_pub.read(0.5)
                except TimeoutError:
                    continue
                if t == 4:
                    pid, _ = parse_puback(body)
                    t0 = pub_times.pop(pid, None)
                    if t0:
                        puback_lat.append((t0, (time.perf_counter_ns() - t0) / 1e6))

        def pub_loop():
            period = 1.0 / args.fast_rate
            nxt = time.monotonic()
            pid = 0
            while not stop_pub.is_set():
                for q in (1, 0):
                    sent_seq[q] += 1
                    now = time.perf_counter_ns()
                    body = struct.pack("!QQ", sent_seq[q], now) + b"x" * 48
                    if q:
                        pid = pid % 65535 + 1
                        pub_times[pid] = now
                    fast_pub.publish(f"fast/q{q}", body, q, pid if q else 0)
                nxt += period
                time.sleep(max(0, nxt - time.monotonic()))

        threads = [threading.Thread(target=f, daemon=True) for f in (sub_loop, pub_reader, pub_loop)]
        for t in threads:
            t.start()
        rss = []
        stop_rss = threading.Event()

        def sampler():
            while not stop_rss.is_set():
                v = srv.rss_kb()
                if v:
                    rss.append((time.perf_counter_ns(), v))
                time.sleep(0.05)

        threading.Thread(target=sampler, daemon=True).start()
        time.sleep(args.slow_idle)
        rss_before = srv.rss_kb()
        m0 = metrics(srv.http)
        # The flood.
        n_pub = 4
        per = args.slow_messages // n_pub
        flood_acks = {}
        body = b"s" * payload_size
        flood_t0 = time.perf_counter_ns()

        def flood(i):
            def run(w):
                c = srv.connect(f"flood-{i}", keepalive=60)

                def on_ack(_, code):
                    flood_acks[code] = flood_acks.get(code, 0) + 1
                pipelined_publish(c, lambda pid: (pid, c.publish_bytes("slow/t", body, 1, pid)), 64,
                                  on_ack, threading.Event(), limit=per)
                c.disconnect()
            return run

        floods = [Worker(f"flood-{i}", flood(i)) for i in range(n_pub)]
        for w in floods:
            w.start()
        for w in floods:
            w.join(timeout=max(1, deadline.left()))
        flood_t1 = time.perf_counter_ns()
        flood_secs = (flood_t1 - flood_t0) / 1e9
        flood_errors = [w.error for w in floods if w.error]
        time.sleep(2)
        rss_after_flood = srv.rss_kb()
        m1 = metrics(srv.http)
        sess = {}
        for cid in ("slow-v5", "slow-v3"):
            s, b, _ = api.call("GET", f"/sessions/{cid}")
            sess[cid] = b if s == 200 else f"HTTP {s}"
        # The slow subscribers stay stuck a while longer (past
        # mqtt.write_timeout_secs, 30 s, in the full run).
        time.sleep(max(args.slow_idle, args.slow_hold))
        for cid in ("slow-v5", "slow-v3"):
            s, b, _ = api.call("GET", f"/sessions/{cid}")
            sess[cid + " after hold"] = b if s == 200 else f"HTTP {s}"
        t_after = time.perf_counter_ns()
        stop_pub.set()
        threads[2].join(timeout=5)
        time.sleep(1)  # what is in flight arrives
        stop_fast.set()
        for t in threads:
            t.join(timeout=5)
        # The slow subscribers read again: what did the server keep for them?
        drained = {}
        for name, c in (("slow-v5", slow5), ("slow-v3", slow3)):
            quiet = 2 if args.quick else 3
            n, end = 0, f"quiet for {quiet} s"
            try:
                while True:
                    t, flags, b = c.read(quiet)
                    if t == 3:
                        _, _, _, pid, _ = c.parse_publish(flags, b)
                        n += 1
                        if pid is not None:
                            c.puback(pid)
                    elif t == 14:
                        end = "DISCONNECT from the server"
                        break
            except TimeoutError:
                pass
            except (ConnectionError, OSError) as e:
                end = f"connection closed ({e})"
            drained[name] = {"delivered_when_reading_again": n, "end": end}
            c.disconnect()
        fast_sub.disconnect()
        fast_pub.disconnect()
        time.sleep(3)
        rss_end = srv.rss_kb()
        stop_rss.set()
        m2 = metrics(srv.http)
        peak = max([v for ts, v in rss if ts >= flood_t0] or [0])
        alive = srv.alive() and healthy(srv.http)

        def phase(values, a, b):
            return [ms for ts, ms in values if a <= ts < b]

        phases = {"before": (0, flood_t0), "during flood": (flood_t0, flood_t1), "after": (flood_t1, t_after)}
        lat_table = {}
        for q, name in ((1, "QoS 1"), (0, "QoS 0")):
            for ph, (a, b) in phases.items():
                v = phase(lat[q], a, b)
                lat_table[f"{name} {ph}"] = {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99),
                                             "max": max(v) if v else float("nan")}
        for ph, (a, b) in phases.items():
            v = phase(puback_lat, a, b)
            lat_table[f"QoS 1 PUBACK {ph}"] = {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99),
                                               "max": max(v) if v else float("nan")}
        lost_q1 = sent_seq[1] - len(recv_seq[1])
        lost_q0 = sent_seq[0] - len(recv_seq[0])
        dropped = m1.get("m2mhub_mqtt_messages_dropped_queue_full_total", 0) - m0.get(
            "m2mhub_mqtt_messages_dropped_queue_full_total", 0)
        flood_mb = args.slow_messages * payload_size / 2**20
        bound_mb = 2 * max_queued * payload_size / 2**20
        growth_mb = (peak - rss_before) / 1024
        res = {"messages": args.slow_messages, "payload": payload_size, "flood_secs": round(flood_secs, 2),
               "flood_rate": round(args.slow_messages / flood_secs), "flood_acks": {f"0x{k:02x}": v for k, v in
                                                                                   flood_acks.items()},
               "flood_errors": flood_errors,
               "rss_mb": {"before": round(rss_before / 1024, 1), "peak": round(peak / 1024, 1),
                          "after_flood": round(rss_after_flood / 1024, 1), "end": round(rss_end / 1024, 1)},
               "dropped_queue_full": dropped,
               "dropped_queue_full_end": m2.get("m2mhub_mqtt_messages_dropped_queue_full_total", 0),
               "metrics_delta": {k: m1[k] - m0.get(k, 0) for k in sorted(m1)
                                 if k.startswith("m2mhub_mqtt_") and m1[k] != m0.get(k, 0)
                                 and k.endswith("_total")},
               "sessions": sess, "drained": drained, "latency_ms": lat_table,
               "fast": {"qos1_sent": sent_seq[1], "qos1_lost": lost_q1, "qos0_sent": sent_seq[0],
                        "qos0_lost": lost_q0},
               "alive": alive, "panics": srv.panics()}
        print(f"slow subscriber: {args.slow_messages:,} QoS 1 messages of {payload_size} B to slow/t "
              f"({flood_mb:.0f} MiB) from {n_pub} publishers in {flood_secs:.1f} s "
              f"({res['flood_rate']:,} msg/s), PUBACKs {res['flood_acks']}"
              + (f", publisher errors {flood_errors}" if flood_errors else ""), flush=True)
        print(f"  server RSS: before {res['rss_mb']['before']} MB, peak from the flood on {res['rss_mb']['peak']} MB "
              f"(+{growth_mb:.1f} MB), 2 s after the flood {res['rss_mb']['after_flood']} MB, "
              f"after the slow subscribers read again and left {res['rss_mb']['end']} MB; "
              f"queue bound 2 × {max_queued:,} × {payload_size} B = {bound_mb:.1f} MiB", flush=True)
        print(f"  dropped for a full queue (m2mhub_mqtt_messages_dropped_queue_full_total): {dropped:,.0f}; "
              f"other counters that moved: { {k: v for k, v in res['metrics_delta'].items() if 'drop' in k or 'timeout' in k or 'expired' in k} }",
              flush=True)
        for cid in ("slow-v5", "slow-v3"):
            s = sess[cid]
            later = sess[cid + " after hold"]
            if isinstance(later, dict):
                print(f"  {cid} {max(args.slow_idle, args.slow_hold):.0f} s later: online {later.get('online')}, "
                      f"queued {later.get('queued')}, inflight {later.get('inflight')}, dropped "
                      f"{later.get('dropped')}", flush=True)
            else:
                print(f"  {cid} {max(args.slow_idle, args.slow_hold):.0f} s later: session {later}", flush=True)
            if isinstance(s, dict):
                print(f"  {cid}: online {s.get('online')}, queued {s.get('queued')}, inflight "
                      f"{s.get('inflight')}, dropped {s.get('dropped')}; reading again: "
                      f"{drained[cid]['delivered_when_reading_again']:,} messages ({drained[cid]['end']})",
                      flush=True)
            else:
                print(f"  {cid}: session {s}; reading again: "
                      f"{drained[cid]['delivered_when_reading_again']:,} messages ({drained[cid]['end']})",
                      flush=True)
        print(f"  other clients at {args.fast_rate}/s each (fast/q1 QoS 1, fast/q0 QoS 0): QoS 1 sent "
              f"{sent_seq[1]}, lost {lost_q1}; QoS 0 sent {sent_seq[0]}, lost {lost_q0}", flush=True)
        print("  | latency (ms) | n | p50 | p99 | max |\n  |---|---|---|---|---|", flush=True)
        for k, v in lat_table.items():
            print(f"  | {k} | {v['n']} | {v['p50']:.2f} | {v['p99']:.2f} | {v['max']:.2f} |", flush=True)
        if not alive:
            ok = False
            print("  FAIL  the server is not serving any more", flush=True)
        if lost_q1:
            ok = False
            print(f"  FAIL  {lost_q1} QoS 1 messages of the other clients lost", flush=True)
        if growth_mb > max(4 * bound_mb, 0.5 * flood_mb) + 64:
            ok = False
            print(f"  FAIL  RSS grew by {growth_mb:.0f} MB: not bounded by the queue limit", flush=True)
        p99 = lat_table["QoS 1 during flood"]["p99"]
        if not p99 < args.slow_p99_ms:
            ok = False
            print(f"  FAIL  QoS 1 p99 latency of the other clients during the flood {p99:.0f} ms "
                  f">= {args.slow_p99_ms} ms", flush=True)
        if res["panics"]:
            ok = False
            print(f"  FAIL  panics: {res['panics'][:3]}", flush=True)
        api.close()
    finally:
        srv.stop()
    res["ok"] = ok
    out["slow"] = res
    return ok


# ---------------------------------------------------------------------------
# Part 3: clock jumps under libfaketime

def find_libfaketime():
    for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
              "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
              "/usr/lib/faketime/libfaketimeMT.so.1", "/usr/local/lib/faketime/libfaketimeMT.so.1"):
        if os.path.exists(p):
            return p
    try:
        files = subprocess.run(["dpkg", "-L", "libfaketime"], capture_output=True, text=True).stdout.split()
        for f in files:
            if f.endswith("libfaketimeMT.so.1"):
                return f
    except OSError:
        pass
    return None


def date_header_offset(http_addr):
    """The server's HTTP Date header minus our clock, in seconds (1 s
    resolution)."""
    import email.utils
    host, port = http_addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("GET", "/healthz")
        resp = c.getresponse()
        resp.read()
        date = resp.getheader("Date")
    finally:
        c.close()
    return email.utils.parsedate_to_datetime(date).timestamp() - time.time()


def server_clock_offset(api):
    """The server's wall clock minus ours, in seconds: from the `created_ms`
    of an API token made for the purpose (and deleted again)."""
    t0 = time.time()
    st, b, _ = api.call("POST", "/auth/tokens", {"name": "chaos-clock-probe"})
    if st == 401 and api.relogin:  # the login token expired on the server's clock
        api.token = api.relogin().token
        t0 = time.time()
        st, b, _ = api.call("POST", "/auth/tokens", {"name": "chaos-clock-probe"})
    if st != 201:
        raise HarnessError(f"POST /auth/tokens: HTTP {st}: {b}")
    t1 = time.time()
    api.call("DELETE", f"/auth/tokens/{b['token']['id']}")
    return b["token"]["created_ms"] / 1000 - (t0 + t1) / 2


def run_clock(args, rnd, deadline, out):
    lib = find_libfaketime()
    if not lib:
        print("clock: SKIPPED: libfaketime not found (Debian: apt-get install faketime)", flush=True)
        out["clock"] = {"skipped": "libfaketime not found"}
        return True
    work = temp_dir("m2mhub-chaos-clock-")
    ft = os.path.join(work, "faketime")
    with open(ft, "w") as f:
        f.write("+0\n")
    env = {"LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": ft, "FAKETIME_CACHE_DURATION": "1",
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    srv = Server(args.bin, work, env=env)
    srv.start()
    ok = True
    res = {"steps": []}
    failures = []

    def set_offset(spec, expect_s):
        # Rewritten in place: libfaketime does not see a file replaced by a rename.
        with open(ft, "w") as f:
            f.write(spec + "\n")
        end = time.monotonic() + 10
        while time.monotonic() < end:
            time.sleep(0.5)
            off = server_clock_offset(api)
            if abs(off - expect_s) < 5:
                return off
        return server_clock_offset(api)

    try:
        api = srv.api()
        api.relogin = srv.api
        off = set_offset("+2h", 7200)
        if abs(off - 7200) > 5:
            print(f"clock: SKIPPED: libfaketime does not move this binary's clock (offset {off:.0f} s)",
                  flush=True)
            out["clock"] = {"skipped": f"libfaketime has no effect (offset {off:.0f} s)"}
            return True
        set_offset("+0", 0)
        server_now = lambda: int((time.time() + server_clock_offset(api)) * 1000)
        hour = 3_600_000
        t1 = api.ok("POST", "/auth/tokens", {"name": "chaos-1h", "expires_ms": server_now() + hour})["secret"]
        for d in ("clk-pub", "clk-dev"):
            api.ok("POST", "/devices", {"id": d})
        pub_secret = api.ok("POST", "/devices/clk-pub/tokens", {})["secret"]
        dev_secret = api.ok("POST", "/devices/clk-dev/tokens", {"expires_ms": server_now() + hour})["secret"]
        api.ok("POST", "/rules", {"id": "clk-filter", "sql": "SELECT device, temp FROM 'devices/+/telemetry' "
                                                             "WHERE temp > 50",
                                  "actions": [{"type": "republish", "topic": "clk/filter/{device}", "qos": 0}]})
        api.ok("POST", "/rules", {"id": "clk-window",
                                  "sql": "SELECT device, avg(temp) AS t FROM 'devices/+/telemetry' "
                                         "GROUP BY device, TUMBLING(1s)",
                                  "actions": [{"type": "republish", "topic": "clk/window/{device}", "qos": 0}]})
        # Readings' `temp` is kept 2 days (retention is a query floor of now - 2
        # days, and whole partitions past it are dropped); `seq` forever. Every
        # reading of this run stays younger than 2 days on every step's clock.
        api.ok("PUT", "/telemetry/retention", {"rules": [{"metric": "temp", "days": 2}]})
        # An offline persistent session (expiry 1 h) with a queued message.
        c = srv.connect("clk-sess", clean=True, expiry=3600)
        c.subscribe(1, [("clk/q", 1)])
        c.disconnect()
        c = srv.connect("clk-q-pub")
        c.publish("clk/q", b"queued-before-the-jump", 1, 1)
        c.read(10)
        c.disconnect()
        # Rule outputs, counted as they arrive.
        outs = []
        stop = threading.Event()
        watcher = srv.connect("clk-watch")
        watcher.subscribe(1, [("clk/filter/#", 0), ("clk/window/#", 0)])

        def watch():
            while not stop.is_set():
                try:
                    t, flags, body = watcher.read(0.5)
                except TimeoutError:
                    continue
                except (OSError, ConnectionError):
                    return
                if t == 3:
                    topic, _, _, _, _ = watcher.parse_publish(flags, body)
                    outs.append((time.monotonic(), topic.split("/")[1]))

        acked, refused = [], []

        def publish(w):
            c = Mqtt(srv.mqtt, "clk-pub", "clk-pub", pub_secret)
            n = [0]

            def make(pid):
                n[0] += 1
                return n[0], c.publish_bytes("devices/clk-pub/telemetry",
                                             json.dumps({"temp": 60, "seq": n[0]}).encode(), 1, pid)
            pipelined_publish(c, make, 4, lambda s, code: (acked if code < 0x80 else refused).append(s),
                              stop, rate=args.clock_rate)

        wt = threading.Thread(target=watch, daemon=True)
        wt.start()
        pw = Worker("clk-pub", publish)
        pw.start()

        def count_points(metric):
            now = int(time.time() * 1000)
            found, cursor = set(), None
            while True:
                q = {"from": now - 3 * 86_400_000, "to": now + 86_400_000, "limit": 100000}
                if cursor:
                    q["cursor"] = cursor
                page = api.ok("GET", f"/devices/clk-pub/telemetry/{metric}?" + urllib.parse.urlencode(q))
                found |= {int(ts) for ts, _ in page["points"]}
                cursor = page.get("next")
                if not cursor:
                    return found

        def step(name, spec, expect_s, token_valid, device_valid, check_session=False):
            t_start = time.monotonic()
            off = set_offset(spec, expect_s)
            n0 = len(acked)
            time.sleep(args.clock_phase)
            t_end = time.monotonic()
            s = {"step": name, "offset_s": round(off), "acked": len(acked) - n0,
                 "date_header_offset_s": round(date_header_offset(srv.http))}
            s["serving"] = healthy(srv.http)
            st1, _, _ = api.call("GET", "/auth/me", token=t1)
            s["api_token_1h"] = st1
            st_login, b, _ = api.call("POST", "/auth/login", {"username": "admin", "password": srv.password})
            s["login"] = st_login
            if st_login == 200:
                api.token = b["token"]
            try:
                Mqtt(srv.mqtt, "clk-dev", "clk-dev", dev_secret).disconnect()
                s["device_token_1h"] = "accepted"
            except MqttRefused as e:
                s["device_token_1h"] = f"refused 0x{e.code:02x}"
            win = [k for ts, k in outs if t_start + 1.5 <= ts < t_end]
            stc, rule, _ = api.call("GET", "/rules/clk-window")
            cnt = (rule or {}).get("counters") or {} if stc == 200 else {}
            s["window_rule_counters"] = {k: cnt.get(k) for k in ("received", "matched", "fired", "late")}
            s["rule_outputs"] = {"filter": win.count("filter"), "window": win.count("window")}
            if check_session:
                c = srv.connect("clk-sess", clean=False, expiry=3600)
                got = []
                try:
                    while True:
                        t, flags, body = c.read(1.5)
                        if t == 3:
                            _, p, _, pid, _ = c.parse_publish(flags, body)
                            got.append(p.decode())
                            if pid:
                                c.puback(pid)
                except TimeoutError:
                    pass
                c.disconnect()
                s["session_1h_after_+2h"] = {"present": c.session_present, "queued_delivered": len(got)}
            seq_ts, temp_ts = count_points("seq"), count_points("temp")
            s["points_seq"], s["points_temp_2d"] = len(seq_ts), len(temp_ts)
            res["steps"].append(s)
            print(f"clock step {name} (server clock {s['offset_s']:+d} s, HTTP Date header "
                  f"{s['date_header_offset_s']:+d} s): serving {s['serving']}; telemetry "
                  f"acked {s['acked']}; API token (1 h) HTTP {st1}; login HTTP {st_login}; device token "
                  f"(1 h) {s['device_token_1h']}; rule outputs filter {s['rule_outputs']['filter']}, "
                  f"1 s window {s['rule_outputs']['window']} (its counters so far: "
                  f"{s['window_rule_counters']})"
                  + (f"; session (expiry 1 h) {s['session_1h_after_+2h']}" if check_session else "")
                  + f"; points visible: seq {s['points_seq']}, temp (kept 2 days) {s['points_temp_2d']}",
                  flush=True)
            if s["points_temp_2d"] < s["points_seq"]:
                failures.append(f"{name}: only {s['points_temp_2d']} of {s['points_seq']} readings' temp "
                                f"(kept 2 days, all younger) visible")
            want_token = 200 if token_valid else 401
            if not s["serving"]:
                failures.append(f"{name}: the server stopped serving")
            if st1 != want_token:
                failures.append(f"{name}: the 1 h API token answered HTTP {st1}, expected {want_token}")
            if (s["device_token_1h"] == "accepted") != device_valid:
                failures.append(f"{name}: the 1 h device token was {s['device_token_1h']}")
            if st_login != 200:
                failures.append(f"{name}: login HTTP {st_login}")
            if s["acked"] == 0:
                failures.append(f"{name}: no telemetry acknowledged")
            if s["rule_outputs"]["filter"] == 0:
                failures.append(f"{name}: the filter rule produced nothing")
            if s["rule_outputs"]["window"] == 0:
                failures.append(f"{name}: the 1 s tumbling-window rule produced nothing for "
                                f"{t_end - t_start - 1.5:.1f} s (counters {s['window_rule_counters']})")
            if check_session and not s["session_1h_after_+2h"]["present"]:
                failures.append(f"{name}: a persistent session with a 1 h expiry, offline for seconds, "
                                f"was gone after the clock stepped 2 h forward")
            return s

        step("+0 (start)", "+0", 0, True, True)
        step("+2h (forward)", "+2h", 7200, False, False, check_session=True)
        step("+0 (back 2 h)", "+0", 0, True, True)
        step("-1d (back 1 day)", "-1d", -86400, True, True)
        step("+0 (forward 1 day)", "+0", 0, True, True)
        stop.set()
        pw.join(timeout=15)
        wt.join(timeout=5)
        watcher.disconnect()
        # Everything acknowledged is queryable, wherever the clock put it.
        now = int(time.time() * 1000)
        found, cursor = set(), None
        while True:
            q = {"from": now - 3 * 86_400_000, "to": now + 86_400_000, "limit": 100000}
            if cursor:
                q["cursor"] = cursor
            page = api.ok("GET", "/devices/clk-pub/telemetry/seq?" + urllib.parse.urlencode(q))
            found |= {int(v) for _, v in page["points"]}
            cursor = page.get("next")
            if not cursor:
                break
        missing = set(acked) - found
        verify = api.ok("GET", "/audit/verify")
        res.update({"telemetry_acked": len(acked), "telemetry_refused": len(refused),
                    "telemetry_found": len(found), "telemetry_missing": len(missing),
                    "audit": verify.get("reason"), "publisher_error": pw.error})
        print(f"clock: telemetry acked {len(acked)}, refused {len(refused)}, found {len(found)}, missing "
              f"{len(missing)}; audit chain: {verify.get('reason')}"
              + (f"; publisher ended: {pw.error}" if pw.error else ""), flush=True)
        if missing:
            failures.append(f"telemetry: {len(missing)} acknowledged readings missing: {sorted(missing)[:10]}")
        if not verify.get("ok"):
            failures.append(f"audit chain: {verify}")
        if pw.error:
            failures.append(f"the telemetry publisher ended: {pw.error}")
        rc = srv.stop()
        res["exit_code"] = rc
        if rc != 0:
            failures.append(f"SIGTERM: exit code {rc}")
        panics = srv.panics()
        if panics:
            failures.append(f"panics: {panics[:3]}")
        api.close()
    finally:
        srv.kill9()
    for f in failures:
        print(f"  FAIL  {f}", flush=True)
    ok = not failures
    res["failures"] = failures
    res["ok"] = ok
    out["clock"] = res
    return ok


# ---------------------------------------------------------------------------
# Part 4: a full disk (tmpfs)

def free_bytes(path):
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def fill(path, leave_bytes):
    """Append to the ballast file until at most leave_bytes are free (0:
    until ENOSPC). Returns its size."""
    chunk = b"\0" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            want = free_bytes(os.path.dirname(path)) - leave_bytes
            if leave_bytes and want <= 0:
                break
            size = min(len(chunk), want) if leave_bytes else len(chunk)
            try:
                if os.write(fd, chunk[:size]) == 0:
                    break
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if size <= 1:
                    break
                chunk = chunk[:max(1, size // 16)]
    finally:
        os.close(fd)
    return os.path.getsize(path)


def run_disk(args, rnd, deadline, out):
    if os.geteuid() != 0:
        print("disk: SKIPPED: needs root to mount a tmpfs", flush=True)
        out["disk"] = {"skipped": "not root"}
        return True
    work = temp_dir("m2mhub-chaos-disk-")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.disk_mb}m", "tmpfs", mnt],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"disk: SKIPPED: cannot mount a tmpfs: {r.stderr.strip()}", flush=True)
        out["disk"] = {"skipped": f"mount failed: {r.stderr.strip()}"}
        return True
    MOUNTS.append(mnt)
    guard_mb = 8
    srv = Server(args.bin, work, data_dir=os.path.join(mnt, "data"),
                 env={"M2MHUB_TELEMETRY_MIN_FREE_MB": str(guard_mb)})
    failures = []
    res = {"tmpfs_mb": args.disk_mb, "min_free_mb": guard_mb}
    ballast = os.path.join(mnt, "ballast")
    try:
        srv.start()
        api = srv.api()
        api.ok("POST", "/devices", {"id": "disk-tel"})
        secret = api.ok("POST", "/devices/disk-tel/tokens", {})["secret"]
        c = srv.connect("disk-sub", clean=True, expiry=86_400)
        c.subscribe(1, [("disk/q", 1)])
        c.disconnect()
        tel = Mqtt(srv.mqtt, "disk-tel", "disk-tel", secret)
        pub = srv.connect("disk-pub")
        t0 = (int(time.time() * 1000) // 3_600_000 - 24) * 3_600_000
        seq = [0]
        tel_acked, tel_codes = set(), {}
        q_acked, q_codes, ret_acked, ret_codes = set(), {}, {}, {}
        admin_acked, admin_status = [], {}
        pid = [0]

        def next_pid():
            pid[0] = pid[0] % 65535 + 1
            return pid[0]

        def send_tel(n, window=32):
            """Publish n readings of 50 metrics each; returns the reason codes seen."""
            codes = {}

            def make(p):
                seq[0] += 1
                s = seq[0]
                body = {"ts": t0 + s, "seq": s}
                body.update({f"m{i}": rnd.random() for i in range(50)})
                return s, tel.publish_bytes("devices/disk-tel/telemetry", json.dumps(body).encode(), 1, p)

            def on_ack(s, code):
                codes[code] = codes.get(code, 0) + 1
                tel_codes[code] = tel_codes.get(code, 0) + 1
                if code < 0x80:
                    tel_acked.add(s)
            pipelined_publish(tel, make, window, on_ack, threading.Event(), limit=n)
            return codes

        def one(c, topic, payload, retain=False):
            p = next_pid()
            c.publish(topic, payload, 1, p, retain)
            while True:
                t, _, body = c.read(15)
                if t == 4 and parse_puback(body)[0] == p:
                    return parse_puback(body)[1]

        k = [0]

        def try_broker(n):
            codes = {"queued": {}, "retained": {}}
            for _ in range(n):
                k[0] += 1
                code = one(pub, "disk/q", b"q%d" % k[0])
                codes["queued"][code] = codes["queued"].get(code, 0) + 1
                q_codes[code] = q_codes.get(code, 0) + 1
                if code < 0x80:
                    q_acked.add(k[0])
                topic = k[0] % 10
                code = one(pub, f"disk/ret/{topic}", b"%d" % k[0], retain=True)
                codes["retained"][code] = codes["retained"].get(code, 0) + 1
                ret_codes[code] = ret_codes.get(code, 0) + 1
                if code < 0x80:
                    ret_acked[topic] = k[0]
            return codes

        def try_api(n):
            out = {"devices": {}, "shadow": {}}
            for _ in range(n):
                dev = f"disk-a-{len(admin_acked) + sum(admin_status.values()) + 1:05d}"
                s, b, _ = api.call("POST", "/devices", {"id": dev})
                out["devices"][s] = out["devices"].get(s, 0) + 1
                admin_status[s] = admin_status.get(s, 0) + 1
                if s == 201:
                    admin_acked.append(dev)
                elif "problem" not in str(b) and not isinstance(b, dict):
                    out.setdefault("non_problem_bodies", []).append(str(b)[:200])
                else:
                    out.setdefault("problems", set()).add(f"{s} {b.get('title')}: {str(b.get('detail'))[:150]}")
                s, b, _ = api.call("PATCH", "/devices/disk-tel/shadow", {"state": {"desired": {"k": k[0]}}})
                out["shadow"][s] = out["shadow"].get(s, 0) + 1
                if s != 200:
                    out.setdefault("problems", set()).add(f"{s} {b.get('title') if isinstance(b, dict) else b}: "
                                                          f"{str(b.get('detail') if isinstance(b, dict) else '')[:150]}")
            if "problems" in out:
                out["problems"] = sorted(out["problems"])
            return out

        # 0. Normal operation.
        c0 = send_tel(200)
        b0 = try_broker(20)
        a0 = try_api(3)
        res["normal"] = {"telemetry": c0, "broker": b0, "api": a0, "free_mb": round(free_bytes(mnt) / 2**20, 1)}
        print(f"disk: tmpfs {args.disk_mb} MiB, telemetry.min_free_mb {guard_mb}; normal: telemetry codes "
              f"{c0}, broker {b0}, api {a0['devices']}/{a0['shadow']}; free {res['normal']['free_mb']} MiB",
              flush=True)
        # 1. Little space left: telemetry until the guard refuses it.
        fill(ballast, (guard_mb + 6) << 20)
        before = free_bytes(mnt)
        refused_at = None
        t_start = time.monotonic()
        while time.monotonic() - t_start < 60:
            deadline.check("filling the disk with telemetry")
            codes = send_tel(200)
            if any(cd >= 0x80 for cd in codes):
                refused_at = seq[0]
                break
        m = metrics(srv.http)
        hs, hb, _ = Api(srv.http, secret).call("POST", "/devices/disk-tel/telemetry", {"x": 1})
        res["guard"] = {"free_mb_before": round(before / 2**20, 1), "free_mb_now": round(free_bytes(mnt) / 2**20, 1),
                        "telemetry_codes": dict(tel_codes), "refused_at_seq": refused_at,
                        "tsdb_disk_full": m.get("m2mhub_tsdb_disk_full"),
                        "telemetry_refused_total": m.get("m2mhub_telemetry_refused_messages_total"),
                        "http_telemetry": f"{hs} {hb.get('title') if isinstance(hb, dict) else hb}: "
                                          f"{hb.get('detail') if isinstance(hb, dict) else ''}"}
        print(f"disk: guard: telemetry from {res['guard']['free_mb_before']} MiB free refused at reading "
              f"{refused_at} ({res['guard']['free_mb_now']} MiB free); PUBACK codes so far "
              f"{ {f'0x{k:02x}': v for k, v in tel_codes.items()} }; m2mhub_tsdb_disk_full "
              f"{res['guard']['tsdb_disk_full']}; HTTP telemetry: {res['guard']['http_telemetry']}", flush=True)
        if refused_at is None:
            failures.append("telemetry was not refused with the disk under telemetry.min_free_mb")
        # 2. The file system completely full.
        size = fill(ballast, 0)
        b2 = try_broker(20)
        a2 = try_api(3)
        c2 = send_tel(20)
        alive2 = srv.alive() and healthy(srv.http)
        res["full"] = {"ballast_mb": round(size / 2**20, 1), "free_bytes": free_bytes(mnt), "broker": b2,
                       "api": a2, "telemetry": c2, "serving": alive2}
        print(f"disk: full ({res['full']['free_bytes']} bytes free): queued QoS 1 codes "
              f"{ {f'0x{k:02x}': v for k, v in b2['queued'].items()} }, retained codes "
              f"{ {f'0x{k:02x}': v for k, v in b2['retained'].items()} }; POST /devices {a2['devices']}, "
              f"PATCH shadow {a2['shadow']}; problems {a2.get('problems')}; telemetry "
              f"{ {f'0x{k:02x}': v for k, v in c2.items()} }; serving {alive2}", flush=True)
        if not alive2:
            failures.append("the server stopped serving with the disk full: " + srv.log_tail(1500))
        # 3. Space again.
        os.remove(ballast)
        recovered = None
        t_free = time.monotonic()
        while time.monotonic() - t_free < (10 if args.quick else 30):
            codes = send_tel(1, window=1)
            if all(cd < 0x80 for cd in codes):
                recovered = time.monotonic() - t_free
                break
            time.sleep(0.5)
        b3 = try_broker(20)
        a3 = try_api(3)
        c3 = send_tel(200)
        m = metrics(srv.http)
        res["freed"] = {"telemetry_recovered_after_s": None if recovered is None else round(recovered, 2),
                        "broker": b3, "api": a3, "telemetry": c3, "tsdb_disk_full": m.get("m2mhub_tsdb_disk_full")}
        print(f"disk: space freed: telemetry accepted again after "
              f"{'never' if recovered is None else f'{recovered:.1f} s'}; then telemetry "
              f"{ {f'0x{k:02x}': v for k, v in c3.items()} }, queued {b3['queued']}, retained "
              f"{b3['retained']}, POST /devices {a3['devices']}, PATCH shadow {a3['shadow']}; "
              f"m2mhub_tsdb_disk_full {res['freed']['tsdb_disk_full']}", flush=True)
        if recovered is None or any(cd >= 0x80 for cd in c3):
            failures.append("telemetry not accepted again after the space was freed")
        if any(cd >= 0x80 for cd in list(b3["queued"]) + list(b3["retained"])):
            failures.append(f"broker refused messages after the space was freed: {b3}")
        if set(a3["devices"]) != {201} or set(a3["shadow"]) != {200}:
            failures.append(f"API writes failed after the space was freed: {a3}")
        tel.disconnect()
        pub.disconnect()
        # 4. kill -9, restart, everything acknowledged must be there.
        srv.kill9()
        srv.start()
        api = srv.api()
        tel = Mqtt(srv.mqtt, "disk-tel", "disk-tel", secret)
        c4 = send_tel(20)
        tel.disconnect()
        res["after_restart_telemetry"] = c4
        print(f"disk: after kill -9 and restart: telemetry codes {c4}", flush=True)
        found, cursor = set(), None
        while True:
            q = {"from": t0, "to": t0 + seq[0] + 1, "limit": 100000}
            if cursor:
                q["cursor"] = cursor
            page = api.ok("GET", "/devices/disk-tel/telemetry/seq?" + urllib.parse.urlencode(q))
            found |= {int(v) for _, v in page["points"]}
            cursor = page.get("next")
            if not cursor:
                break
        tel_missing = tel_acked - found
        c = srv.connect("disk-sub", clean=False, expiry=86_400)
        got = set()
        try:
            while True:
                t, flags, body = c.read(2)
                if t == 3:
                    _, p, _, qpid, _ = c.parse_publish(flags, body)
                    got.add(int(p[1:]))
                    if qpid:
                        c.puback(qpid)
        except TimeoutError:
            pass
        c.disconnect()
        q_missing = q_acked - got
        c = srv.connect("disk-ret-check")
        c.subscribe(1, [("disk/ret/#", 0)])
        stored = {}
        try:
            while True:
                t, flags, body = c.read(1.5)
                if t == 3:
                    topic, p, _, _, _ = c.parse_publish(flags, body)
                    stored[int(topic.rsplit("/", 1)[1])] = int(p)
        except TimeoutError:
            pass
        c.disconnect()
        ret_bad = [t for t, v in ret_acked.items() if stored.get(t, -1) < v]
        devs = set()
        after = ""
        while True:
            q = {"search": "disk-a-", "limit": 1000}
            if after:
                q["after"] = after
            page = api.ok("GET", "/devices?" + urllib.parse.urlencode(q))
            devs |= {d["id"] for d in page["items"]}
            after = page.get("next")
            if not after:
                break
        audit = {x["target"] for x in api.ok("GET", "/audit?action=device.create&limit=1000")["items"]}
        dev_missing = [d for d in admin_acked if d not in devs]
        audit_missing = [d for d in admin_acked if d not in audit]
        verify = api.ok("GET", "/audit/verify")
        res["after_restart"] = {"telemetry_acked": len(tel_acked), "telemetry_found": len(found & set(range(seq[0] + 1))),
                                "telemetry_missing": len(tel_missing), "queued_acked": len(q_acked),
                                "queued_delivered": len(got), "queued_missing": len(q_missing),
                                "retained_topics_behind": ret_bad, "devices_acked": len(admin_acked),
                                "devices_missing": len(dev_missing), "audit_missing": len(audit_missing),
                                "audit_chain": verify.get("reason")}
        print(f"disk: after kill -9 and restart: telemetry acked {len(tel_acked)}, missing {len(tel_missing)}; "
              f"queued acked {len(q_acked)}, delivered {len(got)}, missing {len(q_missing)}; retained topics "
              f"behind {ret_bad}; devices acked {len(admin_acked)}, missing {len(dev_missing)}, without "
              f"audit record {len(audit_missing)}; audit chain: {verify.get('reason')}", flush=True)
        if tel_missing:
            failures.append(f"telemetry: {len(tel_missing)} acknowledged readings lost: {sorted(tel_missing)[:10]}")
        if q_missing:
            failures.append(f"queue: {len(q_missing)} acknowledged messages lost: {sorted(q_missing)[:10]}")
        if ret_bad:
            failures.append(f"retained: topics behind their last acknowledged value: {ret_bad}")
        if dev_missing or audit_missing:
            failures.append(f"devices missing {dev_missing[:5]}, audit records missing {audit_missing[:5]}")
        if not verify.get("ok"):
            failures.append(f"audit chain: {verify}")
        panics = srv.panics()
        if panics:
            failures.append(f"panics: {panics[:3]}")
        api.close()
        srv.stop()
    finally:
        srv.kill9()
        if os.path.exists(ballast):
            try:
                os.remove(ballast)
            except OSError:
                pass
        subprocess.run(["umount", mnt], stderr=subprocess.DEVNULL)
        if not os.path.ismount(mnt) and mnt in MOUNTS:
            MOUNTS.remove(mnt)
    for f in failures:
        print(f"  FAIL  {f}", flush=True)
    res["failures"] = failures
    res["ok"] = not failures
    out["disk"] = res
    return not failures


# ---------------------------------------------------------------------------

def default_bin():
    target = os.environ.get("CARGO_TARGET_DIR") or "target"
    for kind in ("release", "debug"):
        p = os.path.join(target, kind, "m2mhub")
        if os.path.exists(p):
            return p
    return "target/release/m2mhub"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=default_bin())
    ap.add_argument("--only", default="kill9,slow,clock,disk", help="comma-separated parts")
    ap.add_argument("--quick", action="store_true", help="short runs for CI")
    ap.add_argument("--rounds", type=int, help="kill -9 rounds (10; --quick 3)")
    ap.add_argument("--kill-window", help="seconds after the load starts within which the kill "
                                          "happens, MIN,MAX (1,6; --quick 0.5,2)")
    ap.add_argument("--tel-devices", type=int, default=3, help="telemetry publisher threads")
    ap.add_argument("--window", type=int, default=32, help="QoS 1 messages in flight per publisher")
    ap.add_argument("--queue-per-round", type=int, default=8000,
                    help="most messages queued for the offline session per round (the queue holds 10,000)")
    ap.add_argument("--slow-messages", type=int, help="messages to the slow subscribers (100000; --quick 20000)")
    ap.add_argument("--slow-idle", type=float, help="seconds of measurement before and after the flood")
    ap.add_argument("--slow-hold", type=float,
                    help="seconds the slow subscribers stay stuck after the flood (35: past the 30 s "
                         "write timeout; --quick 0)")
    ap.add_argument("--fast-rate", type=int, default=200, help="messages/s of the other clients, per QoS")
    ap.add_argument("--slow-p99-ms", type=float, default=250,
                    help="fail when the other clients' QoS 1 p99 latency during the flood reaches this")
    ap.add_argument("--clock-phase", type=float, help="seconds per clock step (8; --quick 3)")
    ap.add_argument("--clock-rate", type=float, default=20, help="telemetry messages/s during the clock steps")
    ap.add_argument("--disk-mb", type=int, help="tmpfs size (96; --quick 64)")
    ap.add_argument("--deadline", type=float, help="give up after this many seconds (1200; --quick 300)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    q = args.quick
    args.rounds = args.rounds or (3 if q else 10)
    args.kill_window = tuple(float(x) for x in (args.kill_window or ("0.5,2" if q else "1,6")).split(","))
    args.slow_messages = args.slow_messages or (20_000 if q else 100_000)
    args.slow_idle = args.slow_idle or (2 if q else 3)
    args.slow_hold = args.slow_hold if args.slow_hold is not None else (0 if q else 35)
    args.clock_phase = args.clock_phase or (3 if q else 8)
    args.disk_mb = args.disk_mb or (64 if q else 96)
    args.deadline = args.deadline or (300 if q else 1200)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - {"kill9", "slow", "clock", "disk"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    if not os.path.exists(args.bin):
        ap.error(f"no binary at {args.bin} (--bin)")
    args.bin = os.path.abspath(args.bin)

    def on_term(*_):
        raise SystemExit("chaos: terminated")
    signal.signal(signal.SIGTERM, on_term)
    import atexit
    atexit.register(cleanup)

    deadline = Deadline(args.deadline)

    def hard_stop():
        # The deadline checks between steps did not end the run: stop anyway.
        print("chaos: deadline passed by 120 s: stopping everything", file=sys.stderr, flush=True)
        cleanup()
        os._exit(2)
    watchdog = threading.Timer(args.deadline + 120, hard_stop)
    watchdog.daemon = True
    watchdog.start()
    out = {"seed": seed, "bin": args.bin, "args": {k: v for k, v in vars(args).items() if k != "json"}}
    log(f"chaos: {', '.join(parts)} with {args.bin} (seed {seed})")
    ok = True
    t0 = time.monotonic()
    status = 0
    try:
        for p in parts:
            tp = time.monotonic()
            log(f"--- {p}")
            part_ok = {"kill9": run_kill9, "slow": run_slow, "clock": run_clock, "disk": run_disk}[p](
                args, rnd, deadline, out)
            log(f"--- {p}: {'ok' if part_ok else 'FAILED'} in {time.monotonic() - tp:.0f} s")
            ok &= part_ok
        status = 0 if ok else 1
    except HarnessError as e:
        print(f"chaos: cannot run: {e}", file=sys.stderr, flush=True)
        status = 2
    except Exception:  # a harness bug or an answer it did not expect
        import traceback
        traceback.print_exc()
        status = 2
    finally:
        cleanup()
        out["ok"] = ok and status == 0
        out["seconds"] = round(time.monotonic() - t0, 1)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1, default=str)
    print(f"chaos: {'PASS' if status == 0 else 'FAIL' if status == 1 else 'ERROR'} "
          f"({', '.join(parts)}; seed {seed}; {time.monotonic() - t0:.0f} s)", flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
