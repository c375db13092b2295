#!/usr/bin/env python3
"""An independent client of the private TCP gateway, written from its description
(../shared/specs/protocols.md section 1) with raw sockets, and checks of the broker's gateway
with it; MQTT applications on the other side are paho-mqtt clients.

Frame: header byte (type << 4 | flags), then for CONNECT (1), CONNACK (2) and DATATRANS (3) a
big-endian u16 length and the body; PING (4), PONG (5) and DISCONNECT (6) are one byte. A
string is a u16 length and its bytes. CONNECT flags carry the version (1); CONNACK flags carry
the code (0 ok, 1 authentication failed, 2 illegal version).

Usage: tcpgw_client.py GATEWAY_PORT MQTT_PORT USER PASSWORD
(the broker runs with tcp.proto.idle_timeout = 2s, tcp.proto.max_packet_size = 1000, and
anonymous clients refused).
"""
import socket
import struct
import sys
import threading
import time

import paho.mqtt.client as mqtt

GW, MQTT, USER, PASSWORD = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
failures = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))
    if not ok:
        failures.append(name)


def string(b):
    return struct.pack(">H", len(b)) + b


def connect_frame(cid, keepalive=60, user=None, password=None, version=1):
    body = bytes([keepalive]) + string(cid.encode())
    if user is not None:
        body += string(user.encode())
        if password is not None:
            body += string(password.encode())
    return bytes([0x10 | version]) + struct.pack(">H", len(body)) + body


def data_frame(payload):
    return b"\x30" + struct.pack(">H", len(payload)) + payload


class Device:
    def __init__(self):
        self.sock = socket.create_connection(("127.0.0.1", GW), timeout=10)
        self.buf = b""

    def send(self, b):
        self.sock.sendall(b)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(4096)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def frame(self):
        """(type, flags, body) of the next frame, or None once the broker closed."""
        try:
            if not self._need(1):
                return None
            hdr = self.buf[0]
            kind, flags = hdr >> 4, hdr & 0x0F
            if kind in (4, 5, 6):
                self.buf = self.buf[1:]
                return (kind, flags, b"")
            if not self._need(3):
                return None
            (length,) = struct.unpack(">H", self.buf[1:3])
            if not self._need(3 + length):
                return None
            body = self.buf[3 : 3 + length]
            self.buf = self.buf[3 + length :]
            return (kind, flags, body)
        except (ConnectionResetError, socket.timeout):
            return None

    def closed_within(self, seconds):
        self.sock.settimeout(seconds)
        start = time.time()
        try:
            while True:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return time.time() - start
        except ConnectionResetError:
            return time.time() - start
        except socket.timeout:
            return None


def device(cid, keepalive=60):
    d = Device()
    d.send(connect_frame(cid, keepalive, USER, PASSWORD))
    return d, d.frame()


def app(name):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
    c.username_pw_set(USER, PASSWORD)
    got, subscribed = [], threading.Event()
    c.on_message = lambda cl, ud, m: got.append((m.topic, m.payload))
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", MQTT)
    c.loop_start()
    return c, got, subscribed


# Connect with credentials: CONNACK 0.
d, ack = device("py-dev-1")
check("CONNECT with credentials gets CONNACK 0", ack is not None and ack[0] == 2 and ack[1] == 0, ack)

# Uplink reaches an MQTT subscriber on tcp/<cid>/up.
sub, got, subscribed = app("py-app-sub")
sub.subscribe("tcp/py-dev-1/up", qos=0)
subscribed.wait(5)
d.send(data_frame(b"hello from python"))
deadline = time.time() + 5
while not got and time.time() < deadline:
    time.sleep(0.02)
check("DATATRANS reaches tcp/<cid>/up", got == [("tcp/py-dev-1/up", b"hello from python")], got)

# An MQTT publish on tcp/<cid>/dn reaches the device.
pub, _, _ = app("py-app-pub")
pub.publish("tcp/py-dev-1/dn", b"set-interval 30", qos=1).wait_for_publish(5)
f = d.frame()
check("tcp/<cid>/dn reaches the device as DATATRANS", f == (3, 0, b"set-interval 30"), f)

# PING gets PONG.
d.send(b"\x40")
f = d.frame()
check("PING gets PONG", f == (5, 0, b""), f)

# Takeover: the same client id again closes the first connection.
d2, ack2 = device("py-dev-1")
check("the second connection with the id is accepted", ack2 is not None and ack2[1] == 0, ack2)
check("the first is closed (takeover)", d.closed_within(5) is not None)

# DISCONNECT closes.
d2.send(b"\x60")
check("DISCONNECT closes", d2.closed_within(5) is not None)

# A bad version: CONNACK 2, then closed.
bad = Device()
bad.send(connect_frame("py-bad", version=2))
f = bad.frame()
check("version 2 gets CONNACK 2", f is not None and f[0] == 2 and f[1] == 2, f)
check("and is closed", bad.closed_within(5) is not None)

# No credentials (anonymous refused here), and a wrong password: CONNACK 1, then closed.
for label, frame in (
    ("no credentials", connect_frame("py-anon")),
    ("a wrong password", connect_frame("py-wrong", 60, USER, "not-the-password")),
):
    x = Device()
    x.send(frame)
    f = x.frame()
    check(f"{label} gets CONNACK 1", f is not None and f[0] == 2 and f[1] == 1, f)
    check(f"{label}: closed", x.closed_within(5) is not None)

# A first frame that is not CONNECT, a reserved type, an oversized DATATRANS: closed.
x = Device()
x.send(b"\x40")
check("PING before CONNECT closes", x.closed_within(5) is not None)
x, _ = device("py-reserved")
x.send(b"\x70")
check("a reserved frame type closes", x.closed_within(5) is not None)
x, _ = device("py-big")
x.send(data_frame(b"x" * 1001))
check("DATATRANS above max_packet_size closes", x.closed_within(5) is not None)

# Idle timeout (2 s): no CONNECT, closed in about that time.
x = Device()
t = x.closed_within(10)
check("no CONNECT within idle_timeout closes", t is not None and 1.5 <= t <= 8, t)

# Keepalive 1 s (x 1.5 on the broker): silence closes.
x, _ = device("py-ka", keepalive=1)
t = x.closed_within(10)
check("keepalive timeout closes", t is not None and t <= 8, t)

sub.loop_stop()
pub.loop_stop()
if failures:
    print(f"tcpgw client: {len(failures)} check(s) failed: {failures}")
    sys.exit(1)
print("tcpgw client: all checks passed")
