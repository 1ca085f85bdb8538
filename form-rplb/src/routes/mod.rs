//! The route table: domain -> route. A route's view (settings, backends, selector) is
//! immutable and swapped whole on every change, so a request works with one consistent
//! view and a change never blocks or drops requests in flight. Backends keep their
//! run-time object (counters, drain, health) across changes while their id and address
//! stay the same.

pub mod backend;
pub mod settings;

use std::collections::HashMap;

use crate::balance::KeyHash;
use std::sync::{Arc, RwLock};

use tokio::time::Instant;

use form_proto::rplb::v1 as pb;

use crate::balance::health::HealthConfig;
use crate::balance::select::Selector;
use backend::BackendRt;
use settings::{BackendSpec, RouteSettings};

/// Who made a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `RplbControl` (kept until removed there).
    Control,
    /// form-state's cluster (follows it).
    State,
}

/// One route, as requests see it.
#[derive(Debug)]
pub struct RouteView {
    /// Settings.
    pub settings: RouteSettings,
    /// Backends, in the selector's order.
    pub backends: Vec<Arc<BackendRt>>,
    /// The selector over `backends`' states when the view was made.
    pub selector: Selector,
    /// Who made it.
    pub source: Source,
}

impl RouteView {
    fn new(settings: RouteSettings, backends: Vec<Arc<BackendRt>>, source: Source) -> Self {
        let selector = Selector::new(backends.iter().map(|b| b.selector_backend()).collect());
        Self {
            settings,
            backends,
            selector,
            source,
        }
    }

    /// The backend named `id`.
    pub fn backend(&self, id: &str) -> Option<&Arc<BackendRt>> {
        self.backends.iter().find(|b| b.id == id)
    }

    /// The contract's view of the route.
    pub fn to_pb(&self) -> pb::Route {
        pb::Route {
            domain: self.settings.domain.clone(),
            cluster_id: self.settings.cluster_id.clone(),
            affinity: Some(settings::affinity_to_pb(&self.settings.affinity)),
            health_check: Some(settings::check_to_pb(&self.settings.check)),
            drain: Some(settings::drain_to_pb(&self.settings.drain)),
            backends: self.backends.iter().map(|b| b.to_pb()).collect(),
        }
    }
}

/// What a change did to backends (the caller starts and stops their tasks).
#[derive(Debug, Default)]
pub struct Change {
    /// Backends that joined.
    pub added: Vec<Arc<BackendRt>>,
    /// Backends that left at once.
    pub removed: Vec<Arc<BackendRt>>,
    /// Backends that stay until a drain ends.
    pub to_drain: Vec<Arc<BackendRt>>,
}

/// The route table.
#[derive(Debug)]
pub struct Table {
    routes: RwLock<HashMap<String, Arc<RouteView>, KeyHash>>,
    passive: HealthConfig,
}

/// How a backend set is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Backends not in the new set leave at once.
    Immediate,
    /// Backends not in the new set are drained first.
    Drain,
}

impl Table {
    /// An empty table; `passive` carries passive-ejection thresholds (rise and fall come
    /// from each route).
    pub fn new(passive: HealthConfig) -> Self {
        Self {
            routes: RwLock::new(HashMap::default()),
            passive,
        }
    }

    /// The route of `domain`.
    pub fn get(&self, domain: &str) -> Option<Arc<RouteView>> {
        self.read().get(domain).cloned()
    }

    /// Every route, ordered by domain.
    pub fn list(&self) -> Vec<Arc<RouteView>> {
        let mut v: Vec<_> = self.read().values().cloned().collect();
        v.sort_by(|a, b| a.settings.domain.cmp(&b.settings.domain));
        v
    }

    fn health_config(&self, s: &RouteSettings) -> HealthConfig {
        HealthConfig {
            rise: s.check.rise,
            fall: s.check.fall,
            ..self.passive
        }
    }

    /// Creates or replaces a route; `backends: None` keeps the current backends.
    pub fn upsert(
        &self,
        settings: RouteSettings,
        backends: Option<&[BackendSpec]>,
        source: Source,
        removal: Removal,
    ) -> (Arc<RouteView>, Change) {
        let mut routes = self.write();
        let old = routes.get(&settings.domain).cloned();
        let hc = self.health_config(&settings);
        let mut change = Change::default();
        let current: Vec<Arc<BackendRt>> =
            old.as_ref().map(|o| o.backends.clone()).unwrap_or_default();
        let list = match backends {
            None => current,
            Some(specs) => merge(&current, specs, hc, removal, &mut change),
        };
        for b in &list {
            b.with_health(|h| h.set_config(hc));
        }
        let view = Arc::new(RouteView::new(settings, list, source));
        routes.insert(view.settings.domain.clone(), view.clone());
        (view, change)
    }

    /// Replaces the backends of `domain`; `None` when there is no such route.
    pub fn set_backends(
        &self,
        domain: &str,
        specs: &[BackendSpec],
        removal: Removal,
    ) -> Option<(Arc<RouteView>, Change)> {
        let mut routes = self.write();
        let old = routes.get(domain)?.clone();
        let mut change = Change::default();
        let hc = self.health_config(&old.settings);
        let list = merge(&old.backends, specs, hc, removal, &mut change);
        let view = Arc::new(RouteView::new(old.settings.clone(), list, old.source));
        routes.insert(domain.to_owned(), view.clone());
        Some((view, change))
    }

