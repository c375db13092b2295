#!/usr/bin/env python3
"""Checks of the MQTT-SN gateway with independent clients: the third-party MQTT-SN client
from PyPI (mqtt-sn-12: its mqtt_sn_pub and mqtt_sn_sub commands) for SN -> MQTT and
MQTT -> SN at QoS 0, 1, 2 with named, predefined and short topics and QoS -1, and a raw-UDP
client written here from the MQTT-SN 1.2 specification for what that client cannot do: the
will dialogue and its updates, sleep and wake with buffered delivery, SEARCHGW/GWINFO,
ADVERTISE, QoS -1, retransmission when an acknowledgement is withheld, QoS 2 downlink and
malformed datagrams. MQTT applications on the other side are paho-mqtt clients.

A message is a length byte (the whole message, itself included), the type, then its fields;
16-bit fields are big-endian. Flags: DUP 0x80, QoS bits 6-5 (0, 1, 2, 3 = -1), RETAIN 0x10,
WILL 0x08, CLEANSESSION 0x04, topic id type bits 1-0 (0 normal, 1 predefined, 2 short).

Usage: mqttsn_client.py SN_PORT MQTT_PORT ADMIN_PORT ADVERTISE_PORT SN_BIN_DIR
(the broker runs with mqtt.sn.gateway_id = 5, enable_qos3 on, predefined topic 7 =
"pre/seven", retry_interval 1s, max_retries 2, and ADVERTISE every second to
127.0.0.1:ADVERTISE_PORT).
"""
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt

SN, MQTT, ADMIN, ADV = (int(a) for a in sys.argv[1:5])
BIN = sys.argv[5]
failures = []

# Message types.
ADVERTISE, SEARCHGW, GWINFO, CONNECT, CONNACK = 0x00, 0x01, 0x02, 0x04, 0x05
WILLTOPICREQ, WILLTOPIC, WILLMSGREQ, WILLMSG = 0x06, 0x07, 0x08, 0x09
REGISTER, REGACK, PUBLISH, PUBACK = 0x0A, 0x0B, 0x0C, 0x0D
PUBCOMP, PUBREC, PUBREL = 0x0E, 0x0F, 0x10
SUBSCRIBE, SUBACK = 0x12, 0x13
PINGREQ, PINGRESP, DISCONNECT = 0x16, 0x17, 0x18
WILLTOPICUPD, WILLTOPICRESP, WILLMSGUPD, WILLMSGRESP = 0x1A, 0x1B, 0x1C, 0x1D


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))
    if not ok:
        failures.append(name)


def msg(kind, body=b""):
    return bytes([len(body) + 2, kind]) + body


def qos_bits(q):
    return {0: 0x00, 1: 0x20, 2: 0x40, -1: 0x60}[q]


