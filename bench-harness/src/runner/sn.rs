//! MQTT-SN publishers (`--mqttsn-port`): each is a UDP socket that CONNECTs to the gateway,
//! REGISTERs its topic and PUBLISHes by topic id, in the same phases and end-to-end window as
//! the MQTT publishers; its messages reach the MQTT subscribers as any publisher's.

use super::*;
use glommio::net::UdpSocket;
use shardmq_protocol::mqttsn::{self as sn, Message, Qos, Topic};

/// How long a QoS 1 publisher waits for a PUBACK before sending the message again (DUP).
const RETRY: Duration = Duration::from_secs(1);

fn datagram(m: &Message) -> BytesMut {
    let mut b = BytesMut::new();
    sn::encode(m, &mut b);
    b
}

/// The next message from the gateway within `limit` (`None` on timeout).
async fn recv(sock: &UdpSocket, buf: &mut [u8], limit: Duration) -> io::Result<Option<Message>> {
    let got = futures_lite::future::or(async { Some(sock.recv(buf).await) }, async {
        sleep(limit).await;
        None
    })
    .await;
    match got {
        None => Ok(None),
        Some(Ok(n)) => sn::decode(&buf[..n])
            .map(Some)
            .map_err(|e| io::Error::other(e.to_string())),
        Some(Err(e)) => Err(io::Error::other(e.to_string())),
    }
}

/// Sends `m` until `answer` accepts a reply (each wait `RETRY` long, within `SETUP_TIMEOUT`).
async fn exchange<T>(
    sock: &UdpSocket,
    m: &Message,
    buf: &mut [u8],
    answer: impl Fn(Message) -> Option<io::Result<T>>,
) -> io::Result<T> {
    let started = Instant::now();
    let d = datagram(m);
    while started.elapsed() < SETUP_TIMEOUT {
        sock.send(&d).await?;
        let until = Instant::now() + RETRY;
        while Instant::now() < until {
            match recv(sock, buf, until - Instant::now()).await? {
                Some(reply) => {
                    if let Some(r) = answer(reply) {
                        return r;
                    }
                }
                None => break,
            }
        }
    }
    Err(io::ErrorKind::TimedOut.into())
}

/// Connects and registers the topic: the socket and the topic id.
async fn setup(
    idx: usize,
    plan: &Plan,
    coord: &Coord,
    local: &Local,
) -> io::Result<(UdpSocket, u16)> {
    let port = plan.sc.mqttsn_port.unwrap_or(1884);
    let gw = SocketAddr::new(plan.addr.ip(), port);
    let bind = match net::source_for(plan.sc.subscribers + idx, plan.sources, plan.addr) {
        Some(ip) => SocketAddr::new(ip, 0),
        None if gw.is_ipv4() => SocketAddr::from(([0, 0, 0, 0], 0)),
        None => SocketAddr::from(([0u16; 8], 0)),
    };
    let sock = UdpSocket::bind(bind)?;
    sock.connect(gw).await?;
    let mut buf = vec![0u8; 65_536];
    let t0 = coord.now_ns();
    let connect = Message::Connect {
        will: false,
        clean_session: true,
        protocol_id: 1,
        duration: plan.sc.keepalive,
        client_id: plan.client_id(Role::Publisher, idx),
    };
    exchange(&sock, &connect, &mut buf, |m| match m {
        Message::Connack { rc: 0 } => Some(Ok(())),
        Message::Connack { rc } => Some(Err(io::Error::other(format!("CONNACK {rc}")))),
        _ => None,
    })
    .await?;
    let _ = local
        .connack
        .borrow_mut()
        .record((coord.now_ns() - t0).max(1));
    let register = Message::Register {
        topic_id: 0,
        msg_id: 1,
        topic_name: plan.topic(idx),
    };
    let id = exchange(&sock, &register, &mut buf, |m| match m {
        Message::Regack {
            topic_id,
            msg_id: 1,
            rc: 0,
        } => Some(Ok(topic_id)),
        Message::Regack { rc, .. } => Some(Err(io::Error::other(format!("REGACK {rc}")))),
        _ => None,
    })
    .await?;
    Ok((sock, id))
}

