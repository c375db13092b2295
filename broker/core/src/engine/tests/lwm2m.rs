//! The LwM2M server on the simulated cluster (gateway on shard 0) with a device written here
//! from RFC 7252 and the LwM2M specification: registration, update from a new address,
//! de-registration and expiry; commands of every type and their JSON responses; content
//! negotiation with a SenML-JSON-only device; observe and notifications; separate responses,
//! retransmission and time-outs; block-wise replies; queue mode; refusals. Endpoint names
//! owned by the gateway's shard and by the other.

use super::*;
use crate::gateway::lwm2m::coap::{self as c, code};
use crate::gateway::lwm2m::registry::Registry;
use crate::gateway::lwm2m::server::{Lwm2mGateway, Lwm2mSettings, Lwm2mTopics};
use serde_json::{json, Value as Json};
use shardmq_protocol::lwm2m::coap_lite::{CoapOption, MessageClass, MessageType, Packet};
use shardmq_protocol::lwm2m::{format, tlv};
use std::collections::HashMap;

fn registry() -> Arc<Registry> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/lwm2m_xml");
    let mut r = Registry::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "xml") {
            r.load_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        }
    }
    Arc::new(r)
}

fn settings() -> Lwm2mSettings {
    Lwm2mSettings {
        listener: 1,
        lifetime_min: 1,
        lifetime_max: 86_400,
        qmode_time_window: Duration::from_secs(10),
        auto_observe: false,
        topics: Lwm2mTopics {
            command: "lwm2m/%e/command".into(),
            response: "lwm2m/%e/response".into(),
            notify: "lwm2m/%e/notify".into(),
            register: "lwm2m/%e/register".into(),
            update: "lwm2m/%e/update".into(),
        },
        update_always: false,
        ack_timeout: Duration::from_secs(2),
        max_retransmit: 2,
        max_endpoints: 100,
        max_queued: 4,
        max_payload: 4096,
        seed: 0x5eed,
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Lw {
    gw: Lwm2mGateway,
    inbox: HashMap<u16, Vec<Packet>>,
    next_id: u16,
}

impl Lw {
    fn new(cl: &mut Cluster, s: Lwm2mSettings) -> Lw {
        cl.engines[0].set_listener_protocol(
            1,
            crate::engine::ListenerProtocol {
                name: "LwM2M",
                version: 1,
                idle_timeout: Duration::from_secs(5),
            },
        );
        Lw {
            gw: Lwm2mGateway::new(s, registry()),
            inbox: HashMap::new(),
            next_id: 100,
        }
    }

    fn settle(&mut self, cl: &mut Cluster) {
        for _ in 0..4 {
            cl.settle();
            self.gw.poll_all(&mut cl.engines[0], cl.now);
        }
        cl.settle();
        while let Some((to, d)) = self.gw.pop_datagram(&mut cl.engines[0]) {
            let p = c::parse(&d).expect("the gateway sent bad CoAP");
            self.inbox.entry(to.port()).or_default().push(p);
        }
    }

    fn send(&mut self, cl: &mut Cluster, port: u16, p: &Packet) {
        self.gw
            .handle_datagram(&mut cl.engines[0], addr(port), &c::encode(p), None, cl.now);
        self.settle(cl);
    }

    fn recv(&mut self, cl: &mut Cluster, port: u16) -> Vec<Packet> {
        self.settle(cl);
        self.inbox.remove(&port).unwrap_or_default()
    }

    fn one(&mut self, cl: &mut Cluster, port: u16) -> Packet {
        let mut got = self.recv(cl, port);
        assert_eq!(got.len(), 1, "{got:?}");
        got.remove(0)
    }

    fn advance(&mut self, cl: &mut Cluster, d: Duration) {
        cl.advance(d);
        self.gw.tick(&mut cl.engines[0], cl.now);
        self.settle(cl);
    }

    fn id(&mut self) -> u16 {
        self.next_id += 1;
        self.next_id
    }

    /// A device's confirmable request.
    fn device_request(
        &mut self,
        method: u8,
        path: &[&str],
        query: &[&str],
        payload: &[u8],
    ) -> Packet {
        let id = self.id();
        let mut p = c::request(
            method,
            id,
            &[0xD0, id as u8],
            &path.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        for q in query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        p.payload = payload.to_vec();
        p
    }

    /// Registers `ep` from `port`; returns the location's id.
    fn register(
        &mut self,
        cl: &mut Cluster,
        port: u16,
        ep: &str,
        query: &[&str],
        objects: &str,
    ) -> String {
        let mut q = vec![format!("ep={ep}")];
        q.extend(query.iter().map(|s| s.to_string()));
        let q: Vec<&str> = q.iter().map(String::as_str).collect();
        let req = self.device_request(code::POST, &["rd"], &q, objects.as_bytes());
        self.send(cl, port, &req);
        let ack = self.one(cl, port);
        assert_eq!(c::code_of(&ack), code::CREATED, "{ack:?}");
        assert_eq!(ack.header.message_id, req.header.message_id);
        let loc: Vec<String> = ack
            .get_option(CoapOption::LocationPath)
            .unwrap()
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        assert_eq!(loc[0], "rd");
        loc[1].clone()
    }

    /// The device answers request `req` with `code`, content `payload` in format `fmt`.
    fn answer(
        &mut self,
        cl: &mut Cluster,
        port: u16,
        req: &Packet,
        code: u8,
        fmt: Option<u16>,
        payload: &[u8],
    ) {
        let mut r = c::response(req, code);
        if let Some(f) = fmt {
            c::set_uint(&mut r, CoapOption::ContentFormat, u32::from(f));
        }
        r.payload = payload.to_vec();
        self.send(cl, port, &r);
    }
}

fn path_of(p: &Packet) -> String {
    format!("/{}", c::uri_path(p).join("/"))
}

/// An MQTT application: watches `lwm2m/<ep>/#` and publishes commands.
struct App {
    c: Client,
}

impl App {
    fn new(cl: &mut Cluster, ep: &str) -> App {
        let c = steady(cl, &format!("app-{ep}"));
        cl.subscribe(c, &[(&format!("lwm2m/{ep}/#"), QoS::AtMostOnce)]);
        App { c }
    }

    fn command(&self, cl: &mut Cluster, ep: &str, cmd: Json) {
        cl.publish(
            self.c,
            &format!("lwm2m/{ep}/command"),
            &cmd.to_string(),
            QoS::AtMostOnce,
            false,
            0,
        );
    }

    /// (topic suffix, JSON) of what the gateway published (its own commands left out).
    fn got(&self, cl: &mut Cluster) -> Vec<(String, Json)> {
        publishes(&cl.recv(self.c))
            .into_iter()
            .filter(|(t, ..)| !t.ends_with("/command"))
            .map(|(t, p, ..)| {
                (
                    t.rsplit('/').next().unwrap().to_string(),
                    serde_json::from_str(&p).unwrap(),
                )
            })
            .collect()
    }

    fn one(&self, cl: &mut Cluster) -> (String, Json) {
        let mut g = self.got(cl);
        assert_eq!(g.len(), 1, "{g:?}");
        g.remove(0)
    }
}

const DEVICE_TLV: &str = "C800144F70656E204D6F62696C6520416C6C69616E6365C303312E30C10964";

fn hex(s: &str) -> Vec<u8> {
    shardmq_protocol::lwm2m::from_hex(s).unwrap()
}

#[test]
fn a_device_registers_is_read_written_and_executed_with_its_name_owned_anywhere() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut lw = Lw::new(&mut cl, settings());
        let ep = id_owned_by(&format!("dev{owner}-"), owner, 2);
        let app = App::new(&mut cl, &ep);
        let reg = lw.device_request(
            code::POST,
            &["rd"],
            &[&format!("ep={ep}"), "lt=300", "lwm2m=1.0", "b=U"],
            b"</1/0>,</3/0>",
        );
        lw.send(&mut cl, 5000, &reg);
        let ack = lw.one(&mut cl, 5000);
        assert_eq!(c::code_of(&ack), code::CREATED);
        // Its retransmission gets the same answer, and registers nothing more.
        lw.send(&mut cl, 5000, &reg);
        assert_eq!(lw.one(&mut cl, 5000), ack);
        let (topic, event) = app.one(&mut cl);
        assert_eq!(topic, "register");
        assert_eq!(
            event,
            json!({"msgType": "register", "data": {"ep": ep, "lt": 300, "lwm2m": "1.0", "b": "U", "alternatePath": "/", "objectList": ["/1/0", "/3/0"]}})
        );
        // Read: GET with Accept TLV (a 1.0 device); the reply typed by the definitions.
        app.command(
            &mut cl,
            &ep,
            json!({"reqID": 7, "msgType": "read", "data": {"path": "/3/0"}}),
        );
        let get = lw.one(&mut cl, 5000);
        assert_eq!(
            (c::code_of(&get), path_of(&get)),
            (code::GET, "/3/0".to_string())
        );
        assert_eq!(
            c::uint_option(&get, CoapOption::Accept),
            Some(u32::from(format::TLV))
        );
        lw.answer(
            &mut cl,
            5000,
            &get,
            code::CONTENT,
            Some(format::TLV),
            &hex(DEVICE_TLV),
        );
        assert_eq!(
            lw.recv(&mut cl, 5000).len(),
            0,
            "a piggybacked answer needs no ACK"
        );
        let (topic, resp) = app.one(&mut cl);
        assert_eq!(topic, "response");
        assert_eq!(
            resp,
            json!({"reqID": 7, "msgType": "read", "data": {"reqPath": "/3/0", "code": "2.05", "codeMsg": "content", "content": [
                {"path": "/3/0/0", "value": "Open Mobile Alliance"},
                {"path": "/3/0/3", "value": "1.0"},
                {"path": "/3/0/9", "value": 100}
            ]}})
        );
        // Write: PUT with a TLV payload.
        app.command(&mut cl, &ep, json!({"reqID": 8, "msgType": "write", "data": {"path": "/3/0/13", "type": "Time", "value": "1367491215"}}));
        let put = lw.one(&mut cl, 5000);
        assert_eq!(c::code_of(&put), code::PUT);
        assert_eq!(put.payload, hex("C40D5182428F"));
        assert_eq!(
            c::uint_option(&put, CoapOption::ContentFormat),
            Some(u32::from(format::TLV))
        );
        lw.answer(&mut cl, 5000, &put, code::CHANGED, None, b"");
        assert_eq!(
            app.one(&mut cl).1["data"],
            json!({"reqPath": "/3/0/13", "code": "2.04", "codeMsg": "changed"})
        );
        // Batch write on an instance: POST (partial update).
        app.command(&mut cl, &ep, json!({"reqID": 9, "msgType": "write", "data": {"basePath": "/3/0", "content": [
            {"path": "14", "type": "String", "value": "+01:00"}, {"path": "/3/0/15", "type": "String", "value": "Europe/Paris"}]}}));
        let post = lw.one(&mut cl, 5000);
        assert_eq!(
            (c::code_of(&post), path_of(&post)),
            (code::POST, "/3/0".to_string())
        );
        let entries = tlv::decode(&post.payload).unwrap();
        assert_eq!(entries.iter().map(|t| t.id).collect::<Vec<_>>(), [14, 15]);
        lw.answer(&mut cl, 5000, &post, code::CHANGED, None, b"");
        app.one(&mut cl);
        // Execute with arguments, write-attributes, discover, create, delete.
        app.command(
            &mut cl,
            &ep,
            json!({"reqID": 10, "msgType": "execute", "data": {"path": "/3/0/4", "args": "0='x'"}}),
        );
        let exec = lw.one(&mut cl, 5000);
        assert_eq!(
            (c::code_of(&exec), exec.payload.as_slice()),
            (code::POST, &b"0='x'"[..])
        );
        lw.answer(&mut cl, 5000, &exec, code::CHANGED, None, b"");
        assert_eq!(app.one(&mut cl).1["msgType"], "execute");
        app.command(&mut cl, &ep, json!({"reqID": 11, "msgType": "write-attr", "data": {"path": "/3/0/9", "pmin": "5", "pmax": "60"}}));
        let attr = lw.one(&mut cl, 5000);
        assert_eq!(
            c::uri_query(&attr),
            [
                ("pmin".to_string(), "5".to_string()),
                ("pmax".to_string(), "60".to_string())
            ]
        );
        lw.answer(&mut cl, 5000, &attr, code::CHANGED, None, b"");
        app.one(&mut cl);
        app.command(
            &mut cl,
            &ep,
            json!({"reqID": 12, "msgType": "discover", "data": {"path": "/3/0"}}),
        );
        let disc = lw.one(&mut cl, 5000);
        assert_eq!(
            c::uint_option(&disc, CoapOption::Accept),
            Some(u32::from(format::LINK))
        );
        lw.answer(
            &mut cl,
            5000,
            &disc,
            code::CONTENT,
            Some(format::LINK),
            b"</3/0>;pmin=10,</3/0/0>,</3/0/9>",
        );
        assert_eq!(
            app.one(&mut cl).1["data"]["content"],
            json!(["</3/0>;pmin=10", "</3/0/0>", "</3/0/9>"])
        );
        app.command(&mut cl, &ep, json!({"reqID": 13, "msgType": "create", "data": {"basePath": "/3303", "content": [{"path": "0/5700", "type": "Float", "value": "21.5"}]}}));
        let create = lw.one(&mut cl, 5000);
        assert_eq!(
            (c::code_of(&create), path_of(&create)),
            (code::POST, "/3303".to_string())
        );
        let mut created = c::response(&create, code::CREATED);
        created.add_option(CoapOption::LocationPath, b"3303".to_vec());
        created.add_option(CoapOption::LocationPath, b"0".to_vec());
        lw.send(&mut cl, 5000, &created);
        assert_eq!(app.one(&mut cl).1["data"]["location"], "/3303/0");
        app.command(
            &mut cl,
            &ep,
            json!({"reqID": 14, "msgType": "delete", "data": {"path": "/3303/0"}}),
        );
        let del = lw.one(&mut cl, 5000);
        assert_eq!(c::code_of(&del), code::DELETE);
        lw.answer(&mut cl, 5000, &del, code::DELETED, None, b"");
        assert_eq!(app.one(&mut cl).1["data"]["codeMsg"], "deleted");
        // The client list names the protocol.
        let page = cl.engines[0].list_clients(
            &crate::engine::admin::ClientFilter::default(),
            crate::engine::admin::Window { skip: 0, take: 10 },
        );
        let me = page
            .items
            .iter()
            .find(|i| i.clientid == ep)
            .expect("listed");
        assert_eq!(me.proto_name, Some("LwM2M"));
        assert_eq!(lw.gw.endpoint_count(), 1);
    }
}

#[test]
fn a_senml_json_only_device_is_asked_again_and_remembered() {
    let mut cl = Cluster::new(2);
    let mut lw = Lw::new(&mut cl, settings());
    let app = App::new(&mut cl, "v11");
    lw.register(
        &mut cl,
        5000,
        "v11",
        &["lt=300", "lwm2m=1.1"],
        "</3/0>,</3303/0>",
    );
    app.got(&mut cl);
    app.command(
        &mut cl,
        "v11",
        json!({"reqID": 1, "msgType": "read", "data": {"path": "/3303/0/5700"}}),
    );
    // SenML CBOR first (1.1), refused; SenML JSON, accepted.
    let first = lw.one(&mut cl, 5000);
    assert_eq!(
        c::uint_option(&first, CoapOption::Accept),
        Some(u32::from(format::SENML_CBOR))
    );
    lw.answer(&mut cl, 5000, &first, code::NOT_ACCEPTABLE, None, b"");
    let second = lw.one(&mut cl, 5000);
    assert_eq!(
        c::uint_option(&second, CoapOption::Accept),
        Some(u32::from(format::SENML_JSON))
    );
    assert_ne!(second.get_token(), first.get_token());
    lw.answer(
        &mut cl,
        5000,
        &second,
        code::CONTENT,
        Some(format::SENML_JSON),
        br#"[{"bn":"/3303/0/5700","v":21.5}]"#,
    );
    assert_eq!(
        app.one(&mut cl).1["data"]["content"],
        json!([{"path": "/3303/0/5700", "value": 21.5}])
    );
    // Remembered: the next read asks for SenML JSON at once; a write uses it too.
    app.command(
        &mut cl,
        "v11",
        json!({"reqID": 2, "msgType": "read", "data": {"path": "/3/0/0"}}),
    );
    let again = lw.one(&mut cl, 5000);
    assert_eq!(
        c::uint_option(&again, CoapOption::Accept),
        Some(u32::from(format::SENML_JSON))
    );
    lw.answer(
        &mut cl,
        5000,
        &again,
        code::CONTENT,
        Some(format::SENML_JSON),
        br#"[{"bn":"/3/0/0","vs":"ACME"}]"#,
    );
    app.one(&mut cl);
    app.command(&mut cl, "v11", json!({"reqID": 3, "msgType": "write", "data": {"path": "/3303/0/5750", "type": "String", "value": "kitchen"}}));
    let put = lw.one(&mut cl, 5000);
    assert_eq!(
        c::uint_option(&put, CoapOption::ContentFormat),
        Some(u32::from(format::SENML_JSON))
    );
    let body: Json = serde_json::from_slice(&put.payload).unwrap();
    assert_eq!(
        body,
        json!([{"bn": "/3303/0/5750/", "n": "", "vs": "kitchen"}])
    );
    // A TLV-only 1.0 device refusing SenML on a write: 4.15, then TLV.
    let app2 = App::new(&mut cl, "tlv");
    lw.register(&mut cl, 5001, "tlv", &["lt=300"], "</3/0>");
    app2.got(&mut cl);
    app2.command(
        &mut cl,
        "tlv",
        json!({"reqID": 4, "msgType": "read", "data": {"path": "/3/0/9"}}),
    );
    let get = lw.one(&mut cl, 5001);
    assert_eq!(
        c::uint_option(&get, CoapOption::Accept),
        Some(u32::from(format::TLV))
    );
    lw.answer(
        &mut cl,
        5001,
        &get,
        code::CONTENT,
        Some(format::TEXT),
        b"87",
    );
    assert_eq!(
        app2.one(&mut cl).1["data"]["content"],
        json!([{"path": "/3/0/9", "value": 87}])
    );
}

#[test]
fn observe_notifications_and_cancel() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut lw = Lw::new(&mut cl, settings());
        let ep = id_owned_by(&format!("obs{owner}-"), owner, 2);
        let app = App::new(&mut cl, &ep);
        lw.register(&mut cl, 5000, &ep, &["lt=300"], "</3303/0>");
        app.got(&mut cl);
        app.command(
            &mut cl,
            &ep,
            json!({"reqID": 5, "msgType": "observe", "data": {"path": "/3303/0/5700"}}),
        );
        let obs = lw.one(&mut cl, 5000);
        assert_eq!(c::uint_option(&obs, CoapOption::Observe), Some(0));
        let mut first = c::response(&obs, code::CONTENT);
        c::set_uint(&mut first, CoapOption::Observe, 1);
        c::set_uint(
            &mut first,
            CoapOption::ContentFormat,
            u32::from(format::TEXT),
        );
        first.payload = b"20.5".to_vec();
        lw.send(&mut cl, 5000, &first);
        let (topic, r) = app.one(&mut cl);
        assert_eq!(
            (topic.as_str(), r["msgType"].as_str()),
            ("response", Some("observe"))
        );
        assert_eq!(
            r["data"]["content"],
            json!([{"path": "/3303/0/5700", "value": 20.5}])
        );
        // A confirmable notification: ACKed, published with its sequence number.
        let mut n = Packet::new();
        n.header.set_type(MessageType::Confirmable);
        n.header.message_id = 900;
        n.header.code = MessageClass::from(code::CONTENT);
        n.set_token(obs.get_token().to_vec());
        c::set_uint(&mut n, CoapOption::Observe, 2);
        c::set_uint(&mut n, CoapOption::ContentFormat, u32::from(format::TEXT));
        n.payload = b"21.0".to_vec();
        lw.send(&mut cl, 5000, &n);
        let ack = lw.one(&mut cl, 5000);
        assert_eq!(
            (ack.header.get_type(), ack.header.message_id),
            (MessageType::Acknowledgement, 900)
        );
        let (topic, notify) = app.one(&mut cl);
        assert_eq!(topic, "notify");
        assert_eq!(
            notify,
            json!({"reqID": 5, "msgType": "notify", "seqNum": 2, "data": {"reqPath": "/3303/0/5700", "code": "2.05", "codeMsg": "content", "content": [{"path": "/3303/0/5700", "value": 21.0}]}}),
            "owner {owner}"
        );
        // Its retransmission is ACKed again but published once.
        lw.send(&mut cl, 5000, &n);
        assert_eq!(lw.recv(&mut cl, 5000).len(), 1);
        assert_eq!(app.got(&mut cl).len(), 0);
        // Cancel: GET with Observe 1 and the same token.
        app.command(
            &mut cl,
            &ep,
            json!({"reqID": 6, "msgType": "cancel-observe", "data": {"path": "/3303/0/5700"}}),
        );
        let cancel = lw.one(&mut cl, 5000);
        assert_eq!(c::uint_option(&cancel, CoapOption::Observe), Some(1));
        assert_eq!(cancel.get_token(), obs.get_token());
        lw.answer(
            &mut cl,
            5000,
            &cancel,
            code::CONTENT,
            Some(format::TEXT),
            b"21.0",
        );
        assert_eq!(app.one(&mut cl).1["msgType"], "cancel-observe");
        // A notification for it now gets RST.
        n.header.message_id = 901;
        lw.send(&mut cl, 5000, &n);
        assert_eq!(lw.one(&mut cl, 5000).header.get_type(), MessageType::Reset);
        assert_eq!(app.got(&mut cl).len(), 0);
    }
}