class Sn:
    """A raw MQTT-SN client on its own UDP socket."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)

    def send(self, data):
        self.sock.sendto(data, ("127.0.0.1", SN))

    def recv(self, timeout=5):
        """(type, body) of the next message, or None."""
        self.sock.settimeout(timeout)
        try:
            d, _ = self.sock.recvfrom(65536)
        except socket.timeout:
            return None
        if d[0] == 0x01:
            return d[3], d[4:]
        return d[1], d[2:]

    def connect(self, cid, duration=60, will=False, clean=True):
        flags = (0x08 if will else 0) | (0x04 if clean else 0)
        self.send(msg(CONNECT, bytes([flags, 1]) + struct.pack(">H", duration) + cid.encode()))

    def connected(self, cid, duration=60):
        self.connect(cid, duration)
        return self.recv() == (CONNACK, b"\x00")

    def subscribe(self, name, qos, msg_id=1):
        self.send(msg(SUBSCRIBE, bytes([qos_bits(qos)]) + struct.pack(">H", msg_id) + name.encode()))
        return self.recv()

    def close(self):
        self.sock.close()


class App:
    """A paho-mqtt application on the MQTT side."""

    def __init__(self, cid, topics=()):
        self.got = []
        self.cv = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", MQTT, 60)
        self.c.loop_start()
        for t in topics:
            r = self.c.subscribe(t, 2)
            time.sleep(0.05)
            assert r[0] == 0
        time.sleep(0.3)

    def _on_message(self, _c, _u, m):
        with self.cv:
            self.got.append((m.topic, m.payload, m.qos))
            self.cv.notify_all()

    def wait(self, n, timeout=5):
        deadline = time.time() + timeout
        with self.cv:
            while len(self.got) < n and time.time() < deadline:
                self.cv.wait(0.1)
            return list(self.got)

    def publish(self, topic, payload, qos=0):
        self.c.publish(topic, payload, qos).wait_for_publish(5)

    def stop(self):
        self.c.loop_stop()
        self.c.disconnect()


def sn_pub(*args):
    return subprocess.run(
        [os.path.join(BIN, "mqtt_sn_pub"), "-p", str(SN), "--timeout", "10", *args],
        capture_output=True, text=True, timeout=30)


def third_party_uplink():
    app = App("app-up", ["sn/up/#", "pre/seven", "ab"])
    for q in (0, 1, 2):
        r = sn_pub("-t", f"sn/up/q{q}", "-m", f"uplink-q{q}", "-q", str(q), "-i", f"pub-q{q}")
        check(f"mqtt_sn_pub QoS {q} exits 0", r.returncode == 0, r.stderr[-500:])
    got = app.wait(3)
    check("mqtt_sn_pub QoS 0, 1, 2 reach an MQTT subscriber",
          sorted((t, p) for t, p, _ in got) == [(f"sn/up/q{q}", f"uplink-q{q}".encode()) for q in (0, 1, 2)],
          got)
    r = sn_pub("-T", "7", "-m", "predefined", "-q", "1", "-i", "pub-pre")
    check("mqtt_sn_pub to a predefined id", r.returncode == 0, r.stderr[-500:])
    r = sn_pub("-t", "ab", "-m", "short", "-q", "1", "-i", "pub-short")
    check("mqtt_sn_pub to a short topic", r.returncode == 0, r.stderr[-500:])
    r = sn_pub("-T", "7", "-m", "minus-one", "-q", "-1", "-i", "pub-m1")
    check("mqtt_sn_pub at QoS -1", r.returncode == 0, r.stderr[-500:])
    got = app.wait(6)[3:]
    check("predefined, short and QoS -1 messages arrive",
          sorted((t, p) for t, p, _ in got)
          == [("ab", b"short"), ("pre/seven", b"minus-one"), ("pre/seven", b"predefined")], got)
    app.stop()


def third_party_downlink():
    app = App("app-down")
    cases = [
        (["-t", "sn/dn/q0", "-q", "0"], "sn/dn/q0", 0),
        (["-t", "sn/dn/q1", "-q", "1"], "sn/dn/q1", 1),
        # QoS 2 publications reach a QoS 1 subscription (mqtt_sn_sub takes 0 or 1).
        (["-t", "sn/dn/q2", "-q", "1"], "sn/dn/q2", 2),
        (["-T", "7", "-q", "1"], "pre/seven", 1),
        (["-t", "cd", "-q", "1"], "cd", 1),
    ]
    for i, (args, topic, qos) in enumerate(cases):
        p = subprocess.Popen(
            [os.path.join(BIN, "mqtt_sn_sub"), "-p", str(SN), "-1", "--timeout", "10",
             "-i", f"sub-{i}", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Publish until the subscriber has its message (it subscribes asynchronously).
        deadline = time.time() + 10
        while p.poll() is None and time.time() < deadline:
            app.publish(topic, f"downlink-{i}", qos)
            time.sleep(0.3)
        try:
            out, err = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        check(f"mqtt_sn_sub {' '.join(args)} receives an MQTT publish at QoS {qos}",
              p.returncode == 0 and f"downlink-{i}" in out, (p.returncode, out, err[-500:]))
    app.stop()


def raw_will():
    app = App("app-will", ["will/#"])
    c = Sn()
    c.connect("raw-will", duration=1, will=True)
    check("WILLTOPICREQ after a CONNECT with the will flag", c.recv() == (WILLTOPICREQ, b""))
    c.send(msg(WILLTOPIC, bytes([qos_bits(1)]) + b"will/raw"))
    check("WILLMSGREQ after WILLTOPIC", c.recv() == (WILLMSGREQ, b""))
    c.send(msg(WILLMSG, b"first"))
    check("CONNACK after WILLMSG", c.recv() == (CONNACK, b"\x00"))
    c.send(msg(WILLTOPICUPD, bytes([qos_bits(0)]) + b"will/updated"))
    check("WILLTOPICRESP 0", c.recv() == (WILLTOPICRESP, b"\x00"))
    c.send(msg(WILLMSGUPD, b"updated"))
    check("WILLMSGRESP 0", c.recv() == (WILLMSGRESP, b"\x00"))
    # Silent past 1 s x 1.5: lost, the updated will published.
    check("DISCONNECT when the keepalive runs out", c.recv(timeout=5) == (DISCONNECT, b""))
    got = app.wait(1)
    check("the updated will is published", got[:1] == [("will/updated", b"updated", 0)], got)
    c.close()
    app.stop()


def raw_sleep():
    app = App("app-sleep")
    c = Sn()
    check("CONNECT", c.connected("raw-sleeper"))
    kind, body = c.subscribe("sleep/news", 1)
    check("SUBACK", kind == SUBACK and body[-1] == 0, (kind, body))
    topic_id = struct.unpack(">H", body[1:3])[0]
    c.send(msg(DISCONNECT, struct.pack(">H", 30)))
    check("DISCONNECT(duration) is answered", c.recv() == (DISCONNECT, b""))
    for i in range(3):
        app.publish("sleep/news", f"news{i}", 1)
    check("nothing reaches a sleeping client", c.recv(timeout=0.5) is None)
    c.send(msg(PINGREQ, b"raw-sleeper"))
    got = []
    while True:
        m = c.recv()
        if m is None or m[0] != PUBLISH:
            break
        flags, tid, mid = m[1][0], *struct.unpack(">HH", m[1][1:5])
        got.append(m[1][5:])
        check("buffered PUBLISH on the subscribed id", tid == topic_id and flags & 0x60 == 0x20, m)
        c.send(msg(PUBACK, struct.pack(">HHB", tid, mid, 0)))
    check("the messages that waited, in order", got == [b"news0", b"news1", b"news2"], got)
    check("PINGRESP once they are acknowledged", m == (PINGRESP, b""), m)
    c.send(msg(PINGREQ, b""))
    check("a PINGREQ without the client id does not wake it", c.recv(timeout=0.5) is None)
    # A CONNECT ends the sleep; a retransmission then follows an unacknowledged message.
    c.connect("raw-sleeper", clean=False)
    check("CONNACK wakes it for good", c.recv() == (CONNACK, b"\x00"))
    app.publish("sleep/news", "unacked", 1)
    first = c.recv()
    again = c.recv(timeout=3)
    check("an unacknowledged PUBLISH is sent again with DUP",
          first and again and first[0] == PUBLISH and again[0] == PUBLISH
          and again[1][0] & 0x80 and again[1][1:] == first[1][1:], (first, again))
    third = c.recv(timeout=3)
    check("and again", third and third[0] == PUBLISH, third)
    check("then the client is taken for lost (DISCONNECT)", c.recv(timeout=3) == (DISCONNECT, b""))
    c.close()
    app.stop()


def raw_discovery_qos_and_garbage():
    c = Sn()
    c.send(msg(SEARCHGW, b"\x01"))
    check("SEARCHGW gets GWINFO with the gateway id", c.recv() == (GWINFO, b"\x05"))
    adv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    adv.bind(("127.0.0.1", ADV))
    adv.settimeout(5)
    try:
        d, src = adv.recvfrom(64)
        check("ADVERTISE arrives from the gateway's port", d == bytes([5, ADVERTISE, 5, 0, 1]) and src[1] == SN, (d, src))
    except socket.timeout:
        check("ADVERTISE arrives", False, "nothing within 5 s")
    adv.close()
    app = App("app-qos", ["pre/seven", "q2/#"])
    c.send(msg(PUBLISH, bytes([qos_bits(-1) | 0x01]) + struct.pack(">HH", 7, 0) + b"raw-minus-one"))
    got = app.wait(1)
    check("QoS -1 to a predefined id without a connection", got == [("pre/seven", b"raw-minus-one", 0)], got)
    check("QoS -1 is not answered", c.recv(timeout=0.3) is None)
    # Garbage: a length that disagrees, a reserved type, one byte. Counted, unanswered.
    for bad in (b"\x09\x0c", b"\x02\x11", b"\x01"):
        c.send(bad)
    check("malformed datagrams are not answered", c.recv(timeout=0.5) is None)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/metrics", timeout=5).read().decode()
    bad = sum(int(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("shardmq_mqttsn_bad_datagrams_total"))
    check("malformed datagrams are counted", bad >= 3, bad)
    # QoS 2 downlink with its PUBREC/PUBREL/PUBCOMP.
    check("CONNECT after the garbage", c.connected("raw-q2"))
    kind, body = c.subscribe("q2/x", 2)
    check("SUBACK QoS 2", kind == SUBACK and body[0] & 0x60 == 0x40, (kind, body))
    app.publish("q2/x", "exactly-once", 2)
    m = c.recv()
    ok = m and m[0] == PUBLISH and m[1][0] & 0x60 == 0x40 and m[1][5:] == b"exactly-once"
    check("QoS 2 PUBLISH downlink", ok, m)
    if ok:
        mid = struct.unpack(">H", m[1][3:5])[0]
        c.send(msg(PUBREC, struct.pack(">H", mid)))
        check("PUBREL after PUBREC", c.recv() == (PUBREL, struct.pack(">H", mid)))
        c.send(msg(PUBCOMP, struct.pack(">H", mid)))
    c.send(msg(DISCONNECT))
    check("DISCONNECT is answered", c.recv() == (DISCONNECT, b""))
    c.close()
    app.stop()


third_party_uplink()
third_party_downlink()
raw_will()
raw_sleep()
raw_discovery_qos_and_garbage()
if failures:
    print(f"{len(failures)} MQTT-SN check(s) failed: {failures}")
    sys.exit(1)
print("all MQTT-SN checks passed")
