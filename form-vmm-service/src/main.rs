//! The form-vmm-service binary: see `form-vmm-service --help`.

fn main() -> std::process::ExitCode {
    form_runtime::service::main::<form_vmm_service::VmmNode>()
}
