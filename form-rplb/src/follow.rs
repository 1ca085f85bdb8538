//! Following form-state: a `Watch` from sequence 0 (a `Reset`, the whole state, then
//! `Synced`, then every change) keeps each cluster's route equal to its members, so the
//! balancer is right even when nobody pushes routes to it. Members that are active or
//! draining are backends (a draining member is drained); a cluster that is gone loses
//! its route. When the state is unreachable the last known routes stay, and the watch
//! reconnects with backoff (`form_runtime::watch`; a new watch starts with a full
//! snapshot again).

use std::collections::HashSet;
use std::sync::Arc;

use form_proto::state::v1 as pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_runtime::shutdown::Shutdown;
use form_runtime::upstream::Upstream;
use form_runtime::watch;

use crate::core::Core;
use crate::routes::settings::{self, BackendSpec, CheckSettings, DrainSettings, RouteSettings};
use crate::routes::{Removal, Source};

/// Follows the state until shutdown.
pub async fn run(core: Arc<Core>, state: Upstream, shutdown: Shutdown) {
    run_over(core, move || state.channel(), shutdown).await;
}

/// [`run`] over the channels `channel` makes (an in-memory network in tests).
pub async fn run_over(
    core: Arc<Core>,
    channel: impl Fn() -> tonic::transport::Channel,
    shutdown: Shutdown,
) {
    let open = || {
        let mut client = StateServiceClient::new(channel());
        async move { Ok(client.watch(watch::from_start()).await?.into_inner()) }
    };
    let mut routes = Routes { core, seen: None };
    watch::follow("balancer", open, &mut routes, shutdown).await;
}

/// The routes kept equal to the clusters; `seen` collects the clusters of a snapshot
/// (after a `Reset`) so those that are gone lose their routes at `Synced`.
struct Routes {
    core: Arc<Core>,
    seen: Option<HashSet<String>>,
}

impl watch::Follower for Routes {
    fn event(&mut self, ev: pb::WatchEvent) {
        on_event(&self.core, ev, &mut self.seen);
    }
}

fn on_event(core: &Arc<Core>, ev: pb::WatchEvent, seen: &mut Option<HashSet<String>>) {
    use pb::watch_event::Change;
    match ev.change {
        Some(Change::Reset(_)) => *seen = Some(HashSet::new()),
        Some(Change::Cluster(c)) => {
            if let Some(s) = seen.as_mut() {
                s.insert(c.cluster_id.clone());
            }
            // The cluster's fence, as form-state has it: a stale controller's drain is
            // refused even before the new owner calls this balancer.
            if let Some(f) = &c.fence {
                let f = form_runtime::fence::Fence {
                    epoch: f.epoch,
                    owner: f.owner.clone(),
                };
                let _ = core.fences.check(&c.cluster_id, Some(&f));
            }
            apply_cluster(core, &c);
        }
        Some(Change::ClusterDeleted(id)) => remove_cluster(core, &id, None),
        Some(Change::Synced(_)) => {
            if let Some(s) = seen.take() {
                for r in core.table.list() {
                    if r.source == Source::State && !s.contains(&r.settings.cluster_id) {
                        remove_cluster(core, &r.settings.cluster_id, None);
                    }
                }
            }
        }
        Some(Change::Operation(_)) | None => {}
    }
}

/// Removes the state-made routes of `cluster_id`, except the one for `keep`.
fn remove_cluster(core: &Core, cluster_id: &str, keep: Option<&str>) {
    for r in core.table.list() {
        if r.source == Source::State
            && r.settings.cluster_id == cluster_id
            && Some(r.settings.domain.as_str()) != keep
            && core.table.remove(&r.settings.domain).is_some()
        {
            tracing::info!(domain = %r.settings.domain, cluster = cluster_id, "route removed: cluster gone or renamed");
        }
    }
}

/// How a draining member is drained: its own settings (written by the operation that
/// drains it), else its cluster's; `None` leaves the route's.
fn member_drain(c: &pb::Cluster, m: &pb::Member) -> Option<DrainSettings> {
    let d = m.drain.or(c.drain)?;
    Some(DrainSettings {
        grace: std::time::Duration::from_secs(u64::from(form_proto::drain_grace_seconds(&d))),
        wait_for_connections: d.wait_for_connections,
        notify_clients: d.notify_clients,
    })
}

