//! A TCP proxy in front of a server the tests must not stop themselves (the shared
//! RabbitMQ broker, the shared PostgreSQL server): it can refuse connections (a server that
//! is down) and cut the ones it carries (a network fault).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Connections carried to the target so far.
    carried: Arc<AtomicUsize>,
    /// Connections closed at once because the proxy was down.
    refused: Arc<AtomicUsize>,
    links: Arc<Mutex<JoinSet<()>>>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and carries each connection to `target` while `up`.
    pub async fn start(target: SocketAddr, up: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(up));
        let links = Arc::new(Mutex::new(JoinSet::new()));
        let carried = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (u, l, c, r) = (
            Arc::clone(&up),
            Arc::clone(&links),
            Arc::clone(&carried),
            Arc::clone(&refused),
        );
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    r.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                c.fetch_add(1, Ordering::SeqCst);
                let mut links = l.lock().await;
                // Forget the links that ended, so a long test does not pile them up.
                while links.try_join_next().is_some() {}
                links.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            carried,
            refused,
            links,
        }
    }

    /// Closes every connection it carries.
    pub async fn cut(&self) {
        self.links.lock().await.abort_all();
    }

    /// While down, every new connection is closed as soon as it is accepted.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    /// Connections carried to the target so far.
    pub fn carried(&self) -> usize {
        self.carried.load(Ordering::SeqCst)
    }

    /// Connections refused while down.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}
