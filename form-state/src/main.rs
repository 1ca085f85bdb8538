//! The form-state binary: see `form-state --help`.

fn main() -> std::process::ExitCode {
    form_runtime::service::main::<form_state::StateReplica>()
}
