//! The HTTP data plane: client connections ([`conn`]), the direct HTTP/1.1 path of
//! plain requests ([`direct`]), one request's journey on the general path
//! ([`handler`]), header rules ([`headers`]), the balancer's own answers ([`answer`]),
//! streamed bodies ([`body`]) and pooled upstream connections ([`upstream`]).

pub mod answer;
pub mod body;
pub mod client_io;
pub mod conn;
pub mod direct;
pub mod handler;
pub mod headers;
pub mod idle;
pub mod upstream;