#[test]
fn separate_responses_retransmission_and_time_outs() {
    let mut cl = Cluster::new(2);
    let mut lw = Lw::new(&mut cl, settings());
    let app = App::new(&mut cl, "slow");
    lw.register(&mut cl, 5000, "slow", &["lt=3000"], "</3/0>");
    app.got(&mut cl);
    // An empty ACK, then the answer in its own confirmable message.
    app.command(
        &mut cl,
        "slow",
        json!({"reqID": 1, "msgType": "read", "data": {"path": "/3/0/9"}}),
    );
    let get = lw.one(&mut cl, 5000);
    lw.send(
        &mut cl,
        5000,
        &c::empty(MessageType::Acknowledgement, get.header.message_id),
    );
    // The application learns the device has the command.
    assert_eq!(
        app.one(&mut cl).1,
        json!({"reqID": 1, "msgType": "ack", "data": {"reqPath": "/3/0/9"}})
    );
    lw.advance(&mut cl, Duration::from_secs(5));
    assert_eq!(
        lw.recv(&mut cl, 5000).len(),
        0,
        "acknowledged: not sent again"
    );
    let mut sep = Packet::new();
    sep.header.set_type(MessageType::Confirmable);
    sep.header.message_id = 77;
    sep.header.code = MessageClass::from(code::CONTENT);
    sep.set_token(get.get_token().to_vec());
    c::set_uint(&mut sep, CoapOption::ContentFormat, u32::from(format::TEXT));
    sep.payload = b"55".to_vec();
    lw.send(&mut cl, 5000, &sep);
    assert_eq!(
        lw.one(&mut cl, 5000).header.get_type(),
        MessageType::Acknowledgement
    );
    assert_eq!(
        app.one(&mut cl).1["data"]["content"],
        json!([{"path": "/3/0/9", "value": 55}])
    );
    // No answer at all: sent again after 2 s and 4 s, then 5.04.
    app.command(
        &mut cl,
        "slow",
        json!({"reqID": 2, "msgType": "read", "data": {"path": "/3/0/9"}}),
    );
    let get = lw.one(&mut cl, 5000);
    lw.advance(&mut cl, Duration::from_secs(2));
    assert_eq!(lw.one(&mut cl, 5000), get, "the same message again");
    lw.advance(&mut cl, Duration::from_secs(4));
    assert_eq!(lw.one(&mut cl, 5000), get);
    lw.advance(&mut cl, Duration::from_secs(8));
    let (_, r) = app.one(&mut cl);
    assert_eq!(
        (r["reqID"].as_i64(), r["data"]["code"].as_str()),
        (Some(2), Some("5.04"))
    );
    assert_eq!(cl.engines[0].metrics.lwm2m_retransmits, 2);
    assert_eq!(cl.engines[0].metrics.lwm2m_timeouts, 1);
    // A large reply in blocks: the gateway asks for each in turn and publishes the whole.
    app.command(
        &mut cl,
        "slow",
        json!({"reqID": 3, "msgType": "read", "data": {"path": "/3/0/0"}}),
    );
    let get = lw.one(&mut cl, 5000);
    let mut b0 = c::response(&get, code::CONTENT);
    c::set_uint(&mut b0, CoapOption::ContentFormat, u32::from(format::TEXT));
    c::set_uint(&mut b0, CoapOption::Block2, c::block2_value(0, 16) | 8);
    b0.payload = b"0123456789abcdef".to_vec();
    lw.send(&mut cl, 5000, &b0);
    let next = lw.one(&mut cl, 5000);
    assert_eq!(c::block2(&next), Some((1, false, 16)));
    let mut b1 = c::response(&next, code::CONTENT);
    c::set_uint(&mut b1, CoapOption::ContentFormat, u32::from(format::TEXT));
    c::set_uint(&mut b1, CoapOption::Block2, c::block2_value(1, 16));
    b1.payload = b"XYZ".to_vec();
    lw.send(&mut cl, 5000, &b1);
    assert_eq!(
        app.one(&mut cl).1["data"]["content"],
        json!([{"path": "/3/0/0", "value": "0123456789abcdefXYZ"}])
    );
}

