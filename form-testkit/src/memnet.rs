//! An in-memory network for in-process services: gRPC servers registered by name,
//! tonic channels that reach them through in-memory pipes, and faults. The services
//! and their clients are the production code; only the sockets are replaced, so every
//! call is encoded, framed and answered as on the wire.
//!
//! Faults: [`Net::partition`] isolates a name: it refuses new connections to it and
//! from it (those it opens as a caller named by [`Net::channel_from`]) and cuts those
//! open, both sides seeing the connection break, as when a host goes away;
//! [`Net::partition_between`] does the same only for the connections one caller
//! (named by [`Net::channel_from`]) opens to a name; [`Net::heal`] and
//! [`Net::heal_between`] let connections through again. A tonic channel redials by
//! itself at its next call. [`Net::delay`] gives every connection opened after it a
//! latency each way, drawn from a seed: its bytes arrive that long after they were
//! sent, in order (on paused time the delays are simulated).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tonic::transport::{Channel, Endpoint, Uri};

/// Bytes a pipe buffers each way.
const PIPE: usize = 256 * 1024;

/// See the module documentation. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Net {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Where a new connection to each name is handed to its server.
    servers: HashMap<String, mpsc::UnboundedSender<DuplexStream>>,
    /// Names no connection reaches.
    partitioned: HashSet<String>,
    /// (caller, name) pairs cut apart.
    cut: HashSet<(String, String)>,
    /// The relays of the open connections to each name, with their caller.
    open: HashMap<String, Vec<(Option<String>, AbortHandle)>>,
    /// Latencies: the generator's state and the most one way takes (see [`Net::delay`]).
    latency: Option<(u64, Duration)>,
}

