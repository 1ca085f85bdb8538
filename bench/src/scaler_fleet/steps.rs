//! Where the slowest scale-outs of a case spend their time: every operation's step
//! changes as form-state's Watch streams them (`watch_steps`), turned into the time
//! each step took (from its own record to the next step's: its work and the next
//! record), for the slowest 1% against every scale-out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::quantile;

/// Step changes of every operation, as they arrived: (operation, step, when).
pub(super) type Recorded = Arc<Mutex<Vec<(String, String, Instant)>>>;

/// One scale-out: the time each of its steps took, in order, and the whole.
pub(super) struct Timeline {
    pub(super) total_ms: f64,
    pub(super) steps: Vec<(String, f64)>,
}

/// The timelines of `ops` (operation id, request instant, request -> completed ms).
pub(super) fn timelines(recorded: &Recorded, ops: &[(String, Instant, f64)]) -> Vec<Timeline> {
    let recorded = recorded
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut by_op: HashMap<&str, Vec<(&str, Instant)>> = HashMap::new();
    for (op, step, at) in recorded.iter() {
        by_op.entry(op).or_default().push((step, *at));
    }
    ops.iter()
        .map(|(id, t0, total_ms)| {
            // A step's time runs from its own record to the next one's; the first
            // part, from the request to the operation's first record.
            let mut steps = Vec::new();
            let (mut name, mut from) = ("(request -> recorded)", *t0);
            for (step, at) in by_op.get(id.as_str()).into_iter().flatten() {
                let took = at.saturating_duration_since(from).as_secs_f64() * 1e3;
                steps.push((name.to_owned(), took));
                (name, from) = (step, from.max(*at));
            }
            Timeline {
                total_ms: *total_ms,
                steps,
            }
        })
        .collect()
}

/// Prints, per step, its p50 over every scale-out and its mean over the slowest 1%
/// (at least one): the step whose time grows in the tail is where the tail is.
pub(super) fn print(case: &str, timelines: &[Timeline]) {
    let mut sorted: Vec<&Timeline> = timelines.iter().collect();
    sorted.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
    let slow = &sorted[..sorted.len().div_ceil(100).min(sorted.len())];
    let mut order: Vec<&str> = Vec::new();
    for t in timelines {
        for (step, _) in &t.steps {
            if !order.contains(&step.as_str()) {
                order.push(step);
            }
        }
    }
    println!();
    println!(
        "{case}: ms each step took (from its record to the next step's, as form-state's Watch streamed them; a step it sent together with the next counts 0), p50 over {} scale-outs and mean over the slowest {} (1%, at least one):",
        timelines.len(),
        slow.len()
    );
    println!("| step | p50 ms | slowest mean ms |");
    println!("|---|---:|---:|");
    for step in order {
        let took = |t: &Timeline| {
            t.steps
                .iter()
                .filter(|(s, _)| s == step)
                .map(|(_, ms)| ms)
                .sum::<f64>()
        };
        let mut all: Vec<f64> = timelines.iter().map(took).collect();
        all.sort_by(f64::total_cmp);
        let slow_mean = slow.iter().map(|t| took(t)).sum::<f64>() / slow.len() as f64;
        println!("| {step} | {:.1} | {slow_mean:.1} |", quantile(&all, 0.5));
    }
    let mut totals: Vec<f64> = timelines.iter().map(|t| t.total_ms).collect();
    totals.sort_by(f64::total_cmp);
    let slow_total = slow.iter().map(|t| t.total_ms).sum::<f64>() / slow.len() as f64;
    println!(
        "| (request -> completed) | {:.1} | {slow_total:.1} |",
        quantile(&totals, 0.5)
    );
    // One stall per operation (in a different step each time) and a general
    // slowdown give the same means: the slowest, each on its own.
    println!("{case}: the slowest scale-outs, ms per step:");
    for t in sorted.iter().take(5) {
        let steps: Vec<String> = t
            .steps
            .iter()
            .map(|(step, ms)| format!("{step} {ms:.1}"))
            .collect();
        println!("- {:.1} ms: {}", t.total_ms, steps.join(", "));
    }
}