/// Waits for the PUBACK of `m` (MsgId `msg_id`), sending it again with DUP every `RETRY`;
/// `false` when the run stops first or the gateway refuses it.
async fn await_puback(
    sock: &UdpSocket,
    buf: &mut [u8],
    m: &mut Message,
    msg_id: u16,
    idx: usize,
    coord: &Coord,
) -> bool {
    loop {
        match recv(sock, buf, RETRY).await {
            Ok(Some(Message::Puback {
                msg_id: id, rc: 0, ..
            })) if id == msg_id => return true,
            Ok(Some(Message::Puback { rc, .. })) if rc != 0 => {
                coord.error(format!("MQTT-SN publisher {idx}: PUBACK {rc}"));
                return false;
            }
            Ok(Some(_)) => {}
            Ok(None) if coord.phase() >= STOP => return false,
            Ok(None) => {
                if let Message::Publish { dup, .. } = m {
                    *dup = true;
                }
                if let Err(e) = sock.send(&datagram(m)).await {
                    coord.error(format!("MQTT-SN publisher {idx}: {e}"));
                    return false;
                }
            }
            Err(e) => {
                coord.error(format!("MQTT-SN publisher {idx}: {e}"));
                return false;
            }
        }
    }
}

/// Publisher `idx` as an MQTT-SN client; returns how many messages it published.
pub(super) async fn publisher(
    idx: usize,
    plan: Rc<Plan>,
    coord: Arc<Coord>,
    local: Rc<Local>,
) -> u64 {
    let (sock, topic_id) = match setup(idx, &plan, &coord, &local).await {
        Ok(s) => s,
        Err(e) => {
            coord.failed.fetch_add(1, Ordering::AcqRel);
            coord.error(format!("MQTT-SN publisher {idx}: {e}"));
            return 0;
        }
    };
    coord.pubs_ready.fetch_add(1, Ordering::AcqRel);
    wait_phase(&coord, WARMUP).await;
    let qos = if plan.qos == QoS::AtMostOnce {
        Qos::AtMostOnce
    } else {
        Qos::AtLeastOnce
    };
    let mut payload = vec![0u8; plan.sc.payload.as_usize()];
    let mut buf = vec![0u8; 65_536];
    let mut seq: u32 = 0;
    let mut msg_id: u16 = 0;
    let mut win = Window::default();
    'run: while coord.phase() < STOP {
        let n = e2e_window(idx, seq, &mut win, &plan, &coord, &local).await;
        // QoS 1: one message at a time, until its PUBACK.
        let n = if qos == Qos::AtMostOnce { n } else { n.min(1) };
        for _ in 0..n {
            stats::write_header(&mut payload, idx as u32, seq, coord.now_ns());
            msg_id = if qos == Qos::AtMostOnce {
                0
            } else {
                msg_id.wrapping_add(1).max(1)
            };
            let mut m = Message::Publish {
                dup: false,
                qos,
                retain: false,
                topic: Topic::Id(topic_id),
                msg_id,
                data: bytes::Bytes::copy_from_slice(&payload),
            };
            if let Err(e) = sock.send(&datagram(&m)).await {
                coord.error(format!("MQTT-SN publisher {idx}: {e}"));
                break 'run;
            }
            if qos == Qos::AtLeastOnce
                && !await_puback(&sock, &mut buf, &mut m, msg_id, idx, &coord).await
            {
                break 'run;
            }
            seq = seq.wrapping_add(1);
        }
        coord.sent.fetch_add(n as u64, Ordering::Relaxed);
        if coord.phase() == MEASURE {
            local
                .sent_measured
                .set(local.sent_measured.get() + n as u64);
        }
    }
    wait_phase(&coord, DONE).await;
    let _ = sock.send(&datagram(&Message::Disconnect(None))).await;
    seq as u64
}
