"""CoAP interop with aiocoap (a client library nobody on this project wrote):
a device posts SenML+JSON readings and a block-wise (Block1) batch, observes
its command resource and receives a command an operator sends meanwhile
(through the m2mhub CLI), answers it, and reads its shadow.

Usage: interop_coap.py --coap HOST:PORT --device ID --secret S --bin path/to/m2mhub
(the CLI must be logged in: M2MHUB_PROFILE set by the caller).
"""
import argparse
import asyncio
import json
import subprocess
import sys
import time

import aiocoap
from aiocoap.numbers.contentformat import ContentFormat


def fail(msg):
    sys.exit(f"coap interop: {msg}")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coap", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--bin", required=True)
    a = ap.parse_args()
    base = f"coap://{a.coap}/{a.device}/{a.secret}"
    ctx = await aiocoap.Context.create_client_context()

    # SenML+JSON (content format 110), one reading.
    senml = json.dumps([{"n": "moisture", "v": 11.25}]).encode()
    req = aiocoap.Message(code=aiocoap.POST, uri=f"{base}/telemetry", payload=senml,
                          content_format=ContentFormat.by_media_type("application/senml+json"))
    resp = await asyncio.wait_for(ctx.request(req).response, 10)
    if resp.code != aiocoap.CHANGED:
        fail(f"POST SenML: {resp.code} {resp.payload!r}")
    print("aiocoap: SenML+JSON reading accepted (2.04)")

    # A batch larger than one datagram: aiocoap sends it in Block1 blocks.
    now = int(time.time() * 1000)
    batch = json.dumps([{"ts": now - 60_000 + i * 100, "flow": i} for i in range(200)]).encode()
    req = aiocoap.Message(code=aiocoap.POST, uri=f"{base}/telemetry", payload=batch,
                          content_format=ContentFormat.JSON)
    resp = await asyncio.wait_for(ctx.request(req).response, 20)
    if resp.code != aiocoap.CHANGED:
        fail(f"block-wise POST: {resp.code} {resp.payload!r}")
    print(f"aiocoap: {len(batch)} byte batch accepted block-wise (2.04)")

    # Observe the command resource; an operator sends a command meanwhile.
    req = aiocoap.Message(code=aiocoap.GET, uri=f"{base}/commands", observe=0)
    pr = ctx.request(req)
    first = await asyncio.wait_for(pr.response, 10)
    if first.code != aiocoap.CONTENT or first.opt.observe is None:
        fail(f"observe registration: {first.code} observe={first.opt.observe}")
    subprocess.run([a.bin, "command", "send", a.device, "open-valve", "--params", '{"percent": 30}'],
                   check=True, stdout=subprocess.DEVNULL)
    cmd = None
    async def next_notification():
        async for note in pr.observation:
            if note.payload:
                return json.loads(note.payload)
    cmd = await asyncio.wait_for(next_notification(), 10)
    if cmd.get("name") != "open-valve" or cmd.get("params", {}).get("percent") != 30:
        fail(f"unexpected command {cmd}")
    pr.observation.cancel()
    print("aiocoap: command received through Observe")

    req = aiocoap.Message(code=aiocoap.POST, uri=f"{base}/commands/{cmd['id']}",
                          payload=b'{"opened": 30}', content_format=ContentFormat.JSON)
    resp = await asyncio.wait_for(ctx.request(req).response, 10)
    if resp.code != aiocoap.CHANGED:
        fail(f"command answer: {resp.code} {resp.payload!r}")
    print("aiocoap: command answered (2.04)")

    req = aiocoap.Message(code=aiocoap.POST, uri=f"{base}/shadow",
                          payload=b'{"state":{"reported":{"valve":30}}}', content_format=ContentFormat.JSON)
    resp = await asyncio.wait_for(ctx.request(req).response, 10)
    doc = json.loads(resp.payload)
    if doc.get("state", {}).get("reported", {}).get("valve") != 30:
        fail(f"shadow update: {resp.code} {resp.payload!r}")
    print("aiocoap: shadow reported state updated")

    bad = aiocoap.Message(code=aiocoap.POST, uri=f"coap://{a.coap}/{a.device}/wrong/telemetry", payload=b"1",
                          content_format=ContentFormat.JSON)
    resp = await asyncio.wait_for(ctx.request(bad).response, 10)
    if resp.code != aiocoap.UNAUTHORIZED:
        fail(f"a wrong secret got {resp.code}")
    print("aiocoap: a wrong secret is refused (4.01)")
    await ctx.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
