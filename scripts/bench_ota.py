#!/usr/bin/env python3
"""OTA at fleet scale, measured: N connected simulated devices (default
1,000) all told at once to download one image (default 1 MiB) over HTTP,
verify its SHA-256 and Ed25519 signature, install, reboot and report.

Starts `m2mhub serve` on a fresh data directory, pinned to core 0. The real
simulator (`m2mhub sim --profile meter`, core 1) provisions N devices by
claim token and connects them; the script (core 1) uploads a random image,
starts one campaign of one wave for the whole tenant with no start limit,
and polls the campaign every 100 ms while sampling the server's resident
memory (VmRSS from /proc) every 50 ms.

Prints: the server's RSS before the campaign and its peak during it, the
time from the POST until every device had the image (no job left in
`notified`/`downloading`) and until every device had reported `succeeded`,
and the download throughput (N x image size / download time). Stops every
process it started.

Usage: scripts/bench_ota.py [--bin target/release/m2mhub] [--count 1000]
         [--size-mib 1] [--rounds 2] [--deadline 600]
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


def api(base, method, path, token=None, body=None, raw=None):
    req = urllib.request.Request(base + path, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    elif raw is not None:
        data = raw
        req.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(req, data=data, timeout=300) as r:
        return json.loads(r.read() or b"null")


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    ap = argparse.ArgumentParser()
    default_bin = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "m2mhub")
    ap.add_argument("--bin", default=default_bin)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--size-mib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=600)
    a = ap.parse_args()
    end = time.monotonic() + a.deadline
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_ota: terminated"))
    try:
        os.sched_setaffinity(0, {1})
    except (AttributeError, OSError):
        pass
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)
    parent = os.path.abspath("target") if os.path.isdir("target") else None
    data = tempfile.mkdtemp(prefix="m2mhub-bench-ota-", dir=parent)
    env = dict(os.environ, RUST_LOG="warn",
               M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP="0", M2MHUB_MQTT_MAX_CONNECTIONS_PER_IP="0",
               M2MHUB_MQTT_MAX_CONNECTS_PER_CLIENT_ID="0")
    for k in ("M2MHUB_CONFIG", "M2MHUB_SERVER", "M2MHUB_TOKEN", "M2MHUB_PROFILE", "M2MHUB_CLAIM_TOKEN"):
        env.pop(k, None)
    procs = []
    srv = subprocess.Popen(
        ["taskset", "-c", "0", a.bin, "serve", "--data-dir", os.path.join(data, "server"),
         "--mqtt-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--mqtts-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0", "--coaps-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=open(os.path.join(data, "server.log"), "w"), text=True, env=env)
    procs.append(srv)
    rows = []
    size = int(a.size_mib * (1 << 20))
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
            raise SystemExit("bench_ota: the server did not start (see its log)")
        threading.Thread(target=lambda: [None for _ in srv.stdout], daemon=True).start()
        base = f"http://{http_addr}/api/v1"
        token = api(base, "POST", "/auth/login", body={"username": user, "password": password})["token"]
        claim = api(base, "POST", "/claim-tokens", token,
                    {"name": "bench ota", "max_uses": a.count})["secret"]
        sim = ["taskset", "-c", "1", a.bin, "sim", "--profile", "meter", "--count", str(a.count),
               "--mqtt", mqtt, "--server", f"http://{http_addr}", "--claim-token", claim,
               "--state-dir", os.path.join(data, "sim"), "--interval", "600s", "--progress-secs", "0",
               "--ota-interrupt-rate", "0"]
        log(f"provisioning {a.count:,} devices")
        p = subprocess.Popen(sim + ["--duration", "2s"], stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(data, "sim-provision.log"), "w"), env=env)
        procs.append(p)
        if p.wait(timeout=max(1, end - time.monotonic())) != 0:
            raise SystemExit("bench_ota: provisioning failed (see sim-provision.log)")
        fleet = subprocess.Popen(sim + ["--duration", f"{int(a.deadline)}s"], stdout=subprocess.DEVNULL,
                                 stderr=open(os.path.join(data, "sim.log"), "w"), env=env)
        procs.append(fleet)
        while api(base, "GET", "/broker", token)["connections"] < a.count:
            if time.monotonic() > end:
                raise SystemExit("bench_ota: the fleet did not connect in time")
            time.sleep(0.5)
        log(f"{a.count:,} devices connected; settling")
        time.sleep(5)
        for r in range(a.rounds):
            image = os.urandom(size)
            art = api(base, "POST", f"/ota/artifacts?name=bench-fw&version=1.{r + 1}", token, raw=image)
            before = rss_kib(srv.pid)
            peak = [before]
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_kib(srv.pid))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.monotonic()
            c = api(base, "POST", "/ota/campaigns", token, {"artifact": art["id"]})
            t_downloaded = t_done = None
            jobs = c["jobs"]
            while time.monotonic() < end:
                jobs = api(base, "GET", f"/ota/campaigns/{c['id']}", token)["jobs"]
                now = time.monotonic() - t0
                over = jobs["succeeded"] + jobs["failed"] + jobs["rejected"]
                fetching = jobs["pending"] + jobs["queued"] + jobs["notified"] + jobs["downloading"]
                if t_downloaded is None and fetching == 0:
                    t_downloaded = now
                if over >= c["targets"]:
                    t_done = now
                    break
                time.sleep(0.1)
            stop.set()
            sampler.join()
            mbps = (c["targets"] * size / (1 << 20)) / t_downloaded if t_downloaded else float("nan")
            log(f"round {r + 1}: {c['targets']:,} devices, {size / (1 << 20):.1f} MiB image: "
                f"downloaded by all after {t_downloaded or float('nan'):.2f} s ({mbps:.0f} MiB/s), "
                f"all reported after {t_done or float('nan'):.2f} s; succeeded {jobs['succeeded']}, "
                f"failed {jobs['failed']}; server RSS {before / 1024:.0f} MiB before, {peak[0] / 1024:.0f} MiB peak")
            rows.append((c["targets"], size, t_downloaded, t_done, mbps, before, peak[0], jobs["succeeded"]))
            time.sleep(3)
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
    print("| round | devices | image | all downloaded | throughput | all reported | succeeded | server RSS before → peak |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda v: f"{v:.2f} s" if v is not None else "not reached"
    for i, (n, sz, td, tr, mbps, b, pk, ok) in enumerate(rows, 1):
        print(f"| {i} | {n:,} | {sz / (1 << 20):.1f} MiB | {fmt(td)} | {mbps:.0f} MiB/s | {fmt(tr)} | {ok:,} | "
              f"{b / 1024:.0f} → {pk / 1024:.0f} MiB |")


if __name__ == "__main__":
    main()
