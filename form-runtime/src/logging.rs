//! Installs the `tracing` subscriber. Only binaries call this; libraries only emit.

use tracing_subscriber::EnvFilter;

use crate::ConfigError;
use crate::cli::{CommonArgs, LogFormat};

/// Installs a global subscriber writing to stderr with the filter and format of `args`.
pub fn init(args: &CommonArgs) -> Result<(), ConfigError> {
    let filter = EnvFilter::try_new(&args.log).map_err(|e| {
        ConfigError::invalid(
            "--log",
            format!(
                "'{}': {e}; expected a filter such as info or form_state=debug,info",
                args.log
            ),
        )
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // A subscriber already installed (tests running services in-process) is fine.
    drop(result);
    Ok(())
}
