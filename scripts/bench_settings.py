#!/usr/bin/env python3
"""Demand response, measured: one fleet-wide desired setting to N connected
simulated devices, and the time until 99 % (and 100 %) of them have reported
the new value back.

Starts `m2mhub serve` on a fresh data directory (durable mode, the default),
pinned to core 0. The real simulator (`m2mhub sim --profile meter`), pinned to
core 1, provisions N devices by claim token over HTTP and connects them over
MQTT with their own tokens; each subscribes to its shadow's delta, applies a
delta and reports it back on `devices/{id}/shadow/update` (crates/sim/src/
fleet.rs). Once all N are connected, the script (also on core 1) sends
`POST /api/v1/settings {"state": {"setpoint": X}}` for the whole tenant and
polls `GET /api/v1/settings/{id}` every 50 ms until every device has
reported X (or --deadline). Repeated --rounds times with a new X each time.

Prints, per round: the time the POST took (every shadow written in one
transaction, every device's delta published), and the times from sending the
POST until 99 % and 100 % had reported. Stops every process it started.

Usage: scripts/bench_settings.py [--bin target/release/m2mhub] [--count 10000]
         [--rounds 3] [--deadline 900]
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def api(base, method, path, token=None, body=None):
    req = urllib.request.Request(base + path, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, data=data, timeout=120) as r:
        return json.loads(r.read() or b"null")


def main():
    ap = argparse.ArgumentParser()
    default_bin = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "m2mhub")
    ap.add_argument("--bin", default=default_bin)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=900)
    a = ap.parse_args()
    end = time.monotonic() + a.deadline
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_settings: terminated"))
    try:
        os.sched_setaffinity(0, {1})
    except (AttributeError, OSError):
        pass
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)
    parent = os.path.abspath("target") if os.path.isdir("target") else None
    data = tempfile.mkdtemp(prefix="m2mhub-bench-settings-", dir=parent)
    env = dict(os.environ, RUST_LOG="warn",
               M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP="0", M2MHUB_MQTT_MAX_CONNECTIONS_PER_IP="0")
    for k in ("M2MHUB_CONFIG", "M2MHUB_SERVER", "M2MHUB_TOKEN", "M2MHUB_PROFILE", "M2MHUB_CLAIM_TOKEN"):
        env.pop(k, None)
    procs = []
    srv = subprocess.Popen(
        ["taskset", "-c", "0", a.bin, "serve", "--data-dir", os.path.join(data, "server"),
         "--mqtt-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--mqtts-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0", "--coaps-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=open(os.path.join(data, "server.log"), "w"), text=True, env=env)
    procs.append(srv)
    rows = []
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
            raise SystemExit("bench_settings: the server did not start (see its log)")
        threading.Thread(target=lambda: [None for _ in srv.stdout], daemon=True).start()
        base = f"http://{http_addr}/api/v1"
        token = api(base, "POST", "/auth/login", body={"username": user, "password": password})["token"]
        claim = api(base, "POST", "/claim-tokens", token,
                    {"name": "bench settings", "max_uses": a.count})["secret"]
        sim = ["taskset", "-c", "1", a.bin, "sim", "--profile", "meter", "--count", str(a.count),
               "--mqtt", mqtt, "--server", f"http://{http_addr}", "--claim-token", claim,
               "--state-dir", os.path.join(data, "sim"), "--interval", "60s", "--progress-secs", "0"]
        log(f"provisioning {a.count:,} devices")
        p = subprocess.Popen(sim + ["--duration", "2s"], stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(data, "sim-provision.log"), "w"), env=env)
        procs.append(p)
        if p.wait(timeout=max(1, end - time.monotonic())) != 0:
            raise SystemExit("bench_settings: provisioning failed (see sim-provision.log)")
        fleet = subprocess.Popen(sim + ["--duration", f"{int(a.deadline)}s"], stdout=subprocess.DEVNULL,
                                 stderr=open(os.path.join(data, "sim.log"), "w"), env=env)
        procs.append(fleet)
        while api(base, "GET", "/broker", token)["connections"] < a.count:
            if time.monotonic() > end:
                raise SystemExit("bench_settings: the fleet did not connect in time")
            time.sleep(0.5)
        log(f"{a.count:,} devices connected; settling")
        time.sleep(5)
        for r in range(a.rounds):
            value = 18.0 + r / 2
            t0 = time.monotonic()
            s = api(base, "POST", "/settings", token, {"state": {"setpoint": value}})
            t_post = time.monotonic() - t0
            t99 = t100 = None
            prog = s["progress"]
            while time.monotonic() < end:
                prog = api(base, "GET", f"/settings/{s['id']}", token)["progress"]
                now = time.monotonic() - t0
                if t99 is None and prog["reported"] >= 0.99 * prog["targeted"]:
                    t99 = now
                if prog["reported"] >= prog["targeted"]:
                    t100 = now
                    break
                time.sleep(0.05)
            log(f"round {r + 1}: {prog['targeted']:,} targeted, POST {t_post:.2f} s, "
                f"99 % reported after {t99 if t99 is not None else float('nan'):.2f} s, "
                f"100 % after {t100 if t100 is not None else float('nan'):.2f} s")
            rows.append((prog["targeted"], t_post, t99, t100))
            time.sleep(2)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        if not os.environ.get("BENCH_KEEP_DATA"):
            shutil.rmtree(data, ignore_errors=True)
    print("| round | devices | POST /settings | 99 % reported | 100 % reported |")
    print("|---|---|---|---|---|")
    fmt = lambda v: f"{v:.2f} s" if v is not None else "not reached"
    for i, (n, tp, t99, t100) in enumerate(rows, 1):
        print(f"| {i} | {n:,} | {fmt(tp)} | {fmt(t99)} | {fmt(t100)} |")


if __name__ == "__main__":
    main()
