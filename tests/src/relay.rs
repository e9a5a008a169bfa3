//! A TCP relay that stands for the network path between two boxes, which a test can break and
//! mend: [`Relay::partition`] closes every relayed connection and refuses new ones until
//! [`Relay::heal`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A relay to one address.
pub struct Relay {
    /// Where to connect instead of the target.
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Relay {
    /// A relay on `127.0.0.1:0` to `target`.
    pub async fn to(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a relay");
        let addr = listener.local_addr().expect("bound");
        let open = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (open_in, connections_in) = (open.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut near, _)) = listener.accept().await {
                if !open_in.load(Ordering::SeqCst) {
                    drop(near);
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut far) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut near, &mut far).await;
                    }
                });
                let mut all = connections_in.lock().unwrap();
                all.retain(|c| !c.is_finished());
                all.push(relay);
            }
        });
        Relay {
            addr,
            open,
            connections,
            task,
        }
    }

    /// Breaks the path: open connections close, new ones are closed at once.
    pub fn partition(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Mends the path.
    pub fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.partition();
        self.task.abort();
    }
}
