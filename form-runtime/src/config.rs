//! Config files: TOML, every key optional (defaults come from the service's
//! `Config::default()`), unknown keys rejected. Precedence: flag > environment
//! variable > file > default.

use std::net::SocketAddr;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::ConfigError;
use crate::cli::{CommonArgs, distinct_listeners};

/// The configuration of a service: its own fields plus the two listeners every service
/// has, which the runtime sets from the common flags.
pub trait ServiceConfig: DeserializeOwned + Default {
    /// Default main listen address (gRPC, or HTTP for form-mcp).
    const DEFAULT_LISTEN: SocketAddr;
    /// Default Prometheus listen address.
    const DEFAULT_METRICS_LISTEN: SocketAddr;

    /// The main listen address.
    fn listen_mut(&mut self) -> &mut SocketAddr;
    /// The Prometheus listen address.
    fn metrics_listen_mut(&mut self) -> &mut SocketAddr;
    /// Checks the service's own values once file, environment and flags are applied.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// Builds a service's config: the file named by `--config` (or defaults), then the
/// common flags, then `apply` (the service's own flags), then validation.
pub fn build<C: ServiceConfig>(
    common: &CommonArgs,
    apply: impl FnOnce(&mut C),
) -> Result<C, ConfigError> {
    let mut c: C = load(common.config.as_deref())?;
    if let Some(v) = common.listen {
        *c.listen_mut() = v;
    }
    if let Some(v) = common.metrics_listen {
        *c.metrics_listen_mut() = v;
    }
    apply(&mut c);
    let (listen, metrics) = (*c.listen_mut(), *c.metrics_listen_mut());
    distinct_listeners(&[("--listen", listen), ("--metrics-listen", metrics)])?;
    c.validate()?;
    Ok(c)
}

/// The default config with every listener on 127.0.0.1 port 0, for tests.
pub fn for_test<C: ServiceConfig>() -> C {
    let mut c = C::default();
    *c.listen_mut() = SocketAddr::from(([127, 0, 0, 1], 0));
    *c.metrics_listen_mut() = SocketAddr::from(([127, 0, 0, 1], 0));
    c
}

/// Reads `path` as TOML into `T`; without a path, `T::default()`.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses TOML `text` (read from `path`) into `T`, with a one-line error.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
            .unwrap_or(1);
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            message: e.message().replace('\n', " ").trim().to_owned(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        listen: String,
        interval_ms: u64,
    }

    #[test]
    fn missing_keys_take_defaults() {
        let s: Sample = parse(Path::new("x.toml"), "interval_ms = 5\n").expect("parses");
        assert_eq!(
            s,
            Sample {
                listen: String::new(),
                interval_ms: 5
            }
        );
    }

    #[test]
    fn errors_are_one_line_with_line_number() {
        let err = parse::<Sample>(Path::new("x.toml"), "interval_ms = 5\nbogus = 1\n")
            .expect_err("unknown key");
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("line 2") && text.contains("bogus"), "{text}");
        let err = parse::<Sample>(Path::new("x.toml"), "interval_ms = \"soon\"\n")
            .expect_err("wrong type");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = load::<Sample>(Some(Path::new("/nonexistent/form.toml"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/form.toml"), "{err}");
    }
}