#[test]
fn updates_follow_the_device_queue_mode_holds_commands_and_lifetimes_end() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut lw = Lw::new(&mut cl, settings());
        let ep = id_owned_by(&format!("q{owner}-"), owner, 2);
        let app = App::new(&mut cl, &ep);
        let loc = lw.register(&mut cl, 5000, &ep, &["lt=60", "b=UQ"], "</3/0>");
        app.got(&mut cl);
        // Within the window a command goes out; after it, it waits.
        lw.advance(&mut cl, Duration::from_secs(11));
        app.command(
            &mut cl,
            &ep,
            json!({"reqID": 1, "msgType": "read", "data": {"path": "/3/0/9"}}),
        );
        assert_eq!(lw.recv(&mut cl, 5000).len(), 0, "asleep: held");
        // An Update from a new address (NAT): answered, followed, the command sent there.
        let upd = lw.device_request(code::POST, &["rd", &loc], &["lt=120"], b"</3/0>,</3303/0>");
        lw.send(&mut cl, 6000, &upd);
        let got = lw.recv(&mut cl, 6000);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(c::code_of(&got[0]), code::CHANGED);
        assert_eq!(
            (c::code_of(&got[1]), path_of(&got[1])),
            (code::GET, "/3/0/9".to_string())
        );
        let (topic, event) = app.one(&mut cl);
        assert_eq!(topic, "update");
        assert_eq!(event["data"]["lt"], 120);
        assert_eq!(event["data"]["objectList"], json!(["/3/0", "/3303/0"]));
        lw.answer(
            &mut cl,
            6000,
            &got[1],
            code::CONTENT,
            Some(format::TEXT),
            b"9",
        );
        assert_eq!(
            app.one(&mut cl).1["data"]["content"],
            json!([{"path": "/3/0/9", "value": 9}])
        );
        // An update without an object list publishes no event (lwm2m.update_always off).
        let upd = lw.device_request(code::POST, &["rd", &loc], &[], b"");
        lw.send(&mut cl, 6000, &upd);
        assert_eq!(c::code_of(&lw.one(&mut cl, 6000)), code::CHANGED);
        assert_eq!(app.got(&mut cl).len(), 0);
        // Past its lifetime (120 s) the registration ends.
        lw.advance(&mut cl, Duration::from_secs(119));
        assert_eq!(lw.gw.endpoint_count(), 1);
        lw.advance(&mut cl, Duration::from_secs(2));
        assert_eq!(lw.gw.endpoint_count(), 0);
        assert_eq!(cl.engines[0].connection_count(), 0);
        assert_eq!(cl.engines[0].metrics.lwm2m_registrations_expired, 1);
        // An update to a registration that is gone: 4.04.
        let upd = lw.device_request(code::POST, &["rd", &loc], &[], b"");
        lw.send(&mut cl, 6000, &upd);
        assert_eq!(c::code_of(&lw.one(&mut cl, 6000)), code::NOT_FOUND);
        // De-register.
        let loc = lw.register(&mut cl, 5000, &ep, &["lt=60"], "</3/0>");
        let del = lw.device_request(code::DELETE, &["rd", &loc], &[], b"");
        lw.send(&mut cl, 5000, &del);
        assert_eq!(c::code_of(&lw.one(&mut cl, 5000)), code::DELETED);
        assert_eq!(lw.gw.endpoint_count(), 0);
    }
}

