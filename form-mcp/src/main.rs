//! The form-mcp binary: see `form-mcp --help`.

fn main() -> std::process::ExitCode {
    form_runtime::service::main::<form_mcp::Gateway>()
}
