"""Sparkplug B interop: an edge node driven by pysparkplug (a client library
nobody on this project wrote) births, publishes node and device data and
dies against m2mhub; interop.sh then checks what was stored.

Usage: interop_sparkplug.py --host H --port P --node ID --secret S
"""
import argparse
import sys
import time

import pysparkplug as psp


def metric(name, datatype, value):
    return psp.Metric(timestamp=psp.get_current_timestamp(), name=name, datatype=datatype, value=value)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--node", required=True, help="the device id, used as the edge node id")
    ap.add_argument("--secret", required=True)
    a = ap.parse_args()

    commands = []
    client = psp.Client(client_id=a.node, username=a.node, password=a.secret)
    node = psp.EdgeNode(
        group_id="interop",
        edge_node_id=a.node,
        metrics=[metric("temperature", psp.DataType.DOUBLE, 20.0), metric("running", psp.DataType.BOOLEAN, True)],
        client=client,
        cmd_callback=lambda _node, message: commands.append(message),
    )
    node.register(psp.Device(device_id="sensor", metrics=[metric("humidity", psp.DataType.FLOAT, 40.5)]))
    node.connect(a.host, port=a.port, blocking=False)
    deadline = time.time() + 10
    # pysparkplug has no public "connected" flag; its NBIRTH callback sets this one.
    while not node._connected and time.time() < deadline:
        time.sleep(0.05)
    if not node._connected:
        sys.exit("the edge node did not connect")
    time.sleep(0.5)
    node.update([metric("temperature", psp.DataType.DOUBLE, 21.5)])
    node.update_device("sensor", [metric("humidity", psp.DataType.FLOAT, 41.0)])
    time.sleep(1.0)
    node.disconnect()
    print("sparkplug edge node: birth, data and death published")


if __name__ == "__main__":
    main()
