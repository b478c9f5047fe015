//! What reading a connection's stream enforces: the sizes the specification allows, the
//! limits of the bus, and why a stream cannot be read as messages.

use std::io;

/// The largest message the specification allows (128 MiB).
pub const MAX_MESSAGE_SIZE: usize = 1 << 27;
/// The longest array the specification allows (64 MiB), the header-field array included.
pub const MAX_ARRAY_LEN: usize = 1 << 26;

/// Why a connection's byte stream cannot be read as messages.
#[derive(Debug)]
pub enum WireError {
    Io(io::Error),
    /// The peer closed the connection.
    Closed,
    /// The bytes are not a valid message; the text says why.
    Invalid(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(e) => write!(f, "I/O error: {e}"),
            WireError::Closed => f.write_str("connection closed by peer"),
            WireError::Invalid(why) => write!(f, "invalid message: {why}"),
        }
    }
}

pub(super) fn invalid(why: impl Into<String>) -> WireError {
    WireError::Invalid(why.into())
}

/// The size limits that reading enforces.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    pub max_message_size: usize,
    pub max_fds: usize,
}
