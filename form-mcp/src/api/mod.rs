//! The gateway's API: every HTTP and MCP request becomes one [`action::Action`], run in
//! one place against the services behind the gateway.

pub mod action;
pub mod backends;
pub mod clusters;
pub mod model;