#[test]
fn refusals_and_garbage() {
    let mut cl = Cluster::with(2, |c| {
        c.auth = crate::auth::AuthPolicy {
            anonymous: crate::auth::Anonymous::Deny,
            verify_credentials: false,
        }
    });
    let mut lw = Lw::new(
        &mut cl,
        Lwm2mSettings {
            max_queued: 1,
            ..settings()
        },
    );
    for (query, payload, want) in [
        (vec!["lt=60"], "</3/0>", code::BAD_REQUEST),
        (vec!["ep=a", "lt=0"], "</3/0>", code::BAD_REQUEST),
        (vec!["ep=a", "lt=x"], "</3/0>", code::BAD_REQUEST),
        (
            vec!["ep=a", "lwm2m=2.0"],
            "</3/0>",
            code::PRECONDITION_FAILED,
        ),
        (vec!["ep=a"], "</3/0/1/2>", code::BAD_REQUEST),
        // Anonymous endpoints are refused here: 4.03.
        (vec!["ep=a", "lt=60"], "</3/0>", code::FORBIDDEN),
    ] {
        let req = lw.device_request(code::POST, &["rd"], &query, payload.as_bytes());
        lw.send(&mut cl, 5000, &req);
        assert_eq!(c::code_of(&lw.one(&mut cl, 5000)), want, "{query:?}");
    }
    assert_eq!(lw.gw.endpoint_count(), 0);
    assert_eq!(cl.engines[0].metrics.lwm2m_registrations_refused, 6);
    // Not CoAP: counted, unanswered. A CoAP ping: RST. An unknown resource: 4.04.
    lw.gw
        .handle_datagram(&mut cl.engines[0], addr(5000), b"\x00\x01", None, cl.now);
    lw.gw.handle_datagram(
        &mut cl.engines[0],
        addr(5000),
        &[0x80, 1, 0, 1],
        None,
        cl.now,
    );
    assert_eq!(cl.engines[0].metrics.lwm2m_bad_datagrams, 2);
    lw.send(&mut cl, 5000, &c::empty(MessageType::Confirmable, 5));
    assert_eq!(lw.one(&mut cl, 5000).header.get_type(), MessageType::Reset);
    let req = lw.device_request(code::GET, &["bs"], &[], b"");
    lw.send(&mut cl, 5000, &req);
    assert_eq!(c::code_of(&lw.one(&mut cl, 5000)), code::NOT_FOUND);
}

