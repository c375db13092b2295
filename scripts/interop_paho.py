"""Interop checks with paho-mqtt (PyPI), an independent MQTT client.

Usage: python3 scripts/interop_paho.py HOST PORT [WS_PORT]

For MQTT 3.1 and 3.1.1: QoS 0/1/2 round trips, retained delivery with the retain flag, a will
published when the socket dies without DISCONNECT, and a persistent session that queues
messages while its client is away. With WS_PORT, QoS 1 both ways between a client over
WebSocket (ws://HOST:WS_PORT/mqtt) and one over TCP. Exits non-zero on the first failure.
"""

import queue
import sys
import time
import uuid

import paho.mqtt.client as mqtt

HOST, PORT = sys.argv[1], int(sys.argv[2])
WS_PORT = int(sys.argv[3]) if len(sys.argv) > 3 else None
TIMEOUT = 10


def client(level, client_id=None, clean=True, will=None, ws=False):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"paho-{uuid.uuid4().hex[:12]}",
        clean_session=clean,
        protocol=level,
        transport="websockets" if ws else "tcp",
    )
    if ws:
        c.ws_set_options(path="/mqtt")
    inbox = queue.Queue()
    connacks = queue.Queue()
    subacks = queue.Queue()
    c.on_message = lambda _c, _u, m: inbox.put((m.topic, m.payload, m.qos, m.retain))
    c.on_connect = lambda _c, _u, flags, rc, _p: connacks.put((flags.session_present, rc))
    c.on_subscribe = lambda _c, _u, mid, codes, _p: subacks.put(codes)
    if will:
        c.will_set(*will)
    c.connect(HOST, WS_PORT if ws else PORT, keepalive=30)
    c.loop_start()
    present, rc = connacks.get(timeout=TIMEOUT)
    assert rc == 0, f"CONNACK {rc}"
    c.inbox, c.subacks, c.session_present = inbox, subacks, present
    return c


def subscribe(c, topic, qos):
    c.subscribe(topic, qos)
    c.subacks.get(timeout=TIMEOUT)


def expect(c, what):
    try:
        return c.inbox.get(timeout=TIMEOUT)
    except queue.Empty:
        raise AssertionError(f"nothing received: {what}")


def stop(c):
    c.disconnect()
    c.loop_stop()


LEVELS = [("3.1", mqtt.MQTTv31), ("3.1.1", mqtt.MQTTv311)]
failures = 0


def check(name, fn):
    global failures
    try:
        fn()
        print(f"ok   paho {name}")
    except Exception as e:  # noqa: BLE001 - report every failure
        failures += 1
        print(f"FAIL paho {name}: {e!r}")


for label, level in LEVELS:
    def round_trips(level=level, label=label):
        sub = client(level)
        pub = client(level)
        subscribe(sub, f"paho/{label}/#", 2)
        for q in (0, 1, 2):
            info = pub.publish(f"paho/{label}/{q}", f"m{q}".encode(), qos=q)
            info.wait_for_publish(TIMEOUT)
            topic, payload, qos, retain = expect(sub, f"QoS {q}")
            assert (topic, payload, qos, retain) == (f"paho/{label}/{q}", f"m{q}".encode(), q, False), (topic, payload, qos, retain)
        stop(sub)
        stop(pub)

    def retained(level=level, label=label):
        pub = client(level)
        pub.publish(f"paho/ret/{label}", b"kept", qos=1, retain=True).wait_for_publish(TIMEOUT)
        sub = client(level)
        subscribe(sub, f"paho/ret/{label}", 1)
        assert expect(sub, "retained") == (f"paho/ret/{label}", b"kept", 1, True)
        pub.publish(f"paho/ret/{label}", b"", qos=1, retain=True).wait_for_publish(TIMEOUT)
        stop(pub)
        stop(sub)

    def will(level=level, label=label):
        watcher = client(level)
        subscribe(watcher, f"paho/will/{label}", 1)
        doomed = client(level, will=(f"paho/will/{label}", b"gone", 1, False))
        doomed.loop_stop()
        doomed.socket().close()  # no DISCONNECT
        assert expect(watcher, "will") == (f"paho/will/{label}", b"gone", 1, False)
        stop(watcher)

    def persistent(level=level, label=label):
        cid = f"paho-durable-{label.replace('.', '')}-{uuid.uuid4().hex[:6]}"
        s = client(level, client_id=cid, clean=False)
        subscribe(s, f"paho/dur/{label}", 1)
        stop(s)
        time.sleep(0.2)
        pub = client(level)
        pub.publish(f"paho/dur/{label}", b"queued", qos=1).wait_for_publish(TIMEOUT)
        s = client(level, client_id=cid, clean=False)
        if level == mqtt.MQTTv311:
            assert s.session_present, "session present"
        assert expect(s, "queued message")[1] == b"queued"
        stop(s)
        stop(pub)

    check(f"{label} QoS 0/1/2 round trips", round_trips)
    check(f"{label} retained", retained)
    check(f"{label} will on abnormal close", will)
    check(f"{label} persistent session", persistent)

if WS_PORT is not None:

    def websocket():
        w = client(mqtt.MQTTv311, ws=True)
        t = client(mqtt.MQTTv311)
        subscribe(w, "paho/ws/down", 1)
        subscribe(t, "paho/ws/up", 1)
        t.publish("paho/ws/down", b"to the websocket", qos=1).wait_for_publish(TIMEOUT)
        assert expect(w, "over ws") == ("paho/ws/down", b"to the websocket", 1, False)
        w.publish("paho/ws/up", b"from the websocket", qos=1).wait_for_publish(TIMEOUT)
        assert expect(t, "over tcp") == ("paho/ws/up", b"from the websocket", 1, False)
        stop(w)
        stop(t)

    check("3.1.1 over WebSocket, QoS 1 both ways with a TCP client", websocket)

sys.exit(1 if failures else 0)
