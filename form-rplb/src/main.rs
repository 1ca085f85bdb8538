//! The form-rplb binary: see `form-rplb --help`.

/// The data plane allocates per request from several threads; mimalloc's thread-local
/// pages cost less there than glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    form_runtime::service::main::<form_rplb::Balancer>()
}