#[test]
fn bad_commands_and_a_full_queue_are_answered_not_dropped_silently() {
    let mut cl = Cluster::new(2);
    let mut lw = Lw::new(
        &mut cl,
        Lwm2mSettings {
            max_queued: 1,
            ..settings()
        },
    );
    let app = App::new(&mut cl, "busy");
    lw.register(&mut cl, 5000, "busy", &["lt=300"], "</3/0>");
    app.got(&mut cl);
    cl.publish(
        app.c,
        "lwm2m/busy/command",
        "{not json",
        QoS::AtMostOnce,
        false,
        0,
    );
    lw.settle(&mut cl);
    let (_, r) = app.one(&mut cl);
    assert_eq!(r["data"]["code"], "4.00");
    app.command(
        &mut cl,
        "busy",
        json!({"reqID": 1, "msgType": "read", "data": {"path": "/3/0/9"}}),
    );
    app.command(
        &mut cl,
        "busy",
        json!({"reqID": 2, "msgType": "read", "data": {"path": "/3/0/9"}}),
    );
    app.command(
        &mut cl,
        "busy",
        json!({"reqID": 3, "msgType": "read", "data": {"path": "/3/0/9"}}),
    );
    let sent = lw.recv(&mut cl, 5000);
    assert_eq!(sent.len(), 1, "one request at a time");
    let (_, r) = app.one(&mut cl);
    assert_eq!(
        (r["reqID"].as_i64(), r["data"]["code"].as_str()),
        (Some(3), Some("5.03"))
    );
    assert_eq!(cl.engines[0].metrics.lwm2m_bad_commands, 1);
    // Cancelling an observation that does not exist is answered without asking the device.
    lw.answer(
        &mut cl,
        5000,
        &sent[0],
        code::CONTENT,
        Some(format::TEXT),
        b"1",
    );
    let second = lw.one(&mut cl, 5000);
    lw.answer(
        &mut cl,
        5000,
        &second,
        code::CONTENT,
        Some(format::TEXT),
        b"2",
    );
    assert_eq!(app.got(&mut cl).len(), 2);
    app.command(
        &mut cl,
        "busy",
        json!({"reqID": 4, "msgType": "cancel-observe", "data": {"path": "/3/0/9"}}),
    );
    lw.settle(&mut cl);
    let (_, r) = app.one(&mut cl);
    assert_eq!(r["data"]["code"], "4.04");
    assert_eq!(lw.recv(&mut cl, 5000).len(), 0);
}

