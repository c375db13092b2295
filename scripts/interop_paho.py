"""Interop checks with paho-mqtt (PyPI), an independent MQTT client.

Usage: python3 scripts/interop_paho.py HOST PORT

For MQTT 3.1 and 3.1.1: QoS 0/1/2 round trips, retained delivery with the retain flag, a will
published when the socket dies without DISCONNECT, and a persistent session that queues
messages while its client is away. Exits non-zero on the first failure.
"""

import queue
import sys
import time
import uuid

import paho.mqtt.client as mqtt

HOST, PORT = sys.argv[1], int(sys.argv[2])
TIMEOUT = 10


def client(level, client_id=None, clean=True, will=None):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"paho-{uuid.uuid4().hex[:12]}",
        clean_session=clean,
        protocol=level,
    )
    inbox = queue.Queue()
    connacks = queue.Queue()
    subacks = queue.Queue()
    c.on_message = lambda _c, _u, m: inbox.put((m.topic, m.payload, m.qos, m.retain))
    c.on_connect = lambda _c, _u, flags, rc, _p: connacks.put((flags.session_present, rc))
    c.on_subscribe = lambda _c, _u, mid, codes, _p: subacks.put(codes)
    if will:
        c.will_set(*will)
    c.connect(HOST, PORT, keepalive=30)
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

sys.exit(1 if failures else 0)
