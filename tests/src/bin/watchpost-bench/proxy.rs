//! A TCP proxy on loopback that counts every byte it passes, both directions: what an uplink
//! costs on the wire (MQTT, without TCP/IP headers), measured the same way for Watchpost's
//! uplink and a Mosquitto bridge.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;

/// Counters of one proxy.
#[derive(Debug, Default)]
pub struct Counts {
    /// Bytes from clients towards the upstream.
    pub up: AtomicU64,
    /// Bytes from the upstream back to clients.
    pub down: AtomicU64,
}

/// A snapshot of [`Counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    /// Bytes towards the upstream.
    pub up: u64,
    /// Bytes back.
    pub down: u64,
}

impl Snapshot {
    /// Both directions.
    pub fn total(&self) -> u64 {
        self.up + self.down
    }

    /// What passed between `earlier` and this snapshot.
    pub fn since(&self, earlier: Snapshot) -> Snapshot {
        Snapshot {
            up: self.up - earlier.up,
            down: self.down - earlier.down,
        }
    }
}

/// A running proxy; its threads end with the process.
pub struct Proxy {
    addr: SocketAddr,
    counts: Arc<Counts>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || {
                for client in listener.incoming().map_while(Result::ok) {
                    let Ok(server) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone())
                    else {
                        continue;
                    };
                    let (c1, c2) = (shared.clone(), shared.clone());
                    std::thread::spawn(move || pump(client, server, &c1.up));
                    std::thread::spawn(move || pump(server2, client2, &c2.down));
                }
            })?;
        Ok(Proxy { addr, counts })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            up: self.counts.up.load(Ordering::Relaxed),
            down: self.counts.down.load(Ordering::Relaxed),
        }
    }
}

/// Copies `from` to `to` until either side closes, counting into `counter`.
fn pump(mut from: TcpStream, mut to: TcpStream, counter: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                counter.fetch_add(n as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
