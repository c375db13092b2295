#!/usr/bin/env python3
"""An LwM2M test device written here on aiocoap (PyPI), from the LwM2M 1.0/1.1 technical
specification, and checks of ShardMQ's LwM2M gateway with it: an MQTT application (paho-mqtt)
drives the device through JSON commands and every response, notification, register, update
and deregistration event is checked, with lifetime expiry and queue mode.

The device serves the Device object (3) and the Temperature object (3303). It runs in two
modes: a LwM2M 1.0 device that speaks TLV only (any other Accept or Content-Format gets 4.06
or 4.15) and a LwM2M 1.1 device that speaks SenML JSON only. TLV and SenML JSON are encoded
and decoded here, independently of the broker.

Usage: lwm2m_device.py LWM2M_PORT MQTT_PORT
(the broker runs with lwm2m.qmode_time_window = 2s and lwm2m.lifetime_min = 1s).
"""
import asyncio
import json
import queue
import struct
import sys
import threading
import time

import aiocoap
import aiocoap.resource as resource
import paho.mqtt.client as mqtt
from aiocoap import Code, Message

LWM2M, MQTT = int(sys.argv[1]), int(sys.argv[2])
TLV, SENML_JSON, LINK, TEXT = 11542, 110, 40, 0
failures = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))
    if not ok:
        failures.append(name)


# ---------------------------------------------------------------- formats, from the spec

def tlv_header(kind, ident, length):
    t = kind << 6
    out = b""
    if ident > 0xFF:
        t |= 0x20
        idb = struct.pack(">H", ident)
    else:
        idb = bytes([ident])
    if length < 8:
        t |= length
        lb = b""
    elif length < 0x100:
        t |= 0x08
        lb = bytes([length])
    elif length < 0x10000:
        t |= 0x10
        lb = struct.pack(">H", length)
    else:
        t |= 0x18
        lb = struct.pack(">I", length)[1:]
    return bytes([t]) + idb + lb + out


def tlv_value(kind, value):
    if kind in ("Integer", "Time"):
        for size, fmt in ((1, ">b"), (2, ">h"), (4, ">i"), (8, ">q")):
            try:
                return struct.pack(fmt, value)
            except struct.error:
                continue
    if kind == "Float":
        return struct.pack(">d", value)
    if kind == "Boolean":
        return bytes([1 if value else 0])
    return value.encode()


def tlv_resource(rid, kind, value):
    v = tlv_value(kind, value)
    return tlv_header(3, rid, len(v)) + v


def tlv_decode(b):
    """[(kind, id, value-bytes or children)]"""
    out = []
    i = 0
    while i < len(b):
        t = b[i]
        kind = t >> 6
        idlen = 2 if t & 0x20 else 1
        ident = int.from_bytes(b[i + 1:i + 1 + idlen], "big")
        ll = (t >> 3) & 3
        j = i + 1 + idlen
        if ll == 0:
            length = t & 7
        else:
            length = int.from_bytes(b[j:j + ll], "big")
            j += ll
        body = b[j:j + length]
        out.append((kind, ident, tlv_decode(body) if kind in (0, 2) else body))
        i = j + length
    return out


def tlv_parse(kind, raw):
    if kind in ("Integer", "Time"):
        return int.from_bytes(raw, "big", signed=True)
    if kind == "Float":
        return struct.unpack(">d" if len(raw) == 8 else ">f", raw)[0]
    if kind == "Boolean":
        return raw == b"\x01"
    return raw.decode()


def senml(base, items):
    """items: [(name, kind, value)]"""
    out = []
    for n, (name, kind, value) in enumerate(items):
        r = {"n": name}
        if n == 0:
            r["bn"] = base
        if kind in ("Integer", "Time", "Float"):
            r["v"] = value
        elif kind == "Boolean":
            r["vb"] = value
        else:
            r["vs"] = value
        out.append(r)
    return json.dumps(out).encode()


def senml_decode(b):
    """{full path: value}"""
    out, bn = {}, ""
    for r in json.loads(b):
        bn = r.get("bn", bn)
        name = bn + r.get("n", "")
        for k in ("v", "vs", "vb"):
            if k in r:
                out[name] = r[k]
    return out


# ---------------------------------------------------------------- the device

DEFS = {
    3: {0: "String", 1: "String", 2: "String", 3: "String", 9: "Integer", 13: "Time", 14: "String", 16: "String"},
    3303: {5700: "Float", 5701: "String", 5750: "String"},
}


