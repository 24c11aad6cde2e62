#!/usr/bin/env python3
"""Side-by-side broker benchmark: m2mhub against Mosquitto, in one run.

Both brokers are pinned to core 0 (`taskset -c 0`), the load generator
(`m2mhub bench`, which speaks plain MQTT) to core 1. For each scenario the
rate is stepped up and the highest rate carried with no loss and p99 latency
under 50 ms is reported, as in PRODUCT.md. Prints a Markdown table.

Usage: scripts/bench_compare.py [--bin target/release/m2mhub] [--quick]
Needs: mosquitto (Debian package), taskset (util-linux), ulimit -n >= 20000.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

P99_LIMIT_US = 50_000


def start(cmd, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **kw)


def bench(binary, port, duration, *args):
    cmd = ["taskset", "-c", "1", binary, "bench", "--host", f"127.0.0.1:{port}",
           "--duration", str(duration), "--warmup", "1", "--json", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    if out.returncode != 0:
        return {"error": out.stderr.strip()}
    return json.loads(out.stdout)


def ok(r):
    return "error" not in r and r["lost"] == 0 and r["latency_p99_us"] < P99_LIMIT_US


def ladder(binary, port, duration, rates, *args):
    """Highest rate in `rates` that is carried; stops at the first failure."""
    best = None
    for rate in rates:
        r = bench(binary, port, duration, *args, "--rate", rate)
        print(f"  port {port} rate {rate}: {summary(r)}", file=sys.stderr)
        if not ok(r):
            break
        best = r
    return best


def summary(r):
    if r is None:
        return "none carried"
    if "error" in r:
        return r["error"]
    return (f"{r['received_per_sec']:,.0f} deliveries/s, lost {r['lost']}, "
            f"p50 {r['latency_p50_us']/1000:.2f} ms, p99 {r['latency_p99_us']/1000:.2f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/m2mhub")
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    dur = 3 if a.quick else 5
    work = tempfile.mkdtemp()
    conf = os.path.join(work, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write("listener 18931 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                "max_inflight_messages 0\npersistence false\nlog_type error\n")
    mosq = start(["taskset", "-c", "0", "mosquitto", "-c", conf])
    # All load comes from one address: lift the per-IP defences for the run.
    env = dict(os.environ, M2MHUB_MQTT_MAX_CONNECTIONS_PER_IP="0", M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP="0",
               M2MHUB_MQTT_MAX_CONNECTS_PER_CLIENT_ID="0")
    hub = start(["taskset", "-c", "0", binary, "serve", "--data-dir", os.path.join(work, "data"),
                 "--allow-anonymous", "--mqtt-listen", "127.0.0.1:18932", "--http-listen", "127.0.0.1:18982",
                 "--mqtts-listen", "127.0.0.1:18933"], env=env)
    time.sleep(1.5)
    brokers = [("Mosquitto", 18931, mosq.pid), ("m2mhub", 18932, hub.pid)]
    rows = []
    try:
        # Memory first, on fresh brokers: later runs grow their heaps.
        res = {}
        for name, port, pid in brokers:
            r = bench(binary, port, 6, "--scenario", "idle", "--connections", 19000, "--broker-pid", pid)
            res[name] = r
            print(f"  idle {name}: {r.get('bytes_per_connection')}", file=sys.stderr)
        rows.append(("memory per idle connection (19,000 connections)", res))

        q0 = [100_000, 200_000, 250_000, 300_000, 350_000, 400_000, 500_000, 650_000, 800_000, 1_000_000, 1_200_000, 1_400_000, 1_600_000]
        res = {}
        for name, port, _ in brokers:
            print(f"fan-in QoS 0, {name}", file=sys.stderr)
            res[name] = ladder(binary, port, dur, q0, "--scenario", "fan-in", "--publishers", 10, "--qos", 0)
        rows.append(("QoS 0 fan-in, 10 → 1, max rate with no loss and p99 < 50 ms", res))

        res = {}
        for name, port, _ in brokers:
            res[name] = bench(binary, port, dur, "--scenario", "fan-in", "--publishers", 10, "--qos", 0)
            print(f"  QoS 0 unpaced {name}: {summary(res[name])}", file=sys.stderr)
        rows.append(("QoS 0 fan-in, 10 → 1, unpaced (saturation: delivered/s, with loss and delay)", res))

        res = {}
        for name, port, _ in brokers:
            print(f"fan-in QoS 1 (unpaced, window 64), {name}", file=sys.stderr)
            res[name] = bench(binary, port, dur, "--scenario", "fan-in", "--publishers", 10, "--qos", 1)
            print(f"  {summary(res[name])}", file=sys.stderr)
        rows.append(("QoS 1 fan-in, 10 → 1, unpaced (in-flight window 64)", res))

        fan = [50, 100, 150, 200, 300, 400, 500, 600, 800]
        res = {}
        for name, port, _ in brokers:
            print(f"fan-out QoS 0 1 → 1000, {name}", file=sys.stderr)
            res[name] = ladder(binary, port, dur, fan, "--scenario", "fan-out", "--publishers", 1,
                               "--subscribers", 1000, "--qos", 0)
        rows.append(("QoS 0 fan-out, 1 → 1,000, max deliveries/s with no loss and p99 < 50 ms", res))

        # "Saturation" is what Mosquitto delivers unpaced.
        sat = next(r for t, r in rows if "unpaced (saturation" in t)["Mosquitto"]
        half = int((sat["received_per_sec"] if sat and "error" not in sat else 200_000) / 2)
        res = {}
        for name, port, _ in brokers:
            res[name] = bench(binary, port, 10, "--scenario", "fan-in", "--publishers", 10, "--qos", 0, "--rate", half)
            print(f"  half rate {half} {name}: {summary(res[name])}", file=sys.stderr)
        rows.append((f"latency at half of Mosquitto's QoS 0 fan-in rate ({half:,} msg/s)", res))

    finally:
        for p in (mosq, hub):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=15)
        shutil.rmtree(work, ignore_errors=True)

    print("| scenario | Mosquitto | m2mhub | ratio |")
    print("|---|---|---|---|")
    for title, res in rows:
        m, h = res.get("Mosquitto"), res.get("m2mhub")
        if "memory" in title:
            mv = m and m.get("bytes_per_connection")
            hv = h and h.get("bytes_per_connection")
            ratio = f"{hv / mv:.2f}× the bytes" if mv and hv else "-"
            print(f"| {title} | {mv:,.0f} B | {hv:,.0f} B | {ratio} |")
        elif "latency" in title:
            print(f"| {title} | p50 {m['latency_p50_us']/1000:.2f} ms, p99 {m['latency_p99_us']/1000:.2f} ms "
                  f"| p50 {h['latency_p50_us']/1000:.2f} ms, p99 {h['latency_p99_us']/1000:.2f} ms "
                  f"| p99 {h['latency_p99_us']/max(m['latency_p99_us'],1):.2f}× |")
        else:
            mv = m["received_per_sec"] if m and "error" not in m else 0
            hv = h["received_per_sec"] if h and "error" not in h else 0
            ratio = f"{hv / mv:.1f}×" if mv else "-"
            print(f"| {title} | {mv:,.0f}/s ({summary(m)}) | {hv:,.0f}/s ({summary(h)}) | {ratio} |")


if __name__ == "__main__":
    main()
