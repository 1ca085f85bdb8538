//! form-bench: the platform's benchmarks. Each prints a table of this machine's
//! figures beside the peer measured in the same run, and the target.
//!
//! ```text
//! cargo build --release -p form-state -p form-bench
//! ./target/release/form-bench state-apply
//! ./target/release/form-bench state-convergence
//! ./target/release/form-bench state-bytes
//! ./target/release/form-bench state-recovery
//! ./target/release/form-bench vmm-clone
//! ./target/release/form-bench vmm-transfer
//! ./target/release/form-bench scaler-nodes
//! ./target/release/form-bench rplb-pick
//! ./target/release/form-bench rplb-http      # needs wrk, nginx-light, haproxy
//! ./target/release/form-bench scaler-decide
//! ./target/release/form-bench scaler-scale-out
//! ./target/release/form-bench state-handoff
//! ./target/release/form-bench state-continuous
//! ./target/release/form-bench scaler-fleet
//! ./target/release/form-bench state-snapshot
//! ./target/release/form-bench sim --seeds 1000
//! ./target/release/form-bench sim-fleet
//! ```

mod load;
mod proc_cost;
mod rplb_http;
mod rplb_pick;
mod scaler_decide;
mod scaler_fleet;
mod scaler_nodes;
mod scaler_place;
mod scaler_scale_out;
mod sim;
mod state_apply;
mod state_bytes;
mod state_continuous;
mod state_convergence;
mod state_handoff;
mod state_recovery;
mod state_snapshot;
mod tls_cost;
mod vmm_clone;
mod vmm_transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// form-bench: benchmarks of the platform.
#[derive(Debug, Parser)]
#[command(name = "form-bench", version, about, long_about = None)]
struct Cli {
    /// Directory of the service binaries [default: the directory of form-bench]
    #[arg(long, value_name = "DIR", global = true)]
    bin_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

// Benchmarks of other services join these as their issues land.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Delta apply throughput (unsigned) and signature verification (single and batch), one core.
    StateApply {
        /// Deltas to apply.
        #[arg(long, default_value_t = 200_000)]
        deltas: usize,
    },
    /// Time from a write on one replica until every replica has it: delta against full-state gossip.
    StateConvergence {
        /// Writes measured per configuration.
        #[arg(long, default_value_t = 200)]
        writes: usize,
        /// form-state's --push-gather-ms for the rows that push at once.
        #[arg(long, default_value_t = 2)]
        gather_ms: u64,
        /// Only the CPU per write, not the convergence rows.
        #[arg(long)]
        cpu_only: bool,
    },
    /// Bytes on the wire for one member update in a cluster of many members: delta against full state.
    StateBytes {
        /// Members in the cluster.
        #[arg(long, default_value_t = 10_000)]
        members: usize,
        /// Replicas.
        #[arg(long, default_value_t = 5)]
        replicas: usize,
    },
    /// Time from start to ready for a replica holding many entries (snapshot and log).
    StateRecovery {
        /// Member adds written (about 5 entries each).
        #[arg(long, default_value_t = 20_000)]
        members: usize,
    },
    /// Time of one backend pick of the balancer, per affinity method, 100 backends.
    RplbPick {
        /// Picks measured per method.
        #[arg(long, default_value_t = 200_000)]
        picks: usize,
    },
    /// The balancer's peak requests/s and added latency, beside nginx and HAProxy.
    RplbHttp {
        /// wrk runs per proxy (the median counts).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Fixed request rate of the latency measurement.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Also count each proxy's system calls per request during its first run
        /// (`perf stat`, from Debian's linux-perf; run as root).
        #[arg(long)]
        syscalls: bool,
        /// Clients speak HTTPS (TLS 1.3) to every proxy, each with the same certificate.
        #[arg(long)]
        https: bool,
    },
    /// Cost of one scaling decision, and of one evaluation round over many clusters.
    ScalerDecide {
        /// decide() calls timed.
        #[arg(long, default_value_t = 100_000)]
        calls: usize,
        /// Clusters in the evaluation round.
        #[arg(long, default_value_t = 1_000)]
        clusters: usize,
    },
    /// Cost to the replica lock of whole-state work: a copy-on-write clone against encoding the state.
    StateSnapshot {
        /// Clusters.
        #[arg(long, default_value_t = 1_000)]
        clusters: usize,
        /// Members per cluster.
        #[arg(long, default_value_t = 10)]
        members: usize,
    },
    /// Operations on a simulated fleet (in-process nodes, in-memory backend) against a single node.
    ScalerFleet {
        /// Nodes in the fleet.
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// Clusters.
        #[arg(long, default_value_t = 1_000)]
        clusters: usize,
        /// Instances per cluster before the scale-out.
        #[arg(long, default_value_t = 10)]
        members: u32,
    },
    /// The simulator on many seeds: runs per second and every failing seed.
    Sim {
        /// Seeds to run.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Replicas.
        #[arg(long, default_value_t = 5)]
        replicas: usize,
        /// Simulated seconds of faults per run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Seeded runs of operations under faults on the in-process platform (form-state
    /// replicas, vmm nodes, balancers and a controller over an in-memory network, on
    /// paused time), each for a span of simulated time: runs per second and every
    /// failing seed.
    SimPlatform {
        /// Seeds to run.
        #[arg(long, default_value_t = 10)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// form-state replicas.
        #[arg(long, default_value_t = 5)]
        replicas: usize,
        /// vmm nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Balancers.
        #[arg(long, default_value_t = 2)]
        balancers: usize,
        /// Simulated seconds of operations per run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The controller's evaluation round on the in-process platform at 9 replicas, 100
    /// nodes and 1,000 clusters of 10, against 3 replicas, 10 nodes and 10 clusters.
    SimPlatformFleet {
        /// Clusters at fleet scale.
        #[arg(long, default_value_t = 1_000)]
        clusters: usize,
        /// Rounds timed per case.
        #[arg(long, default_value_t = 20)]
        rounds: u64,
    },
    /// Convergence in simulation at fleet scale (9 replicas, 1,000 clusters) against 3 replicas and 10 clusters.
    SimFleet {
        /// Clusters of 10 members at fleet scale.
        #[arg(long, default_value_t = 1_000)]
        clusters: usize,
        /// Simulated seconds of writes.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Cost of placing a new instance on a fleet of nodes (pure placement, no I/O).
    ScalerPlace {
        /// Nodes in the fleet.
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// Clusters of 10 instances on it.
        #[arg(long, default_value_t = 1_000)]
        clusters: usize,
    },
    /// Time from a scale-out request until the new instance serves through the balancer.
    ScalerScaleOut {
        /// Scale-outs measured.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Guest directory (deploy/guest/build.sh) to measure the qemu backend too.
        #[arg(long, value_name = "DIR")]
        guest_dir: Option<PathBuf>,
    },
    /// Handoff of an instance's application state to 3 others, and what the state
    /// steps add to scale-out and scale-in (state_sync on_scale against none).
    StateHandoff {
        /// Handoffs measured.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Keys of 1 KiB the victim holds.
        #[arg(long, default_value_t = 10_000)]
        keys: usize,
        /// Scale-outs and scale-ins measured per mode (0 skips them).
        #[arg(long, default_value_t = 10)]
        op_runs: usize,
        /// Keys of 1 KiB the clone holds at each scale-in.
        #[arg(long, default_value_t = 1_000)]
        op_keys: usize,
    },
    /// Continuous state sync: time until a write is on every instance, and the write
    /// throughput it costs against state_sync none.
    StateContinuous {
        /// Instances.
        #[arg(long, default_value_t = 10)]
        instances: u32,
        /// Background writes per second on each instance.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// The sync interval in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u32,
        /// Seconds of each measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// What mutual TLS costs the control plane: gossip convergence and scale-out, with
    /// TLS and in plaintext, alternated in one run.
    TlsCost {
        /// Rounds, each measuring both modes.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Writes per round and mode (convergence).
        #[arg(long, default_value_t = 100)]
        writes: usize,
        /// Scale-outs per round and mode.
        #[arg(long, default_value_t = 5)]
        scale_outs: usize,
    },
    /// Snapshot and clone-to-serving time of the VMM service's backends.
    VmmClone {
        /// Snapshots and clones measured.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Keys the primary holds.
        #[arg(long, default_value_t = 1000)]
        keys: usize,
        /// Guest directory (deploy/guest/build.sh) to measure the qemu backend too.
        #[arg(long, value_name = "DIR")]
        guest_dir: Option<PathBuf>,
        /// Guest memory sizes measured (qemu), MiB, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [256u64, 1024])]
        memory_mib: Vec<u64>,
    },
    /// Snapshot transfer throughput node to node against the link's, in the same run.
    VmmTransfer {
        /// Pulls measured per link.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// MiB of values the snapshotted instance holds.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// The shaped link's rate, MiB/s.
        #[arg(long, default_value_t = 100)]
        link_mib: u64,
    },
    /// Scale-out to serving with the clone on the snapshot's node and on another node.
    ScalerNodes {
        /// Scale-outs measured per placement.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Guest directory (deploy/guest/build.sh) to measure the qemu backend too.
        #[arg(long, value_name = "DIR")]
        guest_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match form_runtime::cli::parse::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let bin_dir = cli.bin_dir.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
            .unwrap_or_default()
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("form-bench: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::StateApply { deltas } => state_apply::run(deltas),
            Command::StateConvergence {
                writes,
                gather_ms,
                cpu_only,
            } => state_convergence::run(&bin_dir, writes, gather_ms, cpu_only).await,
            Command::StateBytes { members, replicas } => {
                state_bytes::run(&bin_dir, members, replicas).await
            }
            Command::StateRecovery { members } => state_recovery::run(&bin_dir, members).await,
            Command::RplbPick { picks } => rplb_pick::run(picks),
            Command::ScalerDecide { calls, clusters } => scaler_decide::run(calls, clusters),
            Command::ScalerPlace { nodes, clusters } => scaler_place::run(nodes, clusters),
            Command::ScalerFleet {
                nodes,
                clusters,
                members,
            } => scaler_fleet::run(&bin_dir, nodes, clusters, members).await,
            Command::StateSnapshot { clusters, members } => state_snapshot::run(clusters, members),
            Command::Sim {
                seeds,
                from,
                replicas,
                seconds,
            } => sim::seeds(from, seeds, replicas, seconds),
            Command::SimFleet { clusters, seconds } => sim::fleet(clusters, seconds),
            Command::SimPlatformFleet { clusters, rounds } => {
                sim::platform_fleet(clusters, rounds).await
            }
            Command::SimPlatform {
                seeds,
                from,
                replicas,
                nodes,
                balancers,
                seconds,
            } => sim::platform(sim::PlatformRuns {
                from,
                count: seeds,
                replicas,
                nodes,
                balancers,
                seconds,
            }),
            Command::RplbHttp {
                runs,
                seconds,
                rate,
                syscalls,
                https,
            } => rplb_http::run(&bin_dir, runs, seconds, rate, syscalls, https).await,
            Command::ScalerScaleOut { runs, guest_dir } => {
                scaler_scale_out::run(&bin_dir, runs, guest_dir.as_deref()).await
            }
            Command::StateHandoff {
                runs,
                keys,
                op_runs,
                op_keys,
            } => state_handoff::run(&bin_dir, runs, keys, op_runs, op_keys).await,
            Command::StateContinuous {
                instances,
                rate,
                interval_ms,
                seconds,
            } => state_continuous::run(&bin_dir, instances, rate, interval_ms, seconds).await,
            Command::TlsCost {
                rounds,
                writes,
                scale_outs,
            } => tls_cost::run(&bin_dir, rounds, writes, scale_outs).await,
            Command::VmmClone {
                runs,
                keys,
                guest_dir,
                memory_mib,
            } => vmm_clone::run(&bin_dir, runs, keys, guest_dir.as_deref(), &memory_mib).await,
            Command::VmmTransfer {
                runs,
                mib,
                link_mib,
            } => vmm_transfer::run(&bin_dir, runs, mib, link_mib).await,
            Command::ScalerNodes { runs, guest_dir } => {
                scaler_nodes::run(&bin_dir, runs, guest_dir.as_deref()).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("form-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// This build's form-demo-app (in `bin_dir`), checked at `/healthz`.
pub(crate) fn demo_workload(bin_dir: &std::path::Path) -> form_proto::types::v1::Workload {
    form_proto::types::v1::Workload {
        command: bin_dir.join("form-demo-app").display().to_string(),
        health_path: "/healthz".into(),
        ..Default::default()
    }
}

/// A request for instance `id` of cluster `bench` running [`demo_workload`].
pub(crate) fn demo_instance(
    bin_dir: &std::path::Path,
    id: &str,
    resources: Option<form_proto::types::v1::Resources>,
) -> form_proto::vmm::v1::CreateInstanceRequest {
    form_proto::vmm::v1::CreateInstanceRequest {
        instance_id: id.into(),
        cluster_id: "bench".into(),
        workload: Some(demo_workload(bin_dir)),
        resources,
    }
}

/// The `q` quantile (0..=1) of sorted samples.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}