class Model:
    def __init__(self, mode):
        self.mode = mode  # "tlv10" or "senml11"
        self.instances = {
            (3, 0): {0: "Open Mobile Alliance", 1: "Lightweight M2M Client", 2: "345000123", 3: "1.0",
                     9: 100, 13: 1367491215, 14: "+02:00", 16: "U"},
            (3303, 0): {5700: 20.5, 5701: "Cel", 5750: "kitchen"},
        }
        self.executed = []
        self.attrs = {}
        self.requests = []
        self.write_formats = []

    def fmt(self):
        return TLV if self.mode == "tlv10" else SENML_JSON

    def encode(self, path, only=None):
        """The content of path ((o,), (o,i) or (o,i,r)) in this device's one format."""
        o = path[0]
        insts = [(k, v) for k, v in sorted(self.instances.items()) if k[0] == o and (len(path) < 2 or k[1] == path[1])]
        if self.mode == "tlv10":
            if len(path) == 3:
                return tlv_resource(path[2], DEFS[o][path[2]], insts[0][1][path[2]])
            body = b""
            for (_, i), res in insts:
                inner = b"".join(tlv_resource(r, DEFS[o][r], v) for r, v in sorted(res.items()))
                body += tlv_header(0, i, len(inner)) + inner if len(path) == 1 else inner
            return body
        items = []
        base = "/" + "/".join(map(str, path)) + "/"
        for (_, i), res in insts:
            for r, v in sorted(res.items()):
                if len(path) == 3 and r != path[2]:
                    continue
                name = {1: f"{i}/{r}", 2: f"{r}", 3: ""}[len(path)]
                items.append((name, DEFS[o][r], v))
        if len(path) == 3:
            base = base.rstrip("/")
        return senml(base, items)

    def apply(self, path, payload, fmt):
        """Writes the payload to path; False if it does not fit."""
        o, i = path[0], path[1]
        inst = self.instances.setdefault((o, i), {})
        if fmt == TLV:
            for kind, ident, val in tlv_decode(payload):
                if kind == 3:
                    inst[ident] = tlv_parse(DEFS[o].get(ident, "String"), val)
                elif kind == 0:
                    for _, rid, v in val:
                        self.instances.setdefault((o, ident), {})[rid] = tlv_parse(DEFS[o].get(rid, "String"), v)
        else:
            for name, v in senml_decode(payload).items():
                parts = [int(p) for p in name.strip("/").split("/")]
                self.instances.setdefault((parts[0], parts[1]), {})[parts[2]] = v
        return True


class Node(resource.ObservableResource):
    def __init__(self, model, path):
        super().__init__()
        self.model, self.path = model, path

    async def render_get(self, request):
        m = self.model
        m.requests.append(("GET", self.path, request.opt.accept))
        accept = request.opt.accept
        if accept is not None and int(accept) == LINK:
            links = [f"</{'/'.join(map(str, self.path))}>"]
            inst = m.instances.get(tuple(self.path[:2]), {})
            links += [f"</{self.path[0]}/{self.path[1]}/{r}>" for r in sorted(inst)] if len(self.path) == 2 else []
            return Message(payload=",".join(links).encode(), content_format=LINK)
        if accept is not None and int(accept) != m.fmt():
            return Message(code=Code.NOT_ACCEPTABLE)
        if len(self.path) >= 2 and tuple(self.path[:2]) not in m.instances:
            return Message(code=Code.NOT_FOUND)
        return Message(payload=m.encode(tuple(self.path)), content_format=m.fmt())

    async def render_put(self, request):
        m = self.model
        m.requests.append(("PUT", self.path, request.opt.content_format))
        if request.opt.uri_query:
            m.attrs[tuple(self.path)] = list(request.opt.uri_query)
            return Message(code=Code.CHANGED)
        cf = request.opt.content_format
        m.write_formats.append(cf and int(cf))
        if cf is None or int(cf) != m.fmt():
            return Message(code=Code.UNSUPPORTED_CONTENT_FORMAT)
        m.apply(self.path, request.payload, int(cf))
        if self.path == [3303, 0, 5700]:
            self.updated_state()
        return Message(code=Code.CHANGED)

    async def render_post(self, request):
        m = self.model
        m.requests.append(("POST", self.path, request.opt.content_format))
        if len(self.path) == 3:
            m.executed.append((tuple(self.path), request.payload.decode()))
            return Message(code=Code.CHANGED)
        cf = request.opt.content_format
        if cf is None or int(cf) != m.fmt():
            return Message(code=Code.UNSUPPORTED_CONTENT_FORMAT)
        if len(self.path) == 1:
            # Create: the new instance's id from the payload.
            before = set(m.instances)
            if int(cf) == TLV:
                m.apply([self.path[0], 0], request.payload, TLV)
            else:
                m.apply([self.path[0], 0], request.payload, int(cf))
            new = sorted(set(m.instances) - before)
            if not new:
                return Message(code=Code.BAD_REQUEST)
            o, i = new[0]
            self.site.add_resource([str(o), str(i)], Node(m, [o, i]))
            for r in m.instances[(o, i)]:
                self.site.add_resource([str(o), str(i), str(r)], Node(m, [o, i, r]))
            return Message(code=Code.CREATED, location_path=(str(o), str(i)))
        m.apply(self.path, request.payload, int(cf))
        return Message(code=Code.CHANGED)

    async def render_delete(self, request):
        m = self.model
        m.requests.append(("DELETE", self.path, None))
        key = tuple(self.path[:2])
        if key not in m.instances:
            return Message(code=Code.NOT_FOUND)
        del m.instances[key]
        return Message(code=Code.DELETED)