/// SplitMix64's next value of `state`.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Net {
    /// Serves `router` as `name` until `stop` resolves.
    pub fn serve(
        &self,
        name: &str,
        router: tonic::transport::server::Router,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let (tx, rx) = mpsc::unbounded_channel::<DuplexStream>();
        self.lock().servers.insert(name.to_owned(), tx);
        let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let incoming = tokio_stream::StreamExt::map(incoming, Ok::<_, io::Error>);
        let name = name.to_owned();
        tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                eprintln!("in-memory server {name}: {e}");
            }
        })
    }

    /// A channel to `name` (connected at its first call, and again after a cut).
    pub fn channel(&self, name: &str) -> Channel {
        self.connector(None, name)
    }

    /// A channel to `name` whose connections are `from`'s (see [`Net::partition_between`]).
    pub fn channel_from(&self, from: &str, name: &str) -> Channel {
        self.connector(Some(from.to_owned()), name)
    }

    fn connector(&self, from: Option<String>, name: &str) -> Channel {
        Endpoint::from_static("http://in-memory.invalid").connect_with_connector_lazy(Connector {
            net: self.clone(),
            from,
            name: name.to_owned(),
        })
    }

    /// Isolates `name`: refuses connections to it and those it opens as a caller
    /// ([`Net::channel_from`]), and cuts the open ones both ways.
    pub fn partition(&self, name: &str) {
        let mut inner = self.lock();
        inner.partitioned.insert(name.to_owned());
        for (_, relay) in inner.open.remove(name).unwrap_or_default() {
            relay.abort();
        }
        for open in inner.open.values_mut() {
            open.retain(|(caller, relay)| {
                let cut = caller.as_deref() == Some(name);
                if cut {
                    relay.abort();
                }
                !cut
            });
        }
    }

    /// Lets connections to `name` through again.
    pub fn heal(&self, name: &str) {
        self.lock().partitioned.remove(name);
    }

    /// Refuses `from`'s connections to `name` and cuts those open; others pass.
    pub fn partition_between(&self, from: &str, name: &str) {
        let mut inner = self.lock();
        inner.cut.insert((from.to_owned(), name.to_owned()));
        if let Some(open) = inner.open.get_mut(name) {
            open.retain(|(caller, relay)| {
                let cut = caller.as_deref() == Some(from);
                if cut {
                    relay.abort();
                }
                !cut
            });
        }
    }

    /// Gives every connection opened from now on a latency each way, drawn from
    /// `seed` between none and `most` (the same draws for the same order of
    /// connections); `Duration::ZERO` ends the delays.
    pub fn delay(&self, seed: u64, most: Duration) {
        self.lock().latency = (!most.is_zero()).then_some((seed, most));
    }

    /// Lets `from`'s connections to `name` through again.
    pub fn heal_between(&self, from: &str, name: &str) {
        self.lock().cut.remove(&(from.to_owned(), name.to_owned()));
    }

    /// A new connection to `name`: a pipe to the client, a pipe to the server, and a
    /// relay between them that a partition aborts.
    fn connect(&self, from: Option<&str>, name: &str) -> io::Result<DuplexStream> {
        let mut inner = self.lock();
        if let Some(f) = from
            && inner.cut.contains(&(f.to_owned(), name.to_owned()))
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{f} is cut off from {name}"),
            ));
        }
        if let Some(f) = from
            && inner.partitioned.contains(f)
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{f} is partitioned"),
            ));
        }
        if inner.partitioned.contains(name) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{name} is partitioned"),
            ));
        }
        let Some(server) = inner.servers.get(name) else {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("nothing serves {name}"),
            ));
        };
        let (client, mut near) = tokio::io::duplex(PIPE);
        let (mut far, served) = tokio::io::duplex(PIPE);
        server.send(served).map_err(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{name} stopped serving"),
            )
        })?;
        let mut draw = || match &mut inner.latency {
            Some((state, most)) => {
                let ms = most.as_millis().max(1) as u64;
                Duration::from_millis(splitmix(state) % (ms + 1))
            }
            None => Duration::ZERO,
        };
        let (up, down) = (draw(), draw());
        let relay = tokio::spawn(async move {
            if up.is_zero() && down.is_zero() {
                let _ = tokio::io::copy_bidirectional(&mut near, &mut far).await;
                return;
            }
            let (near_r, near_w) = tokio::io::split(near);
            let (far_r, far_w) = tokio::io::split(far);
            tokio::join!(delayed(near_r, far_w, up), delayed(far_r, near_w, down));
        });
        let open = inner.open.entry(name.to_owned()).or_default();
        open.retain(|(_, r)| !r.is_finished());
        open.push((from.map(str::to_owned), relay.abort_handle()));
        Ok(client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Copies `from` to `to`, each read arriving `latency` after it was read, in order;
/// closes `to` after the last.
async fn delayed(
    mut from: tokio::io::ReadHalf<DuplexStream>,
    mut to: tokio::io::WriteHalf<DuplexStream>,
    latency: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx
                .send((tokio::time::Instant::now() + latency, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Connects a channel to one name of a [`Net`].
#[derive(Debug, Clone)]
struct Connector {
    net: Net,
    from: Option<String>,
    name: String,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<DuplexStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let r = self
            .net
            .connect(self.from.as_deref(), &self.name)
            .map(TokioIo::new);
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    async fn check(net: &Net) -> Result<i32, tonic::Status> {
        let mut c = HealthClient::new(net.channel("svc"));
        let call = c.check(HealthCheckRequest::default());
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(r) => Ok(r?.into_inner().status),
            Err(_) => Err(tonic::Status::deadline_exceeded("no answer in 5 s")),
        }
    }

    /// A net serving gRPC health as "svc", the sender that stops it, and its task.
    fn health_service() -> (
        Net,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let net = Net::default();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let router = tonic::transport::Server::builder().add_service(health);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = net.serve("svc", router, async {
            let _ = stopped.await;
        });
        (net, stop, served)
    }

    #[tokio::test]
    async fn calls_go_through_until_a_partition_and_again_after_the_heal() {
        let (net, stop, served) = health_service();
        assert_eq!(check(&net).await.ok(), Some(ServingStatus::Serving as i32));

        // One channel across the faults: it breaks, then redials by itself.
        let mut c = HealthClient::new(net.channel("svc"));
        assert!(c.check(HealthCheckRequest::default()).await.is_ok());
        net.partition("svc");
        // The open connection was cut (the call fails as on a closed socket), and a
        // new one is refused.
        for _ in 0..2 {
            let code = c
                .check(HealthCheckRequest::default())
                .await
                .map_err(|s| s.code());
            assert!(
                matches!(code, Err(tonic::Code::Unavailable | tonic::Code::Cancelled)),
                "a partitioned name is unreachable: {code:?}"
            );
        }
        net.heal("svc");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while c.check(HealthCheckRequest::default()).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "healed within 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            check(&Net::default()).await.is_err(),
            "another net has no such name"
        );

        // A partitioned caller reaches nothing either.
        let mut from_svc = HealthClient::new(net.channel_from("svc", "svc"));
        assert!(from_svc.check(HealthCheckRequest::default()).await.is_ok());
        net.partition("svc");
        assert!(from_svc.check(HealthCheckRequest::default()).await.is_err());
        net.heal("svc");

        // A cut between one caller and the name leaves the others through.
        let mut a = HealthClient::new(net.channel_from("a", "svc"));
        let mut b = HealthClient::new(net.channel_from("b", "svc"));
        assert!(a.check(HealthCheckRequest::default()).await.is_ok());
        net.partition_between("a", "svc");
        assert!(
            a.check(HealthCheckRequest::default()).await.is_err(),
            "a is cut off"
        );
        assert!(
            b.check(HealthCheckRequest::default()).await.is_ok(),
            "b is not"
        );
        net.heal_between("a", "svc");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while a.check(HealthCheckRequest::default()).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a healed within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
        served.await.expect("the server stops");
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_connections_carry_every_byte_late_and_in_order() {
        let (net, stop, served) = health_service();
        let t0 = tokio::time::Instant::now();
        assert_eq!(check(&net).await.ok(), Some(ServingStatus::Serving as i32));
        assert_eq!(t0.elapsed(), Duration::ZERO, "no delay unless asked");

        net.delay(7, Duration::from_millis(200));
        let t0 = tokio::time::Instant::now();
        assert_eq!(check(&net).await.ok(), Some(ServingStatus::Serving as i32));
        let took = t0.elapsed();
        assert!(
            took > Duration::ZERO && took <= Duration::from_millis(2 * 200 * 4),
            "a call over a new connection waits for the drawn latencies: {took:?}"
        );
        // A delayed connection is cut by a partition like any other.
        let mut c = HealthClient::new(net.channel("svc"));
        assert!(c.check(HealthCheckRequest::default()).await.is_ok());
        net.partition("svc");
        assert!(c.check(HealthCheckRequest::default()).await.is_err());
        net.heal("svc");
        let _ = stop.send(());
        served.await.expect("the server stops");
    }
}
