//! The form-rplb binary: see `form-rplb --help`.

fn main() -> std::process::ExitCode {
    form_runtime::service::main::<form_rplb::Balancer>()
}
