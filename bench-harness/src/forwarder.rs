//! The raw-limit baseline: a forwarder with no MQTT logic. Each client announces itself with a
//! preface (`SMQFWD`, role 0 = publisher or 1 = subscriber, u32 pair index); every byte a
//! publisher sends is copied to the subscriber of the same index. Driven by the same pubsub
//! load (`--raw`), it shows what loopback TCP allows on this machine.

use crate::runner::RAW_PREFACE;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::sleep;
use glommio::{spawn_local, LocalExecutorBuilder, Placement};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Subscriber sockets by pair index (duplicated descriptors, usable from any thread).
type Registry = Arc<Mutex<HashMap<u32, i32>>>;

async fn handle(mut s: TcpStream, registry: Registry) -> std::io::Result<()> {
    let mut preface = [0u8; 11];
    s.read_exact(&mut preface).await?;
    if &preface[..6] != RAW_PREFACE {
        return Err(std::io::Error::other("bad preface"));
    }
    let idx = u32::from_be_bytes([preface[7], preface[8], preface[9], preface[10]]);
    if preface[6] == 1 {
        // SAFETY: dup(2) of a descriptor we own; the copy is owned by the registry.
        let fd = unsafe { libc::dup(s.as_raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if let Ok(mut r) = registry.lock() {
            r.insert(idx, fd);
        }
        let mut sink = [0u8; 4096];
        while s.read(&mut sink).await? > 0 {}
        return Ok(());
    }
    let fd = loop {
        if let Some(fd) = registry.lock().ok().and_then(|mut r| r.remove(&idx)) {
            break fd;
        }
        sleep(Duration::from_millis(5)).await;
    };
    // SAFETY: `fd` came from dup(2) above and is owned by nobody else now.
    let mut out = unsafe { TcpStream::from_raw_fd(fd) };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n]).await?;
    }
}

/// Runs the forwarder on `threads` executors until the process is stopped. Prints the bound
/// address on stdout.
pub fn run(listen: SocketAddr, threads: usize, cpus: Option<Vec<usize>>) -> Result<(), String> {
    let registry: Registry = Arc::new(Mutex::new(HashMap::new()));
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    let mut addr = listen;
    for w in 0..threads.max(1) {
        let placement = match &cpus {
            Some(c) => Placement::Fixed(c[w % c.len()]),
            None => Placement::Unbound,
        };
        let (registry, tx) = (registry.clone(), tx.clone());
        let bind = addr;
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("fwd{w}"))
            .spawn(move || async move {
                let l = match TcpListener::bind(bind) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = tx.send(l.local_addr().map_err(|e| e.to_string()));
                loop {
                    match l.accept().await {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            let registry = registry.clone();
                            spawn_local(async move {
                                let _ = handle(s, registry).await;
                            })
                            .detach();
                        }
                        Err(_) => sleep(Duration::from_millis(10)).await,
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        handles.push(h);
        addr = rx.recv().map_err(|e| e.to_string())??;
    }
    println!("forwarder listening on {addr}");
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