class Device:
    def __init__(self, name, mode, binding="U", lifetime=300):
        self.name, self.mode, self.binding, self.lifetime = name, mode, binding, lifetime
        self.model = Model(mode)
        self.site = resource.Site()
        self.nodes = {}
        for (o, i), res in self.model.instances.items():
            for p in ([o], [o, i]) + tuple([o, i, r] for r in list(res) + ([4] if o == 3 else [])):
                if tuple(p) in self.nodes:
                    continue
                n = Node(self.model, p)
                n.site = self.site
                self.nodes[tuple(p)] = n
                self.site.add_resource([str(x) for x in p], n)
        self.ctx = None
        self.location = None

    async def start(self):
        self.ctx = await aiocoap.Context.create_server_context(self.site, bind=("127.0.0.1", 0))

    async def register(self, objects="</1/0>,</3/0>,</3303/0>"):
        version = "1.0" if self.mode == "tlv10" else "1.1"
        uri = f"coap://127.0.0.1:{LWM2M}/rd?ep={self.name}&lt={self.lifetime}&lwm2m={version}&b={self.binding}"
        resp = await self.ctx.request(Message(code=Code.POST, uri=uri, payload=objects.encode(), content_format=LINK)).response
        self.location = "/".join(resp.opt.location_path)
        return resp.code

    async def update(self, objects=None):
        uri = f"coap://127.0.0.1:{LWM2M}/{self.location}"
        msg = Message(code=Code.POST, uri=uri)
        if objects:
            msg.payload = objects.encode()
            msg.opt.content_format = LINK
        return (await self.ctx.request(msg).response).code

    async def deregister(self):
        uri = f"coap://127.0.0.1:{LWM2M}/{self.location}"
        return (await self.ctx.request(Message(code=Code.DELETE, uri=uri)).response).code

    def temperature(self, value):
        self.model.instances[(3303, 0)][5700] = value
        self.nodes[(3303, 0, 5700)].updated_state()

    async def stop(self):
        await self.ctx.shutdown()


# ---------------------------------------------------------------- the MQTT application

class App:
    def __init__(self):
        self.q = queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="lwm2m-app")
        self.c.on_message = lambda _c, _u, m: self.q.put((m.topic, json.loads(m.payload)))
        self.c.connect("127.0.0.1", MQTT, 60)
        self.c.loop_start()
        self.c.subscribe([("lwm2m/+/response", 0), ("lwm2m/+/notify", 0), ("lwm2m/+/register", 0),
                          ("lwm2m/+/update", 0), ("$SYS/broker/clients/+/disconnected", 0)])
        time.sleep(0.3)

    def command(self, ep, cmd):
        self.c.publish(f"lwm2m/{ep}/command", json.dumps(cmd), 0)

    async def next(self, topic_end, timeout=8):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                t, m = self.q.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.02)
                continue
            # An "ack" (the device will answer separately) is not the response itself.
            if t.endswith(topic_end) and m.get("msgType") != "ack":
                return m
        return None

    async def ask(self, ep, cmd, timeout=8):
        self.command(ep, cmd)
        return await self.next(f"{ep}/response", timeout)


