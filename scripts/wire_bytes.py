"""Bytes on the wire for one reading, per protocol stack: CoAP(S) with
SenML+CBOR against MQTT with JSON and with SenML+CBOR.

CoAP messages are encoded by aiocoap (a library nobody here wrote); MQTT
packets are laid out per the MQTT 3.1.1 specification (section 3.3/3.4);
SenML+CBOR per RFC 8428/8949 (the value as a half-precision float, as a
minimal device encoder would write 21.5). Header sizes: IPv4 20 B, UDP 8 B,
TCP 20 B (no options), DTLS 1.2 record with TLS_PSK_WITH_AES_128_CCM_8
13 + 8 (explicit nonce) + 8 (tag) = 29 B, TLS 1.2 record with AES-GCM
5 + 8 + 16 = 29 B. One reading with its acknowledgement, on an already
open session (no handshake, no TCP ACK-only segments, no keep-alives).

Usage: target/coap-venv/bin/python scripts/wire_bytes.py
"""
import json
import warnings
import struct

warnings.simplefilter("ignore", DeprecationWarning)
import aiocoap
from aiocoap.numbers.codes import Code

IPV4, UDP, TCP = 20, 8, 20
DTLS_CCM8 = 13 + 8 + 8
TLS_GCM = 5 + 8 + 16

DEVICE = "probe-1"
TOKEN_SECRET = "m2m_" + "x" * 43  # the length of an m2mhub token secret
json_payload = json.dumps({"temperature": 21.5}, separators=(",", ":")).encode()


def cbor_text(s):
    b = s.encode()
    assert len(b) < 24
    return bytes([0x60 | len(b)]) + b


# [{0: "temperature", 2: 21.5 (f16)}]
senml_cbor = bytes([0x81, 0xA2, 0x00]) + cbor_text("temperature") + bytes([0x02, 0xF9]) + struct.pack(">e", 21.5)


def coap_post(path, payload, content_format):
    m = aiocoap.Message(code=Code.POST, mtype=aiocoap.CON, mid=0x1234, token=b"\x01\x02",
                        uri_path=tuple(path.split("/")), payload=payload, content_format=content_format)
    return len(m.encode())


def coap_ack():
    m = aiocoap.Message(code=Code.CHANGED, mtype=aiocoap.ACK, mid=0x1234, token=b"\x01\x02")
    return len(m.encode())


def mqtt_publish_qos1(topic, payload):
    remaining = 2 + len(topic) + 2 + len(payload)
    rl = 1 if remaining < 128 else 2
    return 1 + rl + remaining


MQTT_PUBACK = 4
topic = f"devices/{DEVICE}/telemetry"

rows = []
coaps_req = coap_post("telemetry", senml_cbor, 112)
ack = coap_ack()
rows.append(("CoAPS (DTLS-PSK, CCM_8) + SenML+CBOR, CON", coaps_req, ack, DTLS_CCM8, IPV4 + UDP))
plain_req = coap_post(f"{DEVICE}/{TOKEN_SECRET}/telemetry", senml_cbor, 112)
rows.append(("CoAP (token in path) + SenML+CBOR, CON", plain_req, ack, 0, IPV4 + UDP))
rows.append(("CoAPS + SenML+CBOR, NON (no ACK)", coaps_req, None, DTLS_CCM8, IPV4 + UDP))
rows.append(("MQTT 3.1.1 QoS 1 + JSON", mqtt_publish_qos1(topic, json_payload), MQTT_PUBACK, 0, IPV4 + TCP))
rows.append(("MQTT 3.1.1 QoS 1 + SenML+CBOR", mqtt_publish_qos1(topic, senml_cbor), MQTT_PUBACK, 0, IPV4 + TCP))
rows.append(("MQTTS (TLS 1.2, AES-GCM) QoS 1 + JSON", mqtt_publish_qos1(topic, json_payload), MQTT_PUBACK, TLS_GCM, IPV4 + TCP))
rows.append(("MQTT 3.1.1 QoS 0 + JSON (no ack)", mqtt_publish_qos1(topic, json_payload) - 2, None, 0, IPV4 + TCP))

print(f"reading: JSON {len(json_payload)} B {json_payload.decode()}, SenML+CBOR {len(senml_cbor)} B")
print("| stack | request (app) | ack (app) | security per packet | IP+transport per packet | total on the wire |")
print("|---|---|---|---|---|---|")
for name, req, ack_b, sec, hdr in rows:
    total = req + sec + hdr + ((ack_b + sec + hdr) if ack_b is not None else 0)
    ack_s = f"{ack_b} B" if ack_b is not None else "—"
    print(f"| {name} | {req} B | {ack_s} | {sec} B | {hdr} B | **{total} B** |")