    /// Removes a route; returns its backends (they stop), `None` when absent.
    pub fn remove(&self, domain: &str) -> Option<Vec<Arc<BackendRt>>> {
        let old = self.write().remove(domain)?;
        for b in &old.backends {
            b.set_removed();
        }
        Some(old.backends.clone())
    }

    /// Rebuilds the selector of `domain` from its backends' current states (after a
    /// drain or health change).
    pub fn refresh(&self, domain: &str) {
        let mut routes = self.write();
        if let Some(old) = routes.get(domain).cloned() {
            let view = RouteView::new(old.settings.clone(), old.backends.clone(), old.source);
            routes.insert(domain.to_owned(), Arc::new(view));
        }
    }

    /// Takes `backend` out of `domain` (a drain of a leaving backend ended).
    pub fn drop_backend(&self, domain: &str, backend: &Arc<BackendRt>) {
        let mut routes = self.write();
        if let Some(old) = routes.get(domain).cloned() {
            let list: Vec<_> = old
                .backends
                .iter()
                .filter(|b| !Arc::ptr_eq(b, backend))
                .cloned()
                .collect();
            let view = RouteView::new(old.settings.clone(), list, old.source);
            routes.insert(domain.to_owned(), Arc::new(view));
        }
        backend.set_removed();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<RouteView>, KeyHash>> {
        self.routes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<RouteView>, KeyHash>> {
        self.routes.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// The new backend list: kept objects for unchanged (id, address), new ones for the
/// rest; backends that are not in `specs` leave or stay to drain.
fn merge(
    current: &[Arc<BackendRt>],
    specs: &[BackendSpec],
    hc: HealthConfig,
    removal: Removal,
    change: &mut Change,
) -> Vec<Arc<BackendRt>> {
    let now = Instant::now();
    let mut list = Vec::with_capacity(specs.len());
    for spec in specs {
        match current.iter().find(|b| b.matches(spec)) {
            Some(b) => list.push(b.clone()),
            None => {
                let b = Arc::new(BackendRt::new(spec, hc, now));
                change.added.push(b.clone());
                list.push(b);
            }
        }
    }
    for b in current {
        if list.iter().any(|n| Arc::ptr_eq(n, b)) {
            continue;
        }
        let replaced = list.iter().any(|n| n.id == b.id);
        if removal == Removal::Drain && !replaced {
            b.set_leaving();
            change.to_drain.push(b.clone());
            list.push(b.clone());
        } else {
            b.set_removed();
            change.removed.push(b.clone());
        }
    }
    list
}

#[cfg(test)]
mod tests {
    use super::settings::{CheckSettings, DrainSettings};
    use super::*;
    use crate::balance::select::Affinity;

    fn settings() -> RouteSettings {
        RouteSettings {
            domain: "demo.fog".into(),
            cluster_id: "demo".into(),
            affinity: Affinity::None,
            check: CheckSettings::default(),
            drain: DrainSettings::default(),
        }
    }

    fn spec(id: &str, port: u16) -> BackendSpec {
        BackendSpec {
            id: id.into(),
            authority: format!("127.0.0.1:{port}").parse().expect("authority"),
            weight: 1,
            active: true,
        }
    }

    #[test]
    fn backends_keep_their_objects_across_changes_and_removed_ones_stop() {
        let t = Table::new(HealthConfig::default());
        let (v1, c) = t.upsert(
            settings(),
            Some(&[spec("a", 1), spec("b", 2)]),
            Source::Control,
            Removal::Immediate,
        );
        assert_eq!(c.added.len(), 2);
        let a = v1.backend("a").expect("a").clone();
        // An upsert without backends keeps them; a new set keeps 'a' and drops 'b'.
        let (v2, c) = t.upsert(settings(), None, Source::Control, Removal::Immediate);
        assert!(c.added.is_empty() && Arc::ptr_eq(v2.backend("a").expect("a"), &a));
        let (v3, c) = t
            .set_backends(
                "demo.fog",
                &[spec("a", 1), spec("c", 3)],
                Removal::Immediate,
            )
            .expect("route");
        assert!(Arc::ptr_eq(v3.backend("a").expect("a"), &a));
        assert_eq!(c.removed.len(), 1);
        assert!(c.removed[0].is_removed() && !a.is_removed());
        // An address change makes a new object; draining removal keeps the old one.
        let (v4, c) = t
            .set_backends("demo.fog", &[spec("a", 9)], Removal::Drain)
            .expect("route");
        assert_eq!(
            (c.added.len(), c.removed.len(), c.to_drain.len()),
            (1, 1, 1)
        );
        assert_eq!(v4.backends.len(), 2, "'c' stays to drain, 'a' replaced");
        assert!(v4.backend("c").expect("c").is_leaving());
        // Listed again, a leaving or drained backend becomes active again (a new object).
        let c = v4.backend("c").expect("c").clone();
        let (v5, _) = t
            .set_backends(
                "demo.fog",
                &[spec("a", 9), spec("c", 3)],
                Removal::Immediate,
            )
            .expect("route");
        assert!(!Arc::ptr_eq(v5.backend("c").expect("c"), &c) && c.is_removed());
        assert!(!v5.backend("c").expect("c").is_leaving());
        assert!(t.set_backends("nowhere", &[], Removal::Immediate).is_none());
        assert_eq!(t.remove("demo.fog").map(|b| b.len()), Some(2));
        let _ = v4;
        assert!(t.get("demo.fog").is_none());
    }
}
