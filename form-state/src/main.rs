//! The form-state binary: see `form-state --help`.

fn main() -> std::process::ExitCode {
    if std::env::args().any(|a| a == "--print-public-key") {
        return form_state::print_public_key();
    }
    form_runtime::service::main::<form_state::StateReplica>()
}
