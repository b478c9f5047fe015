//! Header filtering, as dbus-daemon does it (its `HeaderFiltering` feature): the specification
//! says a receiver must ignore header fields it does not know, so the bus accepts a message
//! that carries such fields and passes it on without them. Only such a message takes this path:
//! the common one never reaches it.

use zbus::wire::serialized::{Context, Data};
use zbus::wire::{OwnedVariant, to_bytes};

/// The fixed part of the header: endianness, type, flags, version, body length, serial.
type Fixed = (u8, u8, u8, u8, u32, u32);
/// The whole header as the specification spells it: `(yyyyuua(yv))`.
type Header = (u8, u8, u8, u8, u32, u32, Vec<(u8, OwnedVariant)>);

/// The highest field code the specification defines (`UNIX_FDS`).
const LAST_KNOWN_FIELD: u8 = 9;

/// `data` (a whole message) without the header fields whose codes the specification does not
/// define; `None` when it has none of those, or its header cannot be read at all.
pub fn without_unknown_fields(data: &Data<'_, '_>) -> Option<Data<'static, 'static>> {
    let bytes = data.bytes();
    let ((a, b, c, d, body_len, serial, fields), header_len): (Header, usize) =
        data.deserialize().ok()?;
    let known = |code: u8| (1..=LAST_KNOWN_FIELD).contains(&code);
    if fields.iter().all(|(code, _)| known(*code)) {
        return None;
    }
    let kept: Vec<(u8, OwnedVariant)> = fields.into_iter().filter(|(c, _)| known(*c)).collect();
    let body = bytes.get(header_len.next_multiple_of(8)..)?;
    let fixed: Fixed = (a, b, c, d, body_len, serial);
    let header = to_bytes(
        Context::new(data.context().endian(), 0),
        &(fixed.0, fixed.1, fixed.2, fixed.3, fixed.4, fixed.5, kept),
    )
    .ok()?;
    let mut out = header.bytes().to_vec();
    out.resize(out.len().next_multiple_of(8), 0);
    out.extend_from_slice(body);
    let fds = data
        .fds()
        .iter()
        .map(|fd| fd.try_to_owned())
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some(Data::new_fds(out, data.context(), fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::Message;
    use zbus::wire::Endian;

    /// A method call whose header carries field 42 (a string) among the known ones.
    fn with_field_42(endian: Endian) -> Vec<u8> {
        let msg = Message::method_call("/a", "M")
            .destination("org.x")
            .build(&("body",))
            .unwrap();
        let data = msg.data();
        let ctx = Context::new(endian, 0);
        let ((a, b, c, d, len, serial, mut fields), header_len): (Header, usize) =
            data.deserialize().unwrap();
        let value = OwnedVariant::try_from(zbus::Variant::from("weird")).unwrap();
        fields.insert(1, (42, value));
        let header = to_bytes(ctx, &(a, b, c, d, len, serial, fields)).unwrap();
        let mut out = header.bytes().to_vec();
        out.resize(out.len().next_multiple_of(8), 0);
        out.extend_from_slice(&data.bytes()[header_len.next_multiple_of(8)..]);
        out
    }

    #[test]
    fn unknown_fields_are_dropped_and_the_rest_kept() {
        let raw = with_field_42(Endian::Little);
        let data = Data::new_fds(
            raw,
            Context::new(Endian::Little, 0),
            Vec::<zbus::OwnedFd>::new(),
        );
        let filtered = without_unknown_fields(&data).expect("field 42 is unknown");
        // SAFETY: test data; the parse checks the header.
        let msg = unsafe { Message::from_bytes(filtered) }.unwrap();
        let header = msg.header();
        assert_eq!(header.path().unwrap().as_str(), "/a");
        assert_eq!(header.member().unwrap().as_str(), "M");
        assert_eq!(header.destination().unwrap().as_str(), "org.x");
        let (text,): (String,) = msg.body().deserialize().unwrap();
        assert_eq!(text, "body");
    }

    #[test]
    fn a_message_without_unknown_fields_is_left_alone() {
        let msg = Message::method_call("/a", "M").build(&()).unwrap();
        assert!(without_unknown_fields(msg.data()).is_none());
    }
}