#[test]
fn a_device_registering_again_replaces_its_registration_once_accepted() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let mut lw = Lw::new(&mut cl, settings());
        let ep = id_owned_by(&format!("again{owner}-"), owner, 2);
        let app = App::new(&mut cl, &ep);
        let first = lw.register(&mut cl, 5000, &ep, &["lt=300"], "</3/0>");
        // It rebooted and registers from another port: a new location; the old one is gone.
        let second = lw.register(&mut cl, 5001, &ep, &["lt=300"], "</3/0>,</3303/0>");
        assert_ne!(first, second);
        assert_eq!(lw.gw.endpoint_count(), 1, "owner {owner}");
        assert_eq!(lw.gw.endpoint_peer(&ep), Some(addr(5001)));
        let upd = lw.device_request(code::POST, &["rd", &first], &[], b"");
        lw.send(&mut cl, 5000, &upd);
        assert_eq!(c::code_of(&lw.one(&mut cl, 5000)), code::NOT_FOUND);
        app.got(&mut cl);
        // Commands go to the new one.
        app.command(
            &mut cl,
            &ep,
            json!({"reqID": 1, "msgType": "read", "data": {"path": "/3/0/9"}}),
        );
        assert_eq!(lw.recv(&mut cl, 5001).len(), 1);
    }
}