async def tlv10(app):
    d = Device("dev-tlv", "tlv10")
    await d.start()
    code = await d.register()
    check("1.0 device: Register answered 2.01", code == Code.CREATED, code)
    reg = await app.next("dev-tlv/register")
    check("register event with the object list",
          reg and reg["data"]["objectList"] == ["/1/0", "/3/0", "/3303/0"] and reg["data"]["lwm2m"] == "1.0", reg)
    r = await app.ask("dev-tlv", {"reqID": 1, "msgType": "read", "data": {"path": "/3/0"}})
    content = {c["path"]: c["value"] for c in (r or {}).get("data", {}).get("content", [])}
    check("read /3/0 in TLV, typed by the object definitions",
          r and r["data"]["code"] == "2.05" and content.get("/3/0/0") == "Open Mobile Alliance"
          and content.get("/3/0/9") == 100 and content.get("/3/0/13") == 1367491215, r)
    check("the gateway asked a 1.0 device for TLV", d.model.requests[-1] == ("GET", [3, 0], TLV), d.model.requests[-1:])
    r = await app.ask("dev-tlv", {"reqID": 2, "msgType": "write", "data": {"path": "/3/0/14", "type": "String", "value": "+05:30"}})
    check("write answered 2.04 changed", r and r["data"]["code"] == "2.04" and r["data"]["codeMsg"] == "changed", r)
    check("the device holds the written value", d.model.instances[(3, 0)][14] == "+05:30", d.model.instances[(3, 0)])
    r = await app.ask("dev-tlv", {"reqID": 3, "msgType": "write", "data": {"basePath": "/3303/0", "content": [
        {"path": "5750", "type": "String", "value": "cellar"}, {"path": "5701", "type": "String", "value": "K"}]}})
    check("batch write (partial update)", r and r["data"]["code"] == "2.04" and d.model.instances[(3303, 0)][5750] == "cellar", r)
    r = await app.ask("dev-tlv", {"reqID": 4, "msgType": "execute", "data": {"path": "/3/0/4", "args": "5"}})
    check("execute answered 2.04, the device ran it with its arguments",
          r and r["data"]["code"] == "2.04" and d.model.executed == [((3, 0, 4), "5")], (r, d.model.executed))
    r = await app.ask("dev-tlv", {"reqID": 5, "msgType": "discover", "data": {"path": "/3/0"}})
    check("discover gives the links", r and "</3/0/9>" in r["data"]["content"], r)
    r = await app.ask("dev-tlv", {"reqID": 6, "msgType": "write-attr", "data": {"path": "/3303/0/5700", "pmin": "1", "pmax": "5"}})
    check("write-attr in the query", r and r["data"]["code"] == "2.04" and d.model.attrs.get((3303, 0, 5700)) == ["pmin=1", "pmax=5"], (r, d.model.attrs))
    r = await app.ask("dev-tlv", {"reqID": 7, "msgType": "observe", "data": {"path": "/3303/0/5700"}})
    check("observe answered with the current value",
          r and r["msgType"] == "observe" and r["data"]["content"] == [{"path": "/3303/0/5700", "value": 20.5}], r)
    d.temperature(21.5)
    n1 = await app.next("dev-tlv/notify")
    d.temperature(22.5)
    n2 = await app.next("dev-tlv/notify")
    check("notifications with growing sequence numbers",
          n1 and n2 and n1["data"]["content"][0]["value"] == 21.5 and n2["data"]["content"][0]["value"] == 22.5
          and n2["seqNum"] > n1["seqNum"] and n1["reqID"] == 7, (n1, n2))
    r = await app.ask("dev-tlv", {"reqID": 8, "msgType": "cancel-observe", "data": {"path": "/3303/0/5700"}})
    check("cancel-observe answered", r and r["msgType"] == "cancel-observe" and r["data"]["code"] == "2.05", r)
    d.temperature(23.5)
    check("no notification after the cancel", await app.next("dev-tlv/notify", timeout=1.5) is None)
    r = await app.ask("dev-tlv", {"reqID": 9, "msgType": "create", "data": {"basePath": "/3303", "content": [
        {"path": "1/5700", "type": "Float", "value": "18.0"}]}})
    check("create answered 2.01 with the new instance", r and r["data"]["code"] == "2.01" and (3303, 1) in d.model.instances, r)
    r = await app.ask("dev-tlv", {"reqID": 10, "msgType": "delete", "data": {"path": "/3303/1"}})
    check("delete answered 2.02", r and r["data"]["code"] == "2.02" and (3303, 1) not in d.model.instances, r)
    r = await app.ask("dev-tlv", {"reqID": 11, "msgType": "read", "data": {"path": "/3/0/99"}})
    check("a read the device cannot serve: 4.04", r and r["data"]["code"] == "4.04", r)
    r = await app.ask("dev-tlv", {"reqID": 12, "msgType": "reboot"})
    check("a malformed command gets a 4.00 response", r and r["data"]["code"] == "4.00" and "error" in r["data"], r)
    code = await d.update("</1/0>,</3/0>,</3303/0>,</3304/0>")
    upd = await app.next("dev-tlv/update")
    check("update answered 2.04 with its event", code == Code.CHANGED and upd and "/3304/0" in upd["data"]["objectList"], (code, upd))
    code = await d.deregister()
    gone = await app.next("dev-tlv/disconnected")
    check("deregistration answered 2.02; the session ends normally",
          code == Code.DELETED and gone and gone.get("reason") == "normal", (code, gone))
    await d.stop()


