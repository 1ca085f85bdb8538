//! `formctl drain`, `formctl undrain` and `formctl drain-settings`: one instance out of
//! rotation and back, and how a cluster's scale-ins drain their victims.

use std::process::ExitCode;

use serde_json::json;

use crate::client::Api;

/// Flags of `formctl drain` and `formctl undrain`.
#[derive(Debug, clap::Args)]
pub(crate) struct InstanceArgs {
    /// The cluster.
    name: String,
    /// The instance.
    instance: String,
}

/// Flags of `formctl drain-settings`.
#[derive(Debug, clap::Args)]
pub(crate) struct SettingsArgs {
    /// The cluster.
    name: String,
    /// Seconds sessions pinned to a removed instance may still use it (1-3600).
    #[arg(long, value_name = "S", default_value_t = 30)]
    grace_seconds: u32,
    /// Keep pinned sessions on a removed instance for the whole grace period (by
    /// default the drain ends once nothing is in flight and sessions move at once).
    #[arg(long)]
    keep_sessions: bool,
    /// Do not ask clients to reconnect.
    #[arg(long)]
    no_notify: bool,
}

/// The `drain` body of a scale request or of `drain-settings`.
pub(crate) fn settings(grace_seconds: u32, keep_sessions: bool, notify: bool) -> serde_json::Value {
    json!({
        "grace_period_seconds": grace_seconds,
        "wait_for_connections": !keep_sessions,
        "notify_clients": notify,
    })
}

/// `formctl drain NAME ID` (`undo`: `formctl undrain NAME ID`).
pub(crate) async fn instance(api: &Api, a: InstanceArgs, undo: bool) -> anyhow::Result<ExitCode> {
    let verb = if undo { "undrain" } else { "drain" };
    api.call(
        http::Method::POST,
        &format!(
            "/api/v1/clusters/{}/instances/{}/{verb}",
            a.name, a.instance
        ),
        None,
        &[],
    )
    .await?;
    if undo {
        println!("{} of {} serves again", a.instance, a.name);
    } else {
        println!(
            "{} of {} is draining: no new session goes to it (formctl undrain {} {} takes it back; formctl scale {} --remove {} removes it)",
            a.instance, a.name, a.name, a.instance, a.name, a.instance
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `formctl drain-settings NAME`.
pub(crate) async fn set(api: &Api, a: SettingsArgs) -> anyhow::Result<ExitCode> {
    let body = settings(a.grace_seconds, a.keep_sessions, !a.no_notify);
    let stored = api
        .call(
            http::Method::PUT,
            &format!("/api/v1/clusters/{}/drain", a.name),
            Some(&body),
            &[],
        )
        .await?;
    println!(
        "scale-ins of {} drain for up to {} s; pinned sessions {}",
        a.name,
        stored["grace_period_seconds"],
        if stored["wait_for_connections"] == true {
            "move once nothing is in flight"
        } else {
            "stay for the whole grace period"
        }
    );
    Ok(ExitCode::SUCCESS)
}