#[test]
fn duplicate_blocks_reobserving_and_payloads_ending_in_ff() {
    let mut cl = Cluster::new(2);
    let mut lw = Lw::new(&mut cl, settings());
    let app = App::new(&mut cl, "blk");
    lw.register(&mut cl, 5000, "blk", &["lt=300"], "</3/0>");
    app.got(&mut cl);
    // Block 0 arrives twice (the first request was sent again): the transfer goes on.
    app.command(
        &mut cl,
        "blk",
        json!({"reqID": 1, "msgType": "read", "data": {"path": "/3/0/0"}}),
    );
    let get = lw.one(&mut cl, 5000);
    let mut b0 = c::response(&get, code::CONTENT);
    c::set_uint(&mut b0, CoapOption::ContentFormat, u32::from(format::TEXT));
    c::set_uint(&mut b0, CoapOption::Block2, c::block2_value(0, 16) | 8);
    b0.payload = b"0123456789abcdef".to_vec();
    lw.send(&mut cl, 5000, &b0);
    let next = lw.one(&mut cl, 5000);
    lw.send(&mut cl, 5000, &b0);
    assert_eq!(
        app.got(&mut cl).len(),
        0,
        "a stale block does not end the transfer"
    );
    let mut b1 = c::response(&next, code::CONTENT);
    c::set_uint(&mut b1, CoapOption::ContentFormat, u32::from(format::TEXT));
    c::set_uint(&mut b1, CoapOption::Block2, c::block2_value(1, 16));
    b1.payload = b"!".to_vec();
    lw.send(&mut cl, 5000, &b1);
    assert_eq!(
        app.one(&mut cl).1["data"]["content"][0]["value"],
        "0123456789abcdef!"
    );
    // A TLV integer of -1 ends in 0xFF: a reply, not a malformed message.
    app.command(
        &mut cl,
        "blk",
        json!({"reqID": 2, "msgType": "read", "data": {"path": "/3/0/9"}}),
    );
    let get = lw.one(&mut cl, 5000);
    lw.answer(
        &mut cl,
        5000,
        &get,
        code::CONTENT,
        Some(format::TLV),
        &[0xC1, 0x09, 0xFF],
    );
    assert_eq!(app.one(&mut cl).1["data"]["content"][0]["value"], -1);
    // Observing a path twice: the later observation replaces the earlier.
    let mut tokens = Vec::new();
    for req in [3, 4] {
        app.command(
            &mut cl,
            "blk",
            json!({"reqID": req, "msgType": "observe", "data": {"path": "/3/0/9"}}),
        );
        let obs = lw.one(&mut cl, 5000);
        let mut r = c::response(&obs, code::CONTENT);
        c::set_uint(&mut r, CoapOption::Observe, 1);
        c::set_uint(&mut r, CoapOption::ContentFormat, u32::from(format::TEXT));
        r.payload = b"5".to_vec();
        lw.send(&mut cl, 5000, &r);
        app.one(&mut cl);
        tokens.push(obs.get_token().to_vec());
    }
    app.command(
        &mut cl,
        "blk",
        json!({"reqID": 5, "msgType": "cancel-observe", "data": {"path": "/3/0/9"}}),
    );
    let cancel = lw.one(&mut cl, 5000);
    assert_eq!(
        cancel.get_token(),
        tokens[1].as_slice(),
        "the live observation's token"
    );
    // An empty write-attr is refused before anything is sent.
    lw.answer(
        &mut cl,
        5000,
        &cancel,
        code::CONTENT,
        Some(format::TEXT),
        b"5",
    );
    app.got(&mut cl);
    app.command(
        &mut cl,
        "blk",
        json!({"reqID": 6, "msgType": "write-attr", "data": {"path": "/3/0/9"}}),
    );
    lw.settle(&mut cl);
    assert_eq!(app.one(&mut cl).1["data"]["code"], "4.00");
    assert_eq!(lw.recv(&mut cl, 5000).len(), 0);
}

