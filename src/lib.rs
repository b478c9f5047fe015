//! broker: a D-Bus message bus that starts services on demand and keeps them as its children.

pub mod activation;
pub mod address;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod connection;
pub mod control;
pub mod daemon;
/// The bus driver lives with the core it serves; `broker::driver` stays its public path.
pub use bus::driver;
pub mod header_filter;
pub mod log_limit;
pub mod logging;
pub mod match_rule;
pub mod notify;
pub mod peer_task;
pub mod run;
pub mod server;
pub mod socket;
pub mod supervisor;
pub mod wire;
