//! broker: a D-Bus message bus that starts services on demand and keeps them as its children.

pub mod activation;
pub mod address;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod driver;
pub mod header_filter;
pub mod log_limit;
pub mod logging;
pub mod match_rule;
pub mod notify;
pub mod server;
pub mod socket;
pub mod supervisor;
pub mod wire;
