//! The TCP gateway's state machine on the simulated cluster: a device connects (CONNACK once
//! its down topic is subscribed everywhere), its DATATRANS reach MQTT subscribers and MQTT
//! publishes reach it, with the client id owned by the device's shard and by the other; bad
//! input, refusals, keepalive, the gateway's idle timeout, takeover and force shutdown.

use super::*;
use crate::auth::{Anonymous, AuthPolicy};
use crate::gateway::tcp::{TcpGwConn, TcpGwSettings};
use shardmq_protocol::tcpgw::{self, Frame};

fn settings() -> TcpGwSettings {
    TcpGwSettings {
        up_topic: "tcp/%c/up".into(),
        dn_topic: "tcp/%c/dn".into(),
        max_packet_size: 1024,
        force_shutdown: Some((8000, 800 << 20)),
    }
}

struct Device {
    client: Client,
    gw: TcpGwConn,
}

fn frame_bytes(f: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    tcpgw::encode(f, &mut b);
    b.to_vec()
}

fn connect_frame(cid: &str, keepalive: u8) -> Frame {
    Frame::Connect {
        keepalive,
        client_id: cid.into(),
        username: None,
        password: None,
    }
}

impl Cluster {
    fn device(&mut self, shard: usize) -> Device {
        // Declared before the connection opens, as the runtime does at start.
        self.engines[shard].set_listener_protocol(
            1,
            crate::engine::ListenerProtocol {
                name: "tcp",
                version: 1,
                idle_timeout: Duration::from_secs(5),
            },
        );
        let client = self.open_gateway(shard);
        Device {
            gw: TcpGwConn::new(client.id),
            client,
        }
    }

    /// Bytes from the device, then everything settles.
    fn device_sends(&mut self, d: &mut Device, bytes: &[u8]) -> usize {
        let used =
            d.gw.handle_input(
                &mut self.engines[d.client.shard],
                &settings(),
                bytes,
                self.now,
            )
            .used;
        self.settle();
        used
    }

    /// What the device receives: frames decoded from its outbox (marked written).
    fn device_recv(&mut self, d: &mut Device) -> Vec<Frame> {
        let s = settings();
        d.gw.poll_engine(&mut self.engines[d.client.shard], &s, self.now);
        self.settle();
        d.gw.poll_engine(&mut self.engines[d.client.shard], &s, self.now);
        let mut buf = BytesMut::from(d.gw.outbox());
        let n = buf.len();
        let mut frames = Vec::new();
        while let Some(f) = tcpgw::decode(&mut buf, 1 << 16).unwrap() {
            frames.push(f);
        }
        d.gw.written(n);
        frames
    }

    fn connected_device(&mut self, shard: usize, cid: &str, keepalive: u8) -> Device {
        let mut d = self.device(shard);
        self.device_sends(&mut d, &frame_bytes(&connect_frame(cid, keepalive)));
        let got = self.device_recv(&mut d);
        assert_eq!(
            got,
            vec![Frame::Connack {
                code: 0,
                message: "Connect Successfully".into()
            }],
            "{cid}"
        );
        d
    }
}

#[test]
fn a_device_exchanges_data_with_mqtt_clients() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let cid = id_owned_by(&format!("dev{owner}-"), owner, 2);
        let watcher = cl.connect(1, "up-watcher", true);
        cl.subscribe(watcher, &[(&format!("tcp/{cid}/up"), QoS::AtMostOnce)]);
        let mut d = cl.connected_device(0, &cid, 60);
        assert!(d.gw.connected());
        cl.device_sends(
            &mut d,
            &frame_bytes(&Frame::Data(Bytes::from_static(b"hello"))),
        );
        let up = publishes(&cl.recv(watcher));
        assert_eq!(
            up,
            vec![(
                format!("tcp/{cid}/up"),
                "hello".into(),
                QoS::AtMostOnce,
                false
            )]
        );
        // An MQTT client on either shard reaches the device.
        for shard in 0..2 {
            let p = cl.connect(shard, &format!("dn-pub{shard}"), true);
            cl.publish(
                p,
                &format!("tcp/{cid}/dn"),
                &format!("cmd{shard}"),
                QoS::AtLeastOnce,
                false,
                1,
            );
            assert_eq!(
                cl.device_recv(&mut d),
                vec![Frame::Data(Bytes::from(format!("cmd{shard}")))],
                "owner {owner}"
            );
        }
        cl.device_sends(&mut d, &[0x40]);
        assert_eq!(cl.device_recv(&mut d), vec![Frame::Pong]);
        // The client list names the protocol.
        let page = cl.engines[0].list_clients(
            &crate::engine::admin::ClientFilter::default(),
            crate::engine::admin::Window { skip: 0, take: 10 },
        );
        let me = page
            .items
            .iter()
            .find(|c| c.clientid == cid)
            .expect("listed");
        assert_eq!(me.proto_name, Some("tcp"));
        cl.device_sends(&mut d, &[0x60]);
        assert!(cl.closing(d.client), "DISCONNECT closes");
    }
}