#[test]
fn large_writes_go_block_by_block_and_auto_observe() {
    let mut cl = Cluster::new(2);
    let mut lw = Lw::new(
        &mut cl,
        Lwm2mSettings {
            auto_observe: true,
            ..settings()
        },
    );
    let app = App::new(&mut cl, "fw");
    let reg = lw.device_request(
        code::POST,
        &["rd"],
        &["ep=fw", "lt=300"],
        b"</0/0>,</1/0>,</5/0>",
    );
    lw.send(&mut cl, 5000, &reg);
    let mut got = lw.recv(&mut cl, 5000);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(c::code_of(&got[0]), code::CREATED);
    app.got(&mut cl);
    // auto_observe: each object instance but Security (0), one at a time, once registered.
    let first = got.remove(1);
    assert_eq!(
        (path_of(&first), c::uint_option(&first, CoapOption::Observe)),
        ("/1/0".to_string(), Some(0))
    );
    lw.answer(
        &mut cl,
        5000,
        &first,
        code::CONTENT,
        Some(format::TLV),
        &[0xC1, 0x00, 0x01],
    );
    let second = lw.one(&mut cl, 5000);
    assert_eq!(path_of(&second), "/5/0");
    lw.answer(&mut cl, 5000, &second, code::NOT_FOUND, None, b"");
    let auto = app.got(&mut cl);
    assert_eq!(auto.len(), 2, "{auto:?}");
    assert_eq!(auto[0].1["msgType"], "observe");
    // A 2,500-byte package: Block1 in 1 KiB blocks, the device asking for 512 after the first.
    let package: String = "ab".repeat(1250);
    app.command(&mut cl, "fw", json!({"reqID": 1, "msgType": "write", "data": {"path": "/5/0/0", "type": "Opaque", "value": package}}));
    let mut got = Vec::new();
    let mut req = lw.one(&mut cl, 5000);
    loop {
        let (num, more, size) = c::block_option(&req, CoapOption::Block1).expect("Block1");
        assert_eq!(num as usize * size, got.len(), "in order");
        got.extend_from_slice(&req.payload);
        if !more {
            lw.answer(&mut cl, 5000, &req, code::CHANGED, None, b"");
            break;
        }
        let mut cont = c::response(&req, code::CONTINUE);
        let want = if num == 0 { 512 } else { size };
        c::set_uint(
            &mut cont,
            CoapOption::Block1,
            c::block2_value(num, want) | 8,
        );
        lw.send(&mut cl, 5000, &cont);
        req = lw.one(&mut cl, 5000);
    }
    let entries = tlv::decode(&got).unwrap();
    assert_eq!(entries[0].value.len(), 2500);
    assert_eq!(app.one(&mut cl).1["data"]["code"], "2.04");
}