async def senml11(app):
    d = Device("dev-senml", "senml11")
    await d.start()
    await d.register()
    await app.next("dev-senml/register")
    r = await app.ask("dev-senml", {"reqID": 1, "msgType": "read", "data": {"path": "/3303/0/5700"}})
    accepts = [a and int(a) for (m, p, a) in d.model.requests if m == "GET"]
    check("1.1 SenML-JSON-only device: asked SenML CBOR, refused 4.06, then SenML JSON",
          accepts[:2] == [112, SENML_JSON], accepts)
    check("its reply decoded", r and r["data"]["content"] == [{"path": "/3303/0/5700", "value": 20.5}], r)
    r = await app.ask("dev-senml", {"reqID": 2, "msgType": "read", "data": {"path": "/3/0"}})
    accepts = [a and int(a) for (m, p, a) in d.model.requests if m == "GET"]
    check("remembered: the next read asks for SenML JSON at once", accepts[-1] == SENML_JSON, accepts)
    content = {c["path"]: c["value"] for c in (r or {}).get("data", {}).get("content", [])}
    check("an instance in SenML JSON", content.get("/3/0/1") == "Lightweight M2M Client", r)
    r = await app.ask("dev-senml", {"reqID": 3, "msgType": "write", "data": {"path": "/3303/0/5750", "type": "String", "value": "attic"}})
    check("a write in SenML JSON", r and r["data"]["code"] == "2.04" and d.model.write_formats[-1] == SENML_JSON
          and d.model.instances[(3303, 0)][5750] == "attic", (r, d.model.write_formats))
    await d.deregister()
    await d.stop()


async def lifetime(app):
    d = Device("dev-short", "tlv10", lifetime=2)
    await d.start()
    await d.register()
    await app.next("dev-short/register")
    gone = await app.next("dev-short/disconnected", timeout=8)
    check("a registration past its lifetime ends", gone is not None, gone)
    await d.stop()


async def queue_mode(app):
    d = Device("dev-queue", "tlv10", binding="UQ")
    await d.start()
    await d.register()
    await app.next("dev-queue/register")
    await asyncio.sleep(2.5)  # past lwm2m.qmode_time_window (2 s)
    app.command("dev-queue", {"reqID": 1, "msgType": "read", "data": {"path": "/3/0/9"}})
    await asyncio.sleep(1.0)
    check("queue mode: a command for a sleeping device waits", not any(m == "GET" for (m, _, _) in d.model.requests), d.model.requests)
    await d.update()
    r = await app.next("dev-queue/response")
    check("queue mode: its Update brings the command", r and r["data"]["content"] == [{"path": "/3/0/9", "value": 100}], r)
    await d.deregister()
    await d.stop()


async def main():
    app = App()
    await tlv10(app)
    await senml11(app)
    await lifetime(app)
    await queue_mode(app)
    app.c.loop_stop()


asyncio.run(main())
if failures:
    print(f"{len(failures)} LwM2M check(s) failed: {failures}")
    sys.exit(1)
print("all LwM2M checks passed")
