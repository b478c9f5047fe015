//! What the reader does to each whole message, on the raw bytes where it can: count the fds it
//! declares, stamp the sender into its header while copying it, and check its body.

use tracing::debug;
use zbus::Message;
use zbus::wire::serialized::{Context, Data};

use super::limits::{WireError, invalid};
use super::raw::{
    self, MAX_KNOWN_FIELD, Raw, SENDER_FIELD, SIGNATURE_FIELD, UNIX_FDS_FIELD, u32_bytes,
};

/// The value of the (first) UNIX_FDS header field, 0 if there is none before a field the walk
/// cannot read. [`stamp`] counts the fds on its own walk; this is for a header it cannot copy.
pub(super) fn declared_fds(raw: Raw<'_>) -> usize {
    let mut fds = 0;
    raw::walk_fields(raw, |field| {
        if field.code == UNIX_FDS_FIELD {
            fds = fds_value(raw, field);
        }
        field.code != UNIX_FDS_FIELD
    });
    fds
}

/// The fd count of a UNIX_FDS field: its `u32`, 0 for a value of another type (which the real
/// parser then refuses).
fn fds_value(raw: Raw<'_>, field: &raw::Field) -> usize {
    let value = (field.kind == b'u').then(|| raw.u32_at(field.value.start));
    value.flatten().unwrap_or(0) as usize
}

/// A message as [`stamp`] copies it.
pub(super) struct Stamped {
    /// The stamped copy; `None` if a header field cannot be read: the header is then refused
    /// by the real parser, or read by it.
    pub bytes: Option<Vec<u8>>,
    /// The fds the message declares, as [`declared_fds`] counts them (found on the same walk).
    pub fds: usize,
}

/// The message `raw` with the bus's stamp: a SENDER field naming `sender` in place of any the
/// client wrote, and without the header fields the specification does not define (it asks that
/// they be ignored; passing them on is what it leaves open, and dropping them keeps every
/// receiver's parser happy). It is built while the bytes are copied anyway, so that the message
/// is parsed once and never copied again; the walk that copies the fields counts the fds too.
pub(super) fn stamp(raw: Raw<'_>, sender: &str) -> Stamped {
    let bytes = raw.bytes();
    let Some((fields_end, body)) = raw
        .fields_end()
        .and_then(|end| Some((end, bytes.get(end.next_multiple_of(8)..)?)))
    else {
        let fds = declared_fds(raw);
        return Stamped { bytes: None, fds };
    };
    let mut out = Vec::with_capacity(fields_end + 16 + sender.len() + body.len());
    out.extend_from_slice(&bytes[..12]); // `fields_end` read bytes 12..16
    out.extend_from_slice(&[0; 4]); // the length of the fields, known at the end
    let mut fds = None;
    // Each field starts on an 8-byte boundary in both messages, so copied whole it stays aligned.
    let complete = raw::walk_fields(raw, |field| {
        if field.code == UNIX_FDS_FIELD && fds.is_none() {
            fds = Some(fds_value(raw, field));
        }
        if (1..=MAX_KNOWN_FIELD).contains(&field.code) && field.code != SENDER_FIELD {
            out.resize(out.len().next_multiple_of(8), 0);
            out.extend_from_slice(&bytes[field.whole.clone()]);
        }
        true
    });
    let fds = fds.unwrap_or(0);
    if !complete {
        return Stamped { bytes: None, fds };
    }
    let bytes = finish_stamp(out, raw, sender, body);
    Stamped { bytes, fds }
}

/// Appends the SENDER field and the body to the fields copied so far.
fn finish_stamp(mut out: Vec<u8>, raw: Raw<'_>, sender: &str, body: &[u8]) -> Option<Vec<u8>> {
    let endian = raw.endian();
    out.resize(out.len().next_multiple_of(8), 0);
    out.extend_from_slice(&[SENDER_FIELD, 1, b's', 0]);
    out.extend_from_slice(&u32_bytes(u32::try_from(sender.len()).ok()?, endian));
    out.extend_from_slice(sender.as_bytes());
    out.push(0);
    let fields_len = u32::try_from(out.len() - raw::FIXED_HEADER).ok()?;
    out[12..16].copy_from_slice(&u32_bytes(fields_len, endian));
    out.resize(out.len().next_multiple_of(8), 0);
    out.extend_from_slice(body);
    Some(out)
}

/// Checks the body against its signature. A Unix fd handle that points past the fds the message
/// brought is let through, as dbus-daemon and dbus-broker let it through, for the receiver to
/// refuse (dbus-python's tests count on it); everything else about the body must be valid.
pub(super) fn check_body(msg: &Message) -> Result<(), WireError> {
    let bad_body = |e: zbus::Error| invalid(format!("bad body: {e}"));
    match msg.body().validate() {
        Ok(()) => Ok(()),
        Err(zbus::Error::UnknownFd) => {
            let copy = with_handles_as_u32(msg).ok_or_else(|| bad_body(zbus::Error::UnknownFd))?;
            copy.body().validate().map_err(bad_body)?;
            debug!(
                sender = ?msg.header().sender(),
                "passing on a message whose fd handles point past the fds it brought"
            );
            Ok(())
        }
        Err(e) => Err(bad_body(e)),
    }
}

/// A copy of `msg` in which every UNIX_FD type code of its signatures (the body's, and each
/// variant's in the body) reads UINT32, which is laid out the same way, and which declares no
/// fds: the validator then checks all of the body but the fd indexes. `None` if the body
/// cannot be walked, when the validator would refuse it anyway. (zbus has parsed the header
/// already, so it holds only the fields the specification defines, which the walk reads.)
fn with_handles_as_u32(msg: &Message) -> Option<Message> {
    let bytes = msg.data().bytes();
    let endian = msg.data().context().endian();
    let raw = Raw::new(bytes, endian);
    let mut signatures = Vec::new();
    let mut body_sig = 0..0;
    let mut fds_value = None;
    raw::walk_fields(raw, |field| {
        match (field.code, field.kind) {
            (SIGNATURE_FIELD, b'g') => {
                body_sig = field.value.clone();
                signatures.push(field.value.clone());
            }
            (UNIX_FDS_FIELD, b'u') => fds_value = Some(field.value.clone()),
            _ => {}
        }
        true
    });
    let body_start = bytes.len().checked_sub(msg.body().len())?;
    let body = Raw::new(bytes.get(body_start..)?, endian);
    let variants = raw::variant_signatures(body, bytes.get(body_sig)?)?;
    signatures.extend(
        variants
            .into_iter()
            .map(|sig| body_start + sig.start..body_start + sig.end),
    );
    let mut copy = bytes.to_vec();
    for range in signatures {
        copy.get_mut(range)?
            .iter_mut()
            .filter(|code| **code == b'h')
            .for_each(|code| *code = b'u');
    }
    if let Some(range) = fds_value {
        copy.get_mut(range)?.fill(0);
    }
    // SAFETY: `from_bytes` checks the header; `check_body`, the only caller, does nothing with
    // the copy but validate its body, and drops it.
    unsafe { Message::from_bytes(Data::new(copy, Context::new(endian, 0))) }.ok()
}
