//! The form-vmm-service binary: see `form-vmm-service --help`.

fn main() -> std::process::ExitCode {
    use form_vmm_service::process::launcher;
    // A spare process the node keeps for its next instance (launcher.rs).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == launcher::LAUNCH_ARG)
    {
        return launcher::run();
    }
    form_runtime::service::main::<form_vmm_service::VmmNode>()
}