#[test]
fn bad_frames_close_the_connection() {
    let mut cl = Cluster::new(2);
    // A version other than 1: CONNACK 2, then closed.
    let mut d = cl.device(0);
    cl.device_sends(&mut d, &[0x12, 0x00, 0x00]);
    assert_eq!(
        cl.device_recv(&mut d),
        vec![Frame::Connack {
            code: 2,
            message: "Unsupported protocol version".into()
        }]
    );
    assert!(cl.closing(d.client));
    // A first frame that is not CONNECT, a reserved type, an oversized DATATRANS, a second
    // CONNECT: closed.
    let mut d = cl.device(1);
    cl.device_sends(&mut d, &[0x40]);
    assert!(cl.closing(d.client));
    let mut d = cl.connected_device(0, "bad-type", 60);
    cl.device_sends(&mut d, &[0x70]);
    assert!(cl.closing(d.client));
    let mut d = cl.connected_device(0, "too-big", 60);
    assert_eq!(
        cl.device_sends(&mut d, &[0x30, 0x04, 0x01]),
        3,
        "refused from the length"
    );
    assert!(cl.closing(d.client));
    let mut d = cl.connected_device(1, "twice", 60);
    cl.device_sends(&mut d, &frame_bytes(&connect_frame("twice", 60)));
    assert!(cl.closing(d.client));
    let m: u64 = cl.engines.iter().map(|e| e.metrics.malformed_packets).sum();
    let p: u64 = cl.engines.iter().map(|e| e.metrics.protocol_errors).sum();
    assert_eq!((m, p), (2, 3));
}

#[test]
fn refused_credentials_get_connack_1() {
    for owner in 0..2 {
        let mut cl = Cluster::with(2, |c| {
            c.auth = AuthPolicy {
                anonymous: Anonymous::Deny,
                verify_credentials: false,
            }
        });
        let mut d = cl.device(0);
        let cid = id_owned_by(&format!("anon{owner}-"), owner, 2);
        cl.device_sends(&mut d, &frame_bytes(&connect_frame(&cid, 60)));
        assert_eq!(
            cl.device_recv(&mut d),
            vec![Frame::Connack {
                code: 1,
                message: "Authentication Failure".into()
            }]
        );
        assert!(cl.closing(d.client));
    }
}

#[test]
fn keepalive_and_the_gateways_idle_timeout() {
    let mut cl = Cluster::new(2);
    // Keepalive 2 s × 1.5: a PING within it keeps the device; silence ends it.
    let mut d = cl.connected_device(1, "ka", 2);
    cl.advance(Duration::from_secs(2));
    cl.device_sends(&mut d, &[0x40]);
    assert_eq!(cl.device_recv(&mut d), vec![Frame::Pong]);
    cl.advance(Duration::from_secs(2));
    assert!(!cl.closing(d.client));
    cl.advance(Duration::from_millis(1100));
    assert!(cl.closing(d.client), "keepalive timeout");
    // The gateway's own idle timeout (5 s here), not mqtt.idle_timeout (15 s).
    let idle = cl.device(0);
    cl.advance(Duration::from_secs(4));
    assert!(!cl.closing(idle.client));
    cl.advance(Duration::from_millis(1100));
    assert!(
        cl.closing(idle.client),
        "no CONNECT within the idle timeout"
    );
}

#[test]
fn the_same_client_id_takes_over() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let cid = id_owned_by(&format!("take{owner}-"), owner, 2);
        let first = cl.connected_device(0, &cid, 60);
        let mut second = cl.connected_device(1, &cid, 60);
        assert!(cl.closing(first.client), "owner {owner}");
        let p = cl.connect(0, "dn-pub", true);
        cl.publish(
            p,
            &format!("tcp/{cid}/dn"),
            "to-new",
            QoS::AtMostOnce,
            false,
            0,
        );
        assert_eq!(
            cl.device_recv(&mut second),
            vec![Frame::Data(Bytes::from_static(b"to-new"))]
        );
    }
}

#[test]
fn a_device_that_does_not_read_is_shut_down() {
    for owner in 0..2 {
        let mut cl = Cluster::new(2);
        let cid = id_owned_by(&format!("slow{owner}-"), owner, 2);
        let mut d = cl.connected_device(0, &cid, 60);
        let p = cl.connect(1, "flood", true);
        let s = TcpGwSettings {
            force_shutdown: Some((5, 1 << 20)),
            ..settings()
        };
        let mut shut = false;
        for i in 0..10 {
            cl.publish(
                p,
                &format!("tcp/{cid}/dn"),
                &format!("m{i}"),
                QoS::AtMostOnce,
                false,
                0,
            );
            // Polled, never written: the frames pile up.
            shut |= d.gw.poll_engine(&mut cl.engines[0], &s, cl.now).shut_down;
            cl.settle();
        }
        assert!(shut && cl.closing(d.client), "owner {owner}");
        assert_eq!(cl.engines[0].metrics.force_shutdowns, 1);
        assert!(d.gw.outbox().is_empty(), "what waited is dropped");
    }
}

/// Without a force-shutdown policy the gateway's outbox is not refilled until it is written:
/// what a device does not read stays under the engine's write-buffer limits, where QoS 0
/// beyond them is dropped and counted as for a slow MQTT consumer.
#[test]
fn without_a_policy_the_engines_write_buffer_bounds_a_slow_device() {
    for owner in 0..2 {
        let mut cl = Cluster::with(2, |c| c.max_write_buffer = 4096);
        let cid = id_owned_by(&format!("unbounded{owner}-"), owner, 2);
        let mut d = cl.connected_device(0, &cid, 60);
        let p = cl.connect(1, "flood-off", true);
        let s = TcpGwSettings {
            force_shutdown: None,
            ..settings()
        };
        let payload = "x".repeat(512);
        for _ in 0..100 {
            cl.publish(
                p,
                &format!("tcp/{cid}/dn"),
                &payload,
                QoS::AtMostOnce,
                false,
                0,
            );
            d.gw.poll_engine(&mut cl.engines[0], &s, cl.now);
            cl.settle();
        }
        assert!(!cl.closing(d.client), "owner {owner}");
        assert!(
            d.gw.outbox().len() < 2 * 4096,
            "owner {owner}: {} bytes wait",
            d.gw.outbox().len()
        );
        assert!(
            cl.engines[0].metrics.dropped_slow_consumer > 0,
            "owner {owner}"
        );
    }
}
