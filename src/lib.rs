//! broker: a D-Bus message bus that starts services on demand and keeps them as its children.

pub mod activation;
pub mod auth;
pub mod match_rule;
pub mod supervisor;
