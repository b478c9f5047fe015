//! The D-Bus wire format at the level the bus needs it: cutting a byte stream into whole
//! messages (with the file descriptors that came along), checking each one once, and writing
//! queued messages out with vectored `sendmsg` calls.
//!
//! - `raw`: the message format read straight from the bytes (byte order, alignment, the
//!   header-field walk, the value walk by signature), for everything below and for match rules;
//! - `reader`: [`FrameReader`], which cuts the stream into messages;
//! - `check`: what is done to each whole message: its fds counted, its sender stamped, its body
//!   checked;
//! - `outbox`: [`Outbox`], a connection's queue of messages to write;
//! - `limits`: the sizes the specification allows, and why a stream cannot be read.

mod check;
mod limits;
mod outbox;
pub(crate) mod raw;
mod reader;

pub use limits::{FrameLimits, MAX_ARRAY_LEN, MAX_MESSAGE_SIZE, WireError};
pub use outbox::Outbox;
pub use reader::FrameReader;
