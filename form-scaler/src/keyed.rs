//! Async locks by name: a request on one cluster waits only for requests on that
//! cluster (and on the same operation id), not for every request of the fleet. A
//! name's lock exists while someone holds or waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Keyed {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds the lock of one name; dropping it lets the next waiter in.
#[derive(Debug)]
pub struct Held<'a> {
    keyed: &'a Keyed,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Keyed {
    /// Waits for the lock of `key`.
    pub async fn lock(&self, key: String) -> Held<'_> {
        let m = {
            let mut map = self.map();
            // A lock only this map holds is unused: one whose waiter was cancelled
            // after its holder let go is left behind, and goes here.
            map.retain(|k, m| *k == key || Arc::strong_count(m) > 1);
            map.entry(key.clone()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        Held {
            keyed: self,
            key,
            guard: Some(guard),
        }
    }

    /// How many names have a lock (held or waited for).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether no name has a lock.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.locks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many hold `key`'s lock: the map, its holder, its waiters (tests).
    #[cfg(test)]
    fn refs(&self, key: &str) -> usize {
        self.map().get(key).map_or(0, Arc::strong_count)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.keyed.map();
        // Only this map holds it now: nobody waits, the name's lock goes.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_name_waits_for_itself_only_and_its_lock_goes_when_unused() {
        let k = Arc::new(Keyed::default());
        let a = k.lock("a".into()).await;
        // Another name is not held up.
        let b = tokio::time::timeout(Duration::from_secs(5), k.lock("b".into()))
            .await
            .expect("another name does not wait");
        drop(b);
        // The same name waits until the holder lets go.
        let k2 = k.clone();
        let waiter = tokio::spawn(async move {
            let _a = k2.lock("a".into()).await;
        });
        // The map, the holder's guard, and the waiter once it waits.
        while k.refs("a") < 3 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "a held name makes the next wait");
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter gets the lock once it is let go")
            .expect("the waiter ran");
        assert!(k.is_empty(), "no lock is kept for names nobody holds");
    }
}

#[cfg(test)]
mod cancelled {
    use super::*;

    #[tokio::test]
    async fn a_waiter_cancelled_after_the_holder_let_go_leaves_no_lock_behind() {
        let k = Keyed::default();
        let held = k.lock("op".into()).await;
        {
            let waiting = k.lock("op".into());
            tokio::pin!(waiting);
            // Polled once: it waits behind the holder.
            assert!(futures_poll_once(waiting.as_mut()).await.is_none());
            drop(held);
            // Cancelled before it runs again.
        }
        let _other = k.lock("cluster".into()).await;
        assert_eq!(k.len(), 1, "only the lock in use is left");
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
