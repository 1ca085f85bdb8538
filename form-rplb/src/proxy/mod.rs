//! The HTTP data plane: client connections ([`conn`]), one request's journey
//! ([`handler`]), header rules ([`headers`]) and streamed bodies ([`body`]).

pub mod body;
pub mod conn;
pub mod handler;
pub mod headers;
