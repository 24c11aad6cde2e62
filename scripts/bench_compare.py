#!/usr/bin/env python3
"""Side-by-side broker benchmark: m2mhub against Mosquitto (and FlashMQ), in one run.

Both brokers are pinned to core 0 (`taskset -c 0`), the load generator
(`m2mhub bench`, which speaks plain MQTT) to core 1. For each scenario the
rate is stepped up and the highest rate carried with no loss and p99 latency
under 50 ms is reported, as in PRODUCT.md. Prints a Markdown table.

With `--baseline OLD_BINARY`, an earlier m2mhub build runs in the same
session as a third broker (same pinning, same scenarios), so a change is
measured against what it replaced.

With `--flashmq BINARY`, FlashMQ runs as a further peer with one worker
thread (`thread_count 1`) on the same pinned core. FlashMQ has no package in
the registries this project installs from: build it from its source
(`cmake -DCMAKE_BUILD_TYPE=Release .. && make`) and pass the binary.

Usage: scripts/bench_compare.py [--bin target/release/m2mhub] [--baseline BIN] [--flashmq BIN] [--quick]
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
    # A pause first: a broker still draining the previous run's backlog
    # would be measured on two runs at once.
    time.sleep(2)
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
    ap.add_argument("--baseline", help="an earlier m2mhub binary to measure in the same run")
    ap.add_argument("--flashmq", help="a FlashMQ binary to measure in the same run")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the idle-memory row")
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
                 "--mqtts-listen", "127.0.0.1:18933", "--https-listen", "127.0.0.1:18934", "--coaps-listen", "127.0.0.1:18935"], env=env)
    procs = [mosq, hub]
    brokers = [("Mosquitto", 18931, mosq.pid), ("m2mhub", 18932, hub.pid)]
    if a.baseline:
        base = start(["taskset", "-c", "0", os.path.abspath(a.baseline), "serve", "--data-dir",
                      os.path.join(work, "data-base"), "--allow-anonymous", "--mqtt-listen",
                      "127.0.0.1:18942", "--http-listen", "127.0.0.1:18992", "--mqtts-listen",
                      "127.0.0.1:18943"], env=env)
        procs.append(base)
        brokers.append(("m2mhub (baseline)", 18942, base.pid))
    if a.flashmq:
        fconf = os.path.join(work, "flashmq.conf")
        with open(fconf, "w") as f:
            f.write("thread_count 1\nallow_anonymous true\nlog_level error\nrlimit_nofile 40000\n"
                    f"log_file {os.path.join(work, 'flashmq.log')}\n"
                    "listen {\n  protocol mqtt\n  inet_protocol ip4\n  inet4_bind_address 127.0.0.1\n"
                    "  port 18951\n}\n")
        fmq = start(["taskset", "-c", "0", os.path.abspath(a.flashmq), "--config-file", fconf])
        procs.append(fmq)
        brokers.append(("FlashMQ", 18951, fmq.pid))
    time.sleep(1.5)
    rows = []
    try:
        # Memory first, on fresh brokers: later runs grow their heaps.
        res = {}
        for name, port, pid in ([] if a.skip_memory else brokers):
            r = bench(binary, port, 6, "--scenario", "idle", "--connections", 19000, "--broker-pid", pid)
            res[name] = r
            print(f"  idle {name}: {r.get('bytes_per_connection')}", file=sys.stderr)
        if not a.skip_memory:
            rows.append(("memory per idle connection (19,000 connections)", res))

        q0 = [100_000, 200_000, 250_000, 300_000, 350_000, 400_000, 500_000, 650_000, 800_000, 1_000_000, 1_200_000, 1_400_000, 1_600_000, 1_800_000, 2_000_000]
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

        # Publish rates per fan-out width (deliveries = rate x subscribers).
        fan_ladders = [(100, "100", [1000, 2000, 3000, 4000, 5000, 6000, 8000, 10000, 12000, 15000, 18000, 21000]),
                       (1000, "1,000", [50, 100, 150, 200, 300, 400, 500, 600, 800])]
        for subs, label, rates in fan_ladders:
            res = {}
            for name, port, _ in brokers:
                print(f"fan-out QoS 0 1 → {label}, {name}", file=sys.stderr)
                res[name] = ladder(binary, port, dur, rates, "--scenario", "fan-out", "--publishers", 1,
                                   "--subscribers", subs, "--qos", 0)
            rows.append((f"QoS 0 fan-out, 1 → {label}, max deliveries/s with no loss and p99 < 50 ms", res))

        # "Saturation" is what Mosquitto delivers unpaced.
        sat = next(r for t, r in rows if "unpaced (saturation" in t)["Mosquitto"]
        half = int((sat["received_per_sec"] if sat and "error" not in sat else 200_000) / 2)
        res = {}
        for name, port, _ in brokers:
            res[name] = bench(binary, port, 10, "--scenario", "fan-in", "--publishers", 10, "--qos", 0, "--rate", half)
            print(f"  half rate {half} {name}: {summary(res[name])}", file=sys.stderr)
        rows.append((f"latency at half of Mosquitto's QoS 0 fan-in rate ({half:,} msg/s)", res))

    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=15)
        shutil.rmtree(work, ignore_errors=True)

    names = [n for n, _, _ in brokers]
    print("| scenario | " + " | ".join(names) + " | m2mhub ÷ Mosquitto |" + (" m2mhub ÷ baseline |" if a.baseline else "")
          + (" m2mhub ÷ FlashMQ |" if a.flashmq else ""))
    print("|---" * (len(names) + 2 + (1 if a.baseline else 0) + (1 if a.flashmq else 0)) + "|")

    def cell(title, r):
        if r is None:
            return "none carried"
        if "memory" in title:
            v = r.get("bytes_per_connection")
            return f"{v:,.0f} B" if v else "-"
        if "error" in r:
            return r["error"]
        if "latency" in title:
            return f"p50 {r['latency_p50_us']/1000:.2f} ms, p99 {r['latency_p99_us']/1000:.2f} ms"
        return f"{r['received_per_sec']:,.0f}/s ({summary(r)})"

    def value(title, r):
        if r is None or "error" in r:
            return 0
        if "memory" in title:
            return r.get("bytes_per_connection") or 0
        if "latency" in title:
            return r["latency_p99_us"]
        return r["received_per_sec"]

    def ratio(x, y):
        return f"{x / y:.2f}×" if x and y else "-"

    for title, res in rows:
        cells = [cell(title, res.get(n)) for n in names]
        hub_v = value(title, res.get("m2mhub"))
        line = f"| {title} | " + " | ".join(cells) + f" | {ratio(hub_v, value(title, res.get('Mosquitto')))} |"
        if a.baseline:
            line += f" {ratio(hub_v, value(title, res.get('m2mhub (baseline)')))} |"
        if a.flashmq:
            line += f" {ratio(hub_v, value(title, res.get('FlashMQ')))} |"
        print(line)

if __name__ == "__main__":
    main()
