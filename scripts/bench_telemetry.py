#!/usr/bin/env python3
"""End-to-end benchmarks through a real server: telemetry (MQTT publishers ->
stored points) and rules (a device's PUBLISH -> the rule's command at the device).

Starts `m2mhub serve` on a fresh data directory (durable mode, the default),
pinned to core 0, registers N devices through the API, and runs the load
generator (`m2mhub bench --scenario telemetry`) pinned to core 1: each device
publishes JSON readings of 10 metrics on devices/<id>/telemetry. The server's
`m2mhub_tsdb_points_appended_total` is read at the edges of the measured
window, so "stored" means written to the WAL and fsynced (durable mode)
before the device got its PUBACK.

Usage: scripts/bench_telemetry.py [--bin target/release/m2mhub]
         [--devices 100] [--rates 10000,20000,30000,40000] [--qos 1] [--mode durable|fast]
       scripts/bench_telemetry.py --commands [--rates 10000]
With --commands a rule `WHERE temperature > 85` sends a `cool_down` command
each time a device turns hot; devices alternate cold and hot readings, so
half the messages trigger a command, and the load generator measures the
time from the hot PUBLISH to the command's arrival.
       scripts/bench_telemetry.py --shadow [--rates 0,1000] [--inflight 4]
With --shadow every device publishes shadow updates (reported state, no
version) on devices/<id>/shadow/update and the load generator times each to
its …/update/accepted (`m2mhub bench --scenario shadow`); rate 0 is unpaced:
each device keeps --inflight updates unanswered.
Prints one line per rate and a Markdown table.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
    with urllib.request.urlopen(req, data=data, timeout=30) as r:
        return json.loads(r.read() or b"null")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/m2mhub")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--rates", default="10000,20000,30000,40000")
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--mode", default="durable", choices=["durable", "fast"])
    ap.add_argument("--commands", action="store_true")
    ap.add_argument("--hot-every", type=int, default=2)
    # Device shadows: every device publishes reported state on its
    # devices/<id>/shadow/update (no version) and times each update to its
    # …/update/accepted; --rates 0 is unpaced (closed loop, --inflight each).
    ap.add_argument("--shadow", action="store_true")
    ap.add_argument("--inflight", type=int, default=64)
    args = ap.parse_args()

    data = tempfile.mkdtemp(prefix="m2mhub-bench-telemetry-", dir=os.path.abspath("target"))
    # All devices connect from 127.0.0.1: lift the per-IP defences.
    env = dict(os.environ, M2MHUB_TELEMETRY_MODE=args.mode, RUST_LOG="warn",
               M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP="0", M2MHUB_MQTT_MAX_CONNECTIONS_PER_IP="0")
    env.pop("M2MHUB_CONFIG", None)
    srv = subprocess.Popen(
        ["taskset", "-c", "0", args.bin, "serve", "--data-dir", data,
         "--mqtt-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
         "--mqtts-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0", "--coaps-listen", "127.0.0.1:0", "--allow-anonymous"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    user = password = None
    mqtt = http = None
    for line in srv.stdout:
        line = line.strip()
        if line.startswith("user:"):
            user = line.split()[-1]
        elif line.startswith("password:"):
            password = line.split()[-1]
        elif line.startswith("m2mhub ready"):
            fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
            mqtt, http = fields["mqtt"], fields["http"]
            break
    try:
        base = f"http://{http}/api/v1"
        token = api(base, "POST", "/auth/login", body={"username": user, "password": password})["token"]
        for i in range(args.devices):
            api(base, "POST", "/devices", token, {"id": f"bench-dev-{i}"})
        if args.commands:
            api(base, "POST", "/rules", token, {
                "id": "hot", "sql": "SELECT device, temperature FROM 'devices/+/telemetry' WHERE temperature > 85",
                "actions": [{"type": "command", "name": "cool_down", "params": {"target": 60}}]})
        rows = []
        for rate in [int(r) for r in args.rates.split(",")]:
            scenario = "shadow" if args.shadow else "command-latency" if args.commands else "telemetry"
            extra = ["--hot-every", str(args.hot_every)] if args.commands else []
            cmd = ["taskset", "-c", "1", args.bin, "bench", "--scenario", scenario,
                   "--host", mqtt, "--publishers", str(args.devices), "--qos", str(args.qos),
                   "--rate", str(rate), "--duration", str(args.duration), "--warmup", "2",
                   "--inflight", str(args.inflight), "--metrics-url", f"http://{http}/metrics", "--json", *extra]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 120)
            if out.returncode != 0:
                print(f"rate {rate}: {out.stderr.strip()}", file=sys.stderr)
                break
            r = json.loads(out.stdout)
            if args.shadow:
                print(f"rate {rate or 'unpaced'}: sent {r['sent_per_sec']:,.0f} updates/s, accepted "
                      f"{r['received_per_sec']:,.0f}/s, p50 {r['latency_p50_us'] / 1000:.2f} ms, "
                      f"p99 {r['latency_p99_us'] / 1000:.2f} ms, rejected {r['rejected']}, lost {r['lost']}",
                      file=sys.stderr)
                rows.append((rate, r))
                continue
            line = f"rate {rate} msg/s: sent {r['sent_per_sec']:,.0f} msg/s, stored {r['points_per_sec']:,.0f} points/s"
            if args.commands:
                line += (f", {r['commands']:,} commands, latency p50 {r['command_p50_us'] / 1000:.2f} ms, "
                         f"p99 {r['command_p99_us'] / 1000:.2f} ms, max {r['command_max_us'] / 1000:.2f} ms")
            print(line, file=sys.stderr)
            rows.append((rate, r))
        if args.shadow:
            print(f"\nm2mhub shadow updates over MQTT, {args.devices} devices, QoS {args.qos}, "
                  f"{args.inflight} unanswered per device at most, server on core 0, load generator on core 1\n")
            print("| offered updates/s | sent/s | accepted/s | p50 | p99 | max | rejected | lost |")
            print("|---|---|---|---|---|---|---|---|")
            for rate, r in rows:
                print(f"| {f'{rate:,}' if rate else 'unpaced'} | {r['sent_per_sec']:,.0f} | "
                      f"{r['received_per_sec']:,.0f} | {r['latency_p50_us'] / 1000:.2f} ms | "
                      f"{r['latency_p99_us'] / 1000:.2f} ms | {r['latency_max_us'] / 1000:.2f} ms | "
                      f"{r['rejected']} | {r['lost']} |")
            return
        stats = api(base, "GET", "/telemetry/stats", token)
        print(f"\nm2mhub {args.mode} mode, {args.devices} devices, QoS {args.qos}, 10 metrics/message, "
              f"server on core 0, load generator on core 1\n")
        if args.commands:
            print("| offered msg/s | sent msg/s | commands | PUBLISH → command p50 | p99 | max |")
            print("|---|---|---|---|---|---|")
            for rate, r in rows:
                print(f"| {rate:,} | {r['sent_per_sec']:,.0f} | {r['commands']:,} | "
                      f"{r['command_p50_us'] / 1000:.2f} ms | {r['command_p99_us'] / 1000:.2f} ms | "
                      f"{r['command_max_us'] / 1000:.2f} ms |")
        else:
            print("| offered msg/s | sent msg/s | stored points/s |")
            print("|---|---|---|")
            for rate, r in rows:
                print(f"| {rate:,} | {r['sent_per_sec']:,.0f} | {r['points_per_sec']:,.0f} |")
        print(f"\nstore: {stats['series']} series, {stats['points_appended']:,} points, "
              f"{stats['wal_commits']:,} WAL commits, ingest {stats['ingest']}")
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=20)
        except subprocess.TimeoutExpired:
            srv.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
