//! One shutdown signal for every task of a service. SIGTERM asks for a graceful
//! shutdown (stop accepting, finish in-flight work, flush, exit 0 within
//! [`GRACEFUL_DEADLINE`]); SIGINT asks for a fast exit.

use std::time::Duration;

use tokio::sync::watch;

/// Hard deadline of a graceful shutdown, counted from SIGTERM; what is still running
/// then is abandoned (the process must exit within 5 s).
pub const GRACEFUL_DEADLINE: Duration = Duration::from_millis(4000);

/// How the service was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownKind {
    /// SIGTERM: drain, flush, exit 0.
    Graceful,
    /// SIGINT: exit at once.
    Fast,
}

/// A receiver of the shutdown signal; cheap to clone, one per task.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Option<ShutdownKind>>,
}

/// The sending side of the shutdown signal.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: watch::Sender<Option<ShutdownKind>>,
}

/// A new shutdown signal pair.
pub fn channel() -> (ShutdownHandle, Shutdown) {
    let (tx, rx) = watch::channel(None);
    (ShutdownHandle { tx }, Shutdown { rx })
}

impl ShutdownHandle {
    /// Asks every holder of a [`Shutdown`] to stop; the first request wins.
    pub fn trigger(&self, kind: ShutdownKind) {
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(kind);
                true
            } else {
                false
            }
        });
    }

    /// A new receiver.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    /// Waits until shutdown is requested and says how. If every sender is gone, that
    /// counts as a graceful request.
    pub async fn requested(&mut self) -> ShutdownKind {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(ShutdownKind::Graceful),
            Err(_) => ShutdownKind::Graceful,
        }
    }

    /// The request, if one was made.
    pub fn current(&self) -> Option<ShutdownKind> {
        *self.rx.borrow()
    }
}

/// Spawns a task that turns SIGTERM into a graceful and SIGINT into a fast request.
pub fn spawn_signal_listener(handle: ShutdownHandle) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down gracefully");
                handle.trigger(ShutdownKind::Graceful);
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: exiting");
                handle.trigger(ShutdownKind::Fast);
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_request_wins_and_reaches_every_receiver() {
        let (handle, mut a) = channel();
        let mut b = handle.subscribe();
        assert_eq!(a.current(), None);
        handle.trigger(ShutdownKind::Graceful);
        handle.trigger(ShutdownKind::Fast);
        assert_eq!(a.requested().await, ShutdownKind::Graceful);
        assert_eq!(b.requested().await, ShutdownKind::Graceful);
    }
}