/// The backends of a cluster: its active and draining members with an address, and
/// the draining ones with their drain settings.
fn member_backends(
    c: &pb::Cluster,
    networks: &[form_runtime::cidr::Cidr],
) -> (Vec<BackendSpec>, Vec<(String, Option<DrainSettings>)>) {
    let mut specs = Vec::new();
    let mut draining = Vec::new();
    let mut ids: Vec<&String> = c.members.keys().collect();
    ids.sort();
    for id in ids {
        let m = &c.members[id];
        let status = pb::MemberStatus::try_from(m.status).unwrap_or(pb::MemberStatus::Unspecified);
        if !matches!(
            status,
            pb::MemberStatus::Active | pb::MemberStatus::Draining
        ) {
            continue;
        }
        let Some(address) = m.addresses.first() else {
            continue;
        };
        let b = form_proto::rplb::v1::Backend {
            id: id.clone(),
            address: address.clone(),
            weight: 1,
            state: 0,
        };
        let checked = settings::backend(&b).and_then(|spec| {
            settings::within_networks(std::slice::from_ref(&spec), networks).map(|()| spec)
        });
        match checked {
            Ok(mut spec) => {
                if status == pb::MemberStatus::Draining {
                    draining.push((spec.id.clone(), member_drain(c, m)));
                    spec.active = false;
                }
                specs.push(spec);
            }
            Err(e) => {
                tracing::warn!(cluster = %c.cluster_id, member = %id, error = %e, "member skipped")
            }
        }
    }
    (specs, draining)
}

fn apply_cluster(core: &Arc<Core>, c: &pb::Cluster) {
    let raw_domain = if c.domain.is_empty() {
        format!("{}.fog", c.cluster_id)
    } else {
        c.domain.clone()
    };
    let domain = match settings::domain(&raw_domain) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(cluster = %c.cluster_id, error = %e, "cluster not routed");
            return;
        }
    };
    remove_cluster(core, &c.cluster_id, Some(&domain));
    let affinity = match settings::affinity(c.affinity.as_ref()) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(cluster = %c.cluster_id, error = %e, "cluster affinity ignored");
            crate::balance::select::Affinity::None
        }
    };
    let (specs, draining) = member_backends(c, &core.config.backend_networks);
    let existing = core.table.get(&domain);
    if let Some(r) = &existing
        && r.source == Source::Control
        && r.settings.cluster_id != c.cluster_id
    {
        tracing::warn!(domain, cluster = %c.cluster_id, other = %r.settings.cluster_id, "domain is routed to another cluster by RplbControl; cluster not routed");
        return;
    }
    let settings = match &existing {
        Some(r) => RouteSettings {
            affinity,
            ..r.settings.clone()
        },
        None => RouteSettings {
            domain: domain.clone(),
            cluster_id: c.cluster_id.clone(),
            affinity,
            check: CheckSettings {
                path: c
                    .workload
                    .as_ref()
                    .map(|w| w.health_path.clone())
                    .filter(|p| p.starts_with('/'))
                    .unwrap_or_default(),
                ..CheckSettings::default()
            },
            drain: DrainSettings::default(),
        },
    };
    let unchanged = existing.as_ref().is_some_and(|r| {
        r.settings == settings
            && r.backends.len() == specs.len()
            && r.backends.iter().zip(&specs).all(|(b, s)| b.matches(s))
    });
    if !unchanged {
        let source = existing.as_ref().map_or(Source::State, |r| r.source);
        let (view, change) = core
            .table
            .upsert(settings, Some(&specs), source, Removal::Immediate);
        core.apply(&domain, change);
        tracing::info!(domain, cluster = %c.cluster_id, backends = view.backends.len(), "route follows the cluster");
    }
    if let Some(view) = core.table.get(&domain) {
        for (id, drain) in draining {
            if view
                .backend(&id)
                .is_some_and(|b| b.admin() == crate::routes::backend::Admin::Active)
                && let Err(e) =
                    crate::drain::start(core, &domain, &id, drain.unwrap_or(view.settings.drain))
            {
                tracing::warn!(domain, backend = %id, error = %e, "cannot drain a draining member");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, address: &str) -> pb::Member {
        pb::Member {
            instance_id: id.into(),
            addresses: vec![address.into()],
            status: pb::MemberStatus::Active as i32,
            ..Default::default()
        }
    }

    #[test]
    fn members_outside_the_backend_networks_are_skipped() {
        let c = pb::Cluster {
            cluster_id: "web".into(),
            members: [
                ("in".to_owned(), member("in", "10.9.1.2:8080")),
                ("out".to_owned(), member("out", "127.0.0.1:8080")),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let nets: Vec<form_runtime::cidr::Cidr> = vec!["10.9.0.0/16".parse().expect("cidr")];
        let (specs, _) = member_backends(&c, &nets);
        let ids: Vec<&str> = specs.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["in"]);
        let (specs, _) = member_backends(&c, &[]);
        assert_eq!(specs.len(), 2, "no networks: both");
    }
}
