//! The form-scaler binary: see `form-scaler --help`.

fn main() -> std::process::ExitCode {
    form_runtime::service::main::<form_scaler::Controller>()
}
