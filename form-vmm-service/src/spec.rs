//! Checks of instance requests, each failing with a message that names the field.

use form_proto::types::v1 as types;

use crate::error::VmmError;

/// Resources an instance gets when the request sets none.
pub const DEFAULT_RESOURCES: types::Resources = types::Resources {
    vcpus: 1,
    memory_mib: 512,
};

/// An id (see `form_runtime::ids`).
pub fn id(field: &str, value: &str) -> Result<(), VmmError> {
    form_runtime::ids::check(value).map_err(|m| VmmError::invalid(field, m))
}

/// A workload: a command, a port within 0-65535 (0: the service picks one).
pub fn workload(w: Option<&types::Workload>) -> Result<types::Workload, VmmError> {
    let w = w.ok_or_else(|| {
        VmmError::invalid("workload", "is missing; expected a Workload with a command")
    })?;
    if w.command.trim().is_empty() {
        return Err(VmmError::invalid(
            "workload.command",
            "is empty; expected the program to run",
        ));
    }
    if !w.image.is_empty() {
        return Err(VmmError::invalid(
            "workload.image",
            format!(
                "'{}' is not accepted: no backend of form-vmm-service boots images (the process \
                 backend runs `command`, the qemu backend puts `command` in its guest); leave it empty",
                w.image
            ),
        ));
    }
    if w.port > 65535 {
        return Err(VmmError::invalid(
            "workload.port",
            format!("is {}; expected 0-65535", w.port),
        ));
    }
    if !w.health_path.is_empty() && !w.health_path.starts_with('/') {
        return Err(VmmError::invalid(
            "workload.health_path",
            format!("'{}' must start with /", w.health_path),
        ));
    }
    if let Some(k) = w
        .env
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(VmmError::invalid(
            "workload.env",
            format!("'{k}' is not a variable name"),
        ));
    }
    Ok(w.clone())
}

/// Resources: 1-256 vCPUs and 16 MiB - 4 TiB of memory; unset means the defaults.
pub fn resources(field: &str, r: Option<&types::Resources>) -> Result<types::Resources, VmmError> {
    let Some(r) = r else {
        return Ok(DEFAULT_RESOURCES);
    };
    if r.vcpus == 0 || r.vcpus > 256 {
        return Err(VmmError::invalid(
            format!("{field}.vcpus"),
            format!("is {}; expected 1-256", r.vcpus),
        ));
    }
    if r.memory_mib < 16 || r.memory_mib > 4 * 1024 * 1024 {
        return Err(VmmError::invalid(
            format!("{field}.memory_mib"),
            format!("is {}; expected 16-4194304", r.memory_mib),
        ));
    }
    Ok(*r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_specs_name_the_field() {
        let e = workload(Some(&types::Workload::default()))
            .expect_err("no command")
            .to_string();
        assert!(e.contains("workload.command"), "{e}");
        let w = types::Workload {
            command: "x".into(),
            port: 70000,
            ..Default::default()
        };
        assert!(
            workload(Some(&w))
                .expect_err("port")
                .to_string()
                .contains("workload.port")
        );
        let r = types::Resources {
            vcpus: 1,
            memory_mib: 0,
        };
        let e = resources("resources", Some(&r))
            .expect_err("memory")
            .to_string();
        assert!(
            e.contains("resources.memory_mib") && e.contains("16"),
            "{e}"
        );
        assert!(id("instance_id", "a b").is_err());
        assert_eq!(
            resources("resources", None).expect("default"),
            DEFAULT_RESOURCES
        );
    }
}
