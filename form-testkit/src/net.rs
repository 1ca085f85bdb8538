//! Network helpers for tests: free loopback addresses, and a TCP proxy that can cut
//! and heal a link, so real processes can be partitioned from each other.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// `n` distinct free addresses on 127.0.0.1, from below the kernel's ephemeral range
/// (see `form_runtime::ports`). For processes that must know each other's addresses
/// before they start.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let host = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    form_runtime::ports::choose_many(host, n)
        .unwrap_or_else(|e| panic!("free ports: {e}"))
        .into_iter()
        .map(|p| SocketAddr::new(host, p))
        .collect()
}

/// A TCP proxy on 127.0.0.1 to one target. `cut` drops every connection and refuses
/// new ones until `heal`.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy to `target` on a free port.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        Self::with_listener(listener, target)
    }

    /// A proxy to `target` on `addr` (an address taken from [`free_addrs`]).
    pub async fn start_at(addr: SocketAddr, target: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        Self::with_listener(listener, target)
    }

    fn with_listener(listener: TcpListener, target: SocketAddr) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (c, k) = (cut.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the link is cut
                }
                let cut = c.clone();
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await
                        && !cut.load(Ordering::SeqCst)
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut conns = k.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                conns.retain(|h| !h.is_finished());
                conns.push(h.abort_handle());
            }
        });
        Self {
            addr,
            cut,
            conns,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            h.abort();
        }
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
