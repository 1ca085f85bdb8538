//! The HTTP data plane: client connections ([`conn`]), one request's journey
//! ([`handler`]), header rules ([`headers`]), streamed bodies ([`body`]) and pooled
//! upstream connections ([`upstream`]).

pub mod body;
pub mod conn;
pub mod handler;
pub mod headers;
pub mod upstream;
