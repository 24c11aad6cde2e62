#!/usr/bin/env python3
"""A/B of two m2mhub builds: alternating which goes first, a fresh broker
(on a fresh data directory, pinned to core 0) per round and build, one
`m2mhub bench --json` run (pinned to core 1, always NEW's bench) each.
Prints each figure and the means: bytes per connection for `--scenario
idle` (with `--broker-pid PID`: PID is replaced by the broker's), messages
received per second otherwise.

usage: scripts/bench_ab.py BASE_BIN NEW_BIN ROUNDS BENCH_ARGS...
  e.g. scripts/bench_ab.py old/m2mhub target/release/m2mhub 4 --scenario idle --connections 19000 --broker-pid PID
"""
import json, os, subprocess, sys, tempfile, time, shutil, resource
base, new, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
scen = sys.argv[4:]
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
env = dict(os.environ, M2MHUB_MQTT_MAX_CONNECTIONS_PER_IP="0", M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP="0",
           M2MHUB_MQTT_MAX_CONNECTS_PER_CLIENT_ID="0", MIMALLOC_PURGE_DELAY="0", RUST_LOG="error")
res = {"base": [], "new": []}
for r in range(rounds):
    for name, binary in (("base", base), ("new", new)) if r % 2 == 0 else (("new", new), ("base", base)):
        work = tempfile.mkdtemp(dir=os.path.abspath("target") if os.path.isdir("target") else None)
        srv = subprocess.Popen(["taskset", "-c", "0", binary, "serve", "--data-dir", work + "/data", "--allow-anonymous",
                                "--mqtt-listen", "127.0.0.1:18932", "--http-listen", "127.0.0.1:18982",
                                "--mqtts-listen", "127.0.0.1:18933"]
                               + sum(([f, a] for f, a in (("--https-listen", "127.0.0.1:18934"), ("--coaps-listen", "127.0.0.1:18935"))
                                      if f in subprocess.run([binary, "serve", "--help"], capture_output=True, text=True).stdout), []), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        for line in srv.stdout:
            if line.startswith("m2mhub ready"):
                break
        time.sleep(1.0)
        args = [a.replace("PID", str(srv.pid)) for a in scen]
        out = subprocess.run(["taskset", "-c", "1", new, "bench", "--host", "127.0.0.1:18932", "--json", *args],
                             capture_output=True, text=True, timeout=300)
        srv.terminate(); srv.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
        try:
            j = json.loads(out.stdout)
        except Exception:
            print(name, "error", out.stderr[-500:], file=sys.stderr); continue
        v = j.get("bytes_per_connection") or j.get("received_per_sec")
        res[name].append(v)
        print(f"round {r} {name}: {v} (lost {j.get('lost')}, p99 {j.get('latency_p99_us')})", flush=True)
for k, v in res.items():
    vals = [x for x in v if x]
    print(k, [round(x) for x in vals], "mean", round(sum(vals) / max(1, len(vals))))
