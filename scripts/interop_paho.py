"""MQTT 5 interop checks with paho-mqtt (an independent client).

Checks that user properties, content type, payload format indicator,
response topic, correlation data and message expiry pass through
unchanged, that subscription identifiers and topic aliases work, and that
MQTT over WebSocket (/mqtt, subprotocol "mqtt") works.
"""

import argparse
import queue
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 5.0


def client(name, host, port, transport="tcp", **kw):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=name,
        protocol=mqtt.MQTTv5,
        transport=transport,
        **kw,
    )
    if transport == "websockets":
        c.ws_set_options(path="/mqtt")
    inbox = queue.Queue()
    connected = queue.Queue()
    c.on_message = lambda _c, _u, msg: inbox.put(msg)
    c.on_connect = lambda _c, _u, _f, rc, props: connected.put((rc, props))
    c.connect(host, port, keepalive=30)
    c.loop_start()
    rc, props = connected.get(timeout=TIMEOUT)
    if rc.is_failure:
        raise SystemExit(f"{name}: connect refused: {rc}")
    return c, inbox, props


def expect(cond, what):
    if not cond:
        print(f"paho: FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"paho: ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--http", required=True, help="HOST:PORT of the HTTP listener")
    a = ap.parse_args()

    sub, inbox, connack = client("paho-sub", a.host, a.port)
    expect(connack is not None, "CONNACK carries properties")
    sp = Properties(PacketTypes.SUBSCRIBE)
    sp.SubscriptionIdentifier = 42
    sub.subscribe("paho/props/#", options=SubscribeOptions(qos=1), properties=sp)
    time.sleep(0.3)

    pub, _, _ = client("paho-pub", a.host, a.port)
    pp = Properties(PacketTypes.PUBLISH)
    pp.UserProperty = [("site", "plant-7"), ("line", "3"), ("site", "again")]
    pp.ContentType = "application/json"
    pp.PayloadFormatIndicator = 1
    pp.ResponseTopic = "paho/reply/1"
    pp.CorrelationData = b"\x00\x01corr"
    pp.MessageExpiryInterval = 3600
    pub.publish("paho/props/a", b'{"t":21.5}', qos=1, properties=pp).wait_for_publish(TIMEOUT)
    msg = inbox.get(timeout=TIMEOUT)
    p = msg.properties
    expect(msg.payload == b'{"t":21.5}', "payload unchanged")
    expect(
        p.UserProperty == [("site", "plant-7"), ("line", "3"), ("site", "again")],
        "user properties unchanged and in order",
    )
    expect(p.ContentType == "application/json", "content type")
    expect(p.PayloadFormatIndicator == 1, "payload format indicator")
    expect(p.ResponseTopic == "paho/reply/1", "response topic")
    expect(p.CorrelationData == b"\x00\x01corr", "correlation data")
    expect(0 < p.MessageExpiryInterval <= 3600, "message expiry interval passed on")
    expect(p.SubscriptionIdentifier == [42], "subscription identifier")

    # Topic alias from the client: first with the name, then alias only.
    ap1 = Properties(PacketTypes.PUBLISH)
    ap1.TopicAlias = 3
    pub.publish("paho/props/alias", b"one", qos=1, properties=ap1).wait_for_publish(TIMEOUT)
    ap2 = Properties(PacketTypes.PUBLISH)
    ap2.TopicAlias = 3
    pub.publish("", b"two", qos=1, properties=ap2).wait_for_publish(TIMEOUT)
    got = [inbox.get(timeout=TIMEOUT), inbox.get(timeout=TIMEOUT)]
    expect(
        [(m.topic, m.payload) for m in got]
        == [("paho/props/alias", b"one"), ("paho/props/alias", b"two")],
        "topic alias resolved by the broker",
    )

    # No Local: a client does not get its own messages back.
    sub.subscribe("paho/nolocal", options=SubscribeOptions(qos=1, noLocal=True))
    time.sleep(0.3)
    sub.publish("paho/nolocal", b"mine", qos=1).wait_for_publish(TIMEOUT)
    pub.publish("paho/nolocal", b"theirs", qos=1).wait_for_publish(TIMEOUT)
    m = inbox.get(timeout=TIMEOUT)
    expect(m.payload == b"theirs", "no-local suppresses own messages")

    # Request/response: the responder answers on the response topic.
    sub.subscribe("paho/reply/1", options=SubscribeOptions(qos=1))
    time.sleep(0.3)
    rp = Properties(PacketTypes.PUBLISH)
    rp.CorrelationData = b"\x00\x01corr"
    pub.publish("paho/reply/1", b"answer", qos=1, properties=rp).wait_for_publish(TIMEOUT)
    m = inbox.get(timeout=TIMEOUT)
    expect(
        m.topic == "paho/reply/1" and m.properties.CorrelationData == b"\x00\x01corr",
        "response correlated",
    )

    # MQTT over WebSocket.
    host, port = a.http.rsplit(":", 1)
    ws, ws_inbox, _ = client("paho-ws", host, int(port), transport="websockets")
    ws.subscribe("paho/ws", qos=1)
    time.sleep(0.3)
    pub.publish("paho/ws", b"via-websocket", qos=2).wait_for_publish(TIMEOUT)
    m = ws_inbox.get(timeout=TIMEOUT)
    expect(m.payload == b"via-websocket" and m.qos == 1, "WebSocket subscriber receives QoS 2 as QoS 1")

    for c in (sub, pub, ws):
        c.disconnect()
        c.loop_stop()
    print("paho: all checks passed")


if __name__ == "__main__":
    main()
