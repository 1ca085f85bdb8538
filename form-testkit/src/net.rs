//! Network helpers for tests: free loopback addresses, a TCP proxy that can cut and
//! heal a link, so real processes can be partitioned from each other, and a black hole
//! (a peer that accepts connections and never answers).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// new ones until `heal`; `bytes_down` counts what the target sent, so a test can cut
/// a transfer halfway.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    down: Arc<AtomicU64>,
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
        let down = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (c, k, d) = (cut.clone(), conns.clone(), down.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the link is cut
                }
                let (cut, down) = (c.clone(), d.clone());
                let h = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await
                        && !cut.load(Ordering::SeqCst)
                    {
                        let (mut in_r, mut in_w) = inbound.split();
                        let (mut out_r, mut out_w) = outbound.into_split();
                        let up = copy_counted(&mut in_r, &mut out_w, None);
                        let back = copy_counted(&mut out_r, &mut in_w, Some(&down));
                        // Each direction ends on its own (a client may close its side
                        // and still read the answer).
                        let _ = tokio::join!(up, back);
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
            down,
            conns,
            task,
        }
    }

    /// Bytes the target has sent through the proxy so far.
    pub fn bytes_down(&self) -> u64 {
        self.down.load(Ordering::SeqCst)
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

/// Copies `from` into `to` until the end (then closes `to`), adding each piece to
/// `count`.
async fn copy_counted(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    count: Option<&AtomicU64>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        if let Some(c) = count {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// A TCP listener on 127.0.0.1 that accepts every connection and never reads or
/// answers: a peer that hangs rather than refuses. Stops when dropped.
#[derive(Debug)]
pub struct BlackHole {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl BlackHole {
    /// A black hole on a free port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        Self { addr, task }
    }

    /// Where the hanging peer is.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
