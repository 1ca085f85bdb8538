//! Resize of a running VM in place, within the room it was started with:
//!
//! ```text
//! vCPUs up:     device_add max-x86_64-cpu (socket K); the guest onlines it (deploy/guest/init)
//! vCPUs down:   device_del cpuK; the guest offlines and ejects it; wait until the slot is
//!               empty. Under KVM only: QEMU 7.2's TCG corrupts its heap when a vCPU is
//!               removed (seen on these machines: `malloc(): unsorted double linked list
//!               corrupted` at the next vCPU thread), so under TCG it is refused.
//! memory up:    object-add memory-backend-ram + device_add pc-dimm (128 MiB blocks), the
//!               guest onlines it (memhp_default_state=online); then the balloon to the size
//! memory down:  the balloon; wait until the guest has given the pages back
//! ```
//!
//! Each change is checked from QEMU's side (the CPU slots, the balloon's `actual`) before
//! the resize reports it; a change beyond the room (`maxcpus`, `maxmem`, DIMM slots) is
//! refused before anything is touched, naming the limit.

use std::time::{Duration, Instant};

use form_proto::types::v1 as types;
use serde_json::json;

use super::MIN_MEMORY_MIB;
use super::qmp::Qmp;
use super::shape::{DIMM_BLOCK_MIB, SLOTS, Shape};
use crate::error::VmmError;

/// How long the guest gets to release a vCPU or to give memory back.
const GUEST_DEADLINE: Duration = Duration::from_secs(15);

/// Refuses a size the VM has no room for, before anything changes.
pub(super) fn check(shape: &Shape, want: types::Resources, accel: &str) -> Result<(), VmmError> {
    if want.vcpus < shape.vcpus && accel != "kvm" {
        return Err(VmmError::FailedPrecondition(format!(
            "removing vCPUs ({} to {}) is refused under TCG: QEMU 7.2 corrupts its memory \
             when a TCG vCPU is unplugged; it works under KVM (--accel kvm)",
            shape.vcpus, want.vcpus
        )));
    }
    if want.vcpus > shape.max_vcpus {
        return Err(VmmError::FailedPrecondition(format!(
            "{} vCPUs is more than the {} this VM was started with room for (maxcpus; \
             the node's --qemu-max-vcpus); a VM cannot grow past it in place",
            want.vcpus, shape.max_vcpus
        )));
    }
    if want.memory_mib > shape.max_mib {
        return Err(VmmError::FailedPrecondition(format!(
            "{} MiB is more than the {} MiB this VM was started with room for (maxmem; \
             the node's --qemu-max-memory-mib); a VM cannot grow past it in place",
            want.memory_mib, shape.max_mib
        )));
    }
    if want.memory_mib < MIN_MEMORY_MIB {
        return Err(VmmError::FailedPrecondition(format!(
            "{} MiB is less than the {MIN_MEMORY_MIB} MiB the guest needs",
            want.memory_mib
        )));
    }
    if want.memory_mib > shape.plugged_mib() && shape.dimms.len() >= SLOTS as usize {
        return Err(VmmError::FailedPrecondition(format!(
            "every one of the {SLOTS} memory slots of this VM is used; it cannot get more memory in place"
        )));
    }
    Ok(())
}

/// Plugs and unplugs vCPUs until the VM has `want`; `shape` follows each change.
pub(super) async fn vcpus(qmp: &mut Qmp, shape: &mut Shape, want: u32) -> Result<(), VmmError> {
    while shape.vcpus < want {
        let k = shape.vcpus;
        qmp.execute(
            "device_add",
            Some(json!({
                "driver": "max-x86_64-cpu", "id": format!("cpu{k}"),
                "socket-id": k, "core-id": 0, "thread-id": 0,
            })),
        )
        .await?;
        shape.vcpus += 1;
    }
    while shape.vcpus > want.max(1) {
        let k = shape.vcpus - 1;
        qmp.execute("device_del", Some(json!({ "id": format!("cpu{k}") })))
            .await?;
        let deadline = Instant::now() + GUEST_DEADLINE;
        while slot_used(qmp, k).await? {
            if Instant::now() > deadline {
                return Err(VmmError::Backend(format!(
                    "the guest did not release vCPU {k} within {GUEST_DEADLINE:?}; it keeps {} vCPUs",
                    shape.vcpus
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shape.vcpus -= 1;
    }
    Ok(())
}

/// Whether CPU socket `k` holds a vCPU.
async fn slot_used(qmp: &mut Qmp, k: u32) -> Result<bool, VmmError> {
    let slots = qmp.execute("query-hotpluggable-cpus", None).await?;
    Ok(slots.as_array().into_iter().flatten().any(|s| {
        s["props"]["socket-id"].as_u64() == Some(u64::from(k)) && s.get("qom-path").is_some()
    }))
}

/// Gives the guest `want_mib` of memory: DIMMs for what the plugged memory lacks, then
/// the balloon; returns once the guest holds that much.
pub(super) async fn memory(
    qmp: &mut Qmp,
    shape: &mut Shape,
    want_mib: u64,
) -> Result<(), VmmError> {
    if want_mib > shape.plugged_mib() {
        let size = (want_mib - shape.plugged_mib()).div_ceil(DIMM_BLOCK_MIB) * DIMM_BLOCK_MIB;
        let size = size.min(shape.max_mib - shape.plugged_mib());
        let k = shape.dimms.len();
        qmp.execute(
            "object-add",
            Some(json!({
                "qom-type": "memory-backend-ram", "id": format!("mem{k}"), "size": size << 20,
            })),
        )
        .await?;
        if let Err(e) = qmp
            .execute(
                "device_add",
                Some(json!({
                    "driver": "pc-dimm", "id": format!("dimm{k}"), "memdev": format!("mem{k}"),
                })),
            )
            .await
        {
            let _ = qmp
                .execute("object-del", Some(json!({ "id": format!("mem{k}") })))
                .await;
            return Err(e);
        }
        shape.dimms.push(size);
    }
    qmp.execute("balloon", Some(json!({ "value": want_mib << 20 })))
        .await?;
    let deadline = Instant::now() + GUEST_DEADLINE;
    loop {
        let actual = qmp.execute("query-balloon", None).await?["actual"]
            .as_u64()
            .unwrap_or(0)
            >> 20;
        if actual == want_mib {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(VmmError::Backend(format!(
                "the guest holds {actual} MiB, not the {want_mib} MiB asked, after {GUEST_DEADLINE:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The memory the guest holds now (the balloon's `actual`), MiB.
pub(super) async fn actual_mib(qmp: &mut Qmp) -> Result<u64, VmmError> {
    Ok(qmp.execute("query-balloon", None).await?["actual"]
        .as_u64()
        .unwrap_or(0)
        >> 20)
}

/// What a resize left, for people.
pub(super) fn describe(shape: &Shape, memory_mib: u64) -> String {
    format!(
        "{} of at most {} vCPUs plugged; {memory_mib} MiB held by the guest ({} MiB at boot, {} MiB in {} DIMMs, at most {} MiB)",
        shape.vcpus,
        shape.max_vcpus,
        shape.boot_mib,
        shape.dimms.iter().sum::<u64>(),
        shape.dimms.len(),
        shape.max_mib
    )
}
