//! The raw D-Bus message format, read straight from a message's bytes: the byte order, the
//! alignment of values, the walk over the header fields and the walk over values by their
//! signature. Everything in broker that looks at a message's bytes itself, rather than through
//! zbus, goes through here: the reader's frame length, fd count and sender stamp, the body
//! check's variant signatures, and match rules' argument matching.
//!
//! Nothing here validates. A walk reads only the lengths it needs to find its way, and a length
//! that points out of the bytes, or a type code it does not know, ends the walk (`None`, or
//! `false`) rather than panic. The checks proper are zbus's header parser and body validator,
//! which every message passes before anything trusts what it says.

use std::ops::Range;

use zbus::wire::Endian;

/// The fixed part of the header plus the length of the header-field array.
pub(crate) const FIXED_HEADER: usize = 16;
/// Header field codes that broker reads itself.
pub(crate) const SENDER_FIELD: u8 = 7;
pub(crate) const SIGNATURE_FIELD: u8 = 8;
pub(crate) const UNIX_FDS_FIELD: u8 = 9;
/// The highest field code the specification defines.
pub(crate) const MAX_KNOWN_FIELD: u8 = 9;
/// Containers nested deeper than this end a value walk, so that no body can exhaust the stack
/// (the validator refuses more than 64; here each array, structure, dict entry and variant that
/// the walk enters counts).
const MAX_DEPTH: usize = 128;

/// The byte order that a message's first byte names.
#[inline]
pub(crate) fn endian_of(byte: u8) -> Option<Endian> {
    match byte {
        b'l' => Some(Endian::Little),
        b'B' => Some(Endian::Big),
        _ => None,
    }
}

/// `value` as 4 bytes in `endian` order.
#[inline]
pub(crate) fn u32_bytes(value: u32, endian: Endian) -> [u8; 4] {
    match endian {
        Endian::Little => value.to_le_bytes(),
        Endian::Big => value.to_be_bytes(),
    }
}

/// The alignment of the type whose signature starts with `code` (for the fixed-size basic
/// types, also their size); `None` for a code that is no type.
fn alignment(code: u8) -> Option<usize> {
    match code {
        b'y' | b'g' | b'v' => Some(1),
        b'n' | b'q' => Some(2),
        b'b' | b'i' | b'u' | b'h' | b's' | b'o' | b'a' => Some(4),
        b'x' | b't' | b'd' | b'(' | b'{' => Some(8),
        _ => None,
    }
}

/// The length of the complete type that starts `sig`.
fn single_type_len(sig: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    for (at, &code) in sig.iter().enumerate() {
        match code {
            b'a' => continue,
            b'(' | b'{' => depth += 1,
            b')' | b'}' => depth = depth.checked_sub(1)?,
            _ => {
                alignment(code)?;
            }
        }
        if depth == 0 {
            return Some(at + 1);
        }
    }
    None
}

#[inline]
fn align(pos: usize, to: usize) -> Option<usize> {
    pos.checked_next_multiple_of(to)
}

/// Bytes of a message, or of its body, in one byte order. A body starts 8-aligned in its
/// message, so offsets within it align as they do in the message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Raw<'b> {
    bytes: &'b [u8],
    endian: Endian,
}

impl<'b> Raw<'b> {
    #[inline]
    pub(crate) fn new(bytes: &'b [u8], endian: Endian) -> Self {
        Raw { bytes, endian }
    }

    /// A whole message, in the byte order its first byte names.
    #[inline]
    pub(crate) fn of_message(bytes: &'b [u8]) -> Option<Self> {
        Some(Raw::new(bytes, endian_of(*bytes.first()?)?))
    }

    #[inline]
    pub(crate) fn bytes(self) -> &'b [u8] {
        self.bytes
    }

    #[inline]
    pub(crate) fn endian(self) -> Endian {
        self.endian
    }

    /// The `u32` at `pos` (which must be aligned already).
    #[inline]
    pub(crate) fn u32_at(self, pos: usize) -> Option<u32> {
        let raw: [u8; 4] = self.bytes.get(pos..pos.checked_add(4)?)?.try_into().ok()?;
        Some(match self.endian {
            Endian::Little => u32::from_le_bytes(raw),
            Endian::Big => u32::from_be_bytes(raw),
        })
    }

    #[inline]
    fn usize_at(self, pos: usize) -> Option<usize> {
        usize::try_from(self.u32_at(pos)?).ok()
    }

    /// Where the header fields end: after the fixed header and the array that its last four
    /// bytes give the length of. (The body starts at the next multiple of 8.)
    #[inline]
    pub(crate) fn fields_end(self) -> Option<usize> {
        FIXED_HEADER.checked_add(self.usize_at(12)?)
    }

    /// The text of the STRING or OBJECT_PATH at `pos` (before its alignment): its length, its
    /// bytes, and the offset after the 0 that ends them. The 0 itself is not checked.
    #[inline]
    fn string_at(self, pos: usize) -> Option<(Range<usize>, usize)> {
        let len_pos = align(pos, 4)?;
        let start = len_pos.checked_add(4)?;
        let end = start.checked_add(self.usize_at(len_pos)?)?;
        Some((start..end, end.checked_add(1)?))
    }

    /// The codes of the SIGNATURE at `pos` (a length byte, the codes, a 0), and the offset after
    /// it. The 0 is not checked.
    #[inline]
    fn signature_at(self, pos: usize) -> Option<(Range<usize>, usize)> {
        let start = pos.checked_add(1)?;
        let end = start.checked_add(usize::from(*self.bytes.get(pos)?))?;
        Some((start..end, end.checked_add(1)?))
    }

    /// The UTF-8 text of the STRING or OBJECT_PATH at `pos`, which must end in its 0.
    fn str_at(self, pos: usize) -> Option<&'b str> {
        let (text, after) = self.string_at(pos)?;
        (*self.bytes.get(after - 1)? == 0).then_some(())?;
        std::str::from_utf8(self.bytes.get(text)?).ok()
    }
}

/// One header field, as [`walk_fields`] finds it.
#[derive(Debug, Clone)]
pub(crate) struct Field {
    pub code: u8,
    /// The type of its value: the one code of its variant's signature, `u`, `s`, `o` or `g`.
    pub kind: u8,
    /// The whole field, from its code to the end of its value (the padding after it excluded).
    pub whole: Range<usize>,
    /// Its value: the four bytes of a `u`; the text of an `s`, `o` or `g`, without its length
    /// and its 0.
    pub value: Range<usize>,
}

/// Walks the header fields of the message `raw`, calling `visit` with each until it returns
/// false. Returns false if the walk met a field it cannot read: one whose value is not of the
/// types every defined field has (`u`, `s`, `o`, `g`), or that runs past the field array. The
/// header is checked properly later; here a malformed one just ends the walk.
pub(crate) fn walk_fields(raw: Raw<'_>, mut visit: impl FnMut(&Field) -> bool) -> bool {
    let Some(fields_end) = raw.fields_end() else {
        return false;
    };
    let end = fields_end.min(raw.bytes.len());
    let mut at = FIXED_HEADER;
    while at + 4 <= end {
        let Some(field) = field_at(raw, at) else {
            return false;
        };
        if field.whole.end > end || !visit(&field) {
            return field.whole.end <= end;
        }
        at = field.whole.end.next_multiple_of(8);
    }
    true
}

/// The field at `at` (8-aligned, with at least its first 4 bytes there), if its value is of a
/// type [`walk_fields`] reads.
#[inline(always)]
fn field_at(raw: Raw<'_>, at: usize) -> Option<Field> {
    let code = raw.bytes[at];
    let sig_len = usize::from(raw.bytes[at + 1]);
    let sig = raw.bytes.get(at + 2..at + 2 + sig_len)?;
    let value_at = at + 2 + sig_len + 1;
    let (kind, value, value_end) = match sig {
        [b'u'] => {
            let v = align(value_at, 4)?;
            (b'u', v..v + 4, v + 4)
        }
        [kind @ (b's' | b'o')] => {
            let (text, after) = raw.string_at(value_at)?;
            (*kind, text, after)
        }
        [b'g'] => {
            let (text, after) = raw.signature_at(value_at)?;
            (b'g', text, after)
        }
        _ => return None,
    };
    Some(Field {
        code,
        kind,
        whole: at..value_end,
        value,
    })
}

/// The signature of the body of the message `raw` (empty when it has no SIGNATURE field);
/// `None` if its header fields cannot be walked.
pub(crate) fn body_signature(raw: Raw<'_>) -> Option<&[u8]> {
    let mut sig = 0..0;
    let complete = walk_fields(raw, |field| {
        if field.code == SIGNATURE_FIELD && field.kind == b'g' {
            sig = field.value.clone();
        }
        true
    });
    complete.then(|| raw.bytes.get(sig)).flatten()
}

/// What a value walk reports on its way, besides where each value ends.
pub(crate) trait Visit {
    /// Whether an array whose elements can hold a variant is walked element by element, so that
    /// each of its variants is visited, rather than skipped whole by its length.
    const INTO_ARRAYS: bool;

    /// The codes of a variant's signature are at `signature`.
    fn variant(&mut self, signature: Range<usize>);
}

/// Visits nothing: the walk only finds where each value ends, and skips arrays whole.
pub(crate) struct Skip;

impl Visit for Skip {
    const INTO_ARRAYS: bool = false;

    fn variant(&mut self, _: Range<usize>) {}
}

impl<'b> Raw<'b> {
    /// Walks the value of the complete type that starts `sig`, found at `pos` (before its
    /// alignment): returns the rest of the signature and the offset after the value.
    pub(crate) fn walk<'s, V: Visit>(
        self,
        sig: &'s [u8],
        pos: usize,
        depth: usize,
        visit: &mut V,
    ) -> Option<(&'s [u8], usize)> {
        let (&code, rest) = sig.split_first()?;
        if depth > MAX_DEPTH {
            return None;
        }
        let end = match code {
            b'a' => return self.walk_array(rest, pos, depth, visit),
            b'(' => return self.walk_members(rest, b')', pos, depth, visit),
            b'{' => return self.walk_members(rest, b'}', pos, depth, visit),
            b's' | b'o' => self.string_at(pos)?.1,
            b'g' => self.signature_at(pos)?.1,
            b'v' => {
                let (inner, value_pos) = self.signature_at(pos)?;
                let inner_sig = self.bytes.get(inner.clone())?;
                visit.variant(inner);
                // An empty signature is of no type, and the validator refuses it. The walk takes
                // it for zbus's unit type (no bytes, 8-aligned), as the body check always has, so
                // that such a message is refused for the same reason as before.
                if inner_sig.is_empty() {
                    align(value_pos, 8)?
                } else {
                    self.walk_single(inner_sig, value_pos, depth + 1, visit)?
                }
            }
            _ => {
                let size = alignment(code)?;
                align(pos, size)?.checked_add(size)?
            }
        };
        (end <= self.bytes.len()).then_some((rest, end))
    }

    /// Walks the value of `sig`, which must be one complete type, at `pos`.
    fn walk_single<V: Visit>(
        self,
        sig: &[u8],
        pos: usize,
        depth: usize,
        visit: &mut V,
    ) -> Option<usize> {
        match self.walk(sig, pos, depth, visit)? {
            ([], end) => Some(end),
            _ => None,
        }
    }

    /// An array at `pos` of the complete type that starts `element`: walked element by element
    /// when the visitor asks for it and an element can hold a variant, skipped whole by its
    /// length otherwise.
    fn walk_array<'s, V: Visit>(
        self,
        element: &'s [u8],
        pos: usize,
        depth: usize,
        visit: &mut V,
    ) -> Option<(&'s [u8], usize)> {
        let len_pos = align(pos, 4)?;
        let len = self.usize_at(len_pos)?;
        let first = align(len_pos.checked_add(4)?, alignment(*element.first()?)?)?;
        let end = first.checked_add(len)?;
        let (element, rest) = element.split_at_checked(single_type_len(element)?)?;
        let inside = V::INTO_ARRAYS && element.contains(&b'v');
        let mut at = first;
        while inside && at < end {
            let next = self.walk_single(element, at, depth + 1, visit)?;
            // Every element takes at least a byte: no walk can stall.
            (next > at).then_some(())?;
            at = next;
        }
        (end <= self.bytes.len()).then_some((rest, end))
    }

    /// The members of a structure or dict entry, up to its `close` character.
    fn walk_members<'s, V: Visit>(
        self,
        mut sig: &'s [u8],
        close: u8,
        pos: usize,
        depth: usize,
        visit: &mut V,
    ) -> Option<(&'s [u8], usize)> {
        let mut pos = align(pos, 8)?;
        loop {
            match sig.split_first()? {
                (&c, rest) if c == close => {
                    return (pos <= self.bytes.len()).then_some((rest, pos));
                }
                _ => (sig, pos) = self.walk(sig, pos, depth + 1, visit)?,
            }
        }
    }
}

/// The ranges of the signatures of all the variants in `body` (whose signature is `sig`), at
/// any depth, as offsets into the body; `None` if the body cannot be walked.
pub(crate) fn variant_signatures(body: Raw<'_>, mut sig: &[u8]) -> Option<Vec<Range<usize>>> {
    struct Found(Vec<Range<usize>>);
    impl Visit for Found {
        const INTO_ARRAYS: bool = true;

        fn variant(&mut self, signature: Range<usize>) {
            self.0.push(signature);
        }
    }
    let mut found = Found(Vec::new());
    let mut pos = 0;
    while !sig.is_empty() {
        (sig, pos) = body.walk(sig, pos, 0, &mut found)?;
    }
    Some(found.0)
}

/// A top-level argument of a message body, as far as match rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arg<'b> {
    Str(&'b str),
    ObjectPath(&'b str),
    Other,
}

/// The top-level arguments of a message, in order, read straight from its wire bytes without
/// deserializing anything: match rules only look at strings and object paths, and most bodies
/// are never looked at. Any malformed byte ends the walk rather than panic.
pub(crate) struct Args<'b> {
    body: Raw<'b>,
    sig: &'b [u8],
    pos: usize,
}

impl<'b> Args<'b> {
    /// The arguments of the message whose whole wire form is `message`.
    pub(crate) fn of_message(message: &'b [u8]) -> Option<Self> {
        let raw = Raw::of_message(message)?;
        let body_len = raw.usize_at(4)?;
        let sig = body_signature(raw)?;
        let body_start = align(raw.fields_end()?, 8)?;
        let bytes = message.get(body_start..body_start.checked_add(body_len)?)?;
        Some(Args {
            body: Raw::new(bytes, raw.endian),
            sig,
            pos: 0,
        })
    }
}

impl<'b> Iterator for Args<'b> {
    type Item = Arg<'b>;

    fn next(&mut self) -> Option<Arg<'b>> {
        let step = self.body.walk(self.sig, self.pos, 0, &mut Skip);
        let arg = match self.sig.first() {
            Some(b's') => self.body.str_at(self.pos).map(Arg::Str),
            Some(b'o') => self.body.str_at(self.pos).map(Arg::ObjectPath),
            _ => Some(Arg::Other),
        };
        match (step, arg) {
            (Some((sig, pos)), Some(arg)) => {
                (self.sig, self.pos) = (sig, pos);
                Some(arg)
            }
            _ => {
                self.sig = &[];
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use zbus::message::Message;
    use zbus::{ObjectPath, Signature, Variant};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn args_of(msg: &Message) -> Vec<Arg<'_>> {
        Args::of_message(msg.data().bytes())
            .map(|args| args.collect())
            .unwrap_or_default()
    }

    fn signal(endian: Endian) -> zbus::message::Builder<'static> {
        Message::signal("/a/b", "com.example.Iface", "Changed").endian(endian)
    }

    /// A message with `sig` for its body signature and `body` for its body, little-endian,
    /// built by hand so that tests can give it bodies zbus would refuse to build.
    fn raw_message(sig: &[u8], body: &[u8]) -> Vec<u8> {
        let sig_len = u8::try_from(sig.len()).unwrap_or(u8::MAX);
        let field_len = 4 + 1 + sig.len() + 1;
        let mut msg = vec![b'l', 4, 0, 1];
        msg.extend((body.len() as u32).to_le_bytes());
        msg.extend(1u32.to_le_bytes());
        msg.extend((field_len as u32).to_le_bytes());
        msg.extend([8, 1, b'g', 0, sig_len]);
        msg.extend(sig);
        msg.push(0);
        msg.resize(msg.len().next_multiple_of(8), 0);
        msg.extend(body);
        msg
    }

    #[test]
    fn walks_every_kind_of_value_both_endiannesses() -> TestResult {
        for endian in [Endian::Little, Endian::Big] {
            let dict = HashMap::from([("k", Variant::from(7u64))]);
            let body = (
                1u8,
                vec![(1i32, "x")],
                Variant::from(3u16),
                "target",
                (true, 2.5f64, -3i16),
                dict,
                ObjectPath::try_from("/obj/path")?,
                Signature::try_from("a{sv}").map_err(zbus::Error::from)?,
                Variant::Variant(Box::new(Variant::from("deep"))),
                u64::MAX,
                "last",
            );
            let msg = signal(endian).build(&body)?;
            let other = Arg::Other;
            assert_eq!(
                args_of(&msg),
                [
                    other,
                    other,
                    other,
                    Arg::Str("target"),
                    other,
                    other,
                    Arg::ObjectPath("/obj/path"),
                    other,
                    other,
                    other,
                    Arg::Str("last"),
                ],
                "{endian:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn empty_body_has_no_arguments() -> TestResult {
        let msg = signal(Endian::Big).build(&())?;
        assert_eq!(args_of(&msg), []);
        Ok(())
    }

    #[test]
    fn empty_arrays_still_skip_their_padding() -> TestResult {
        // An empty array of 8-aligned elements has padding after its length.
        let body = (Vec::<(u64, u8)>::new(), "after", Vec::<u8>::new(), "end");
        let msg = signal(Endian::Little).build(&body)?;
        assert_eq!(
            args_of(&msg),
            [Arg::Other, Arg::Str("after"), Arg::Other, Arg::Str("end")]
        );
        Ok(())
    }

    #[test]
    fn hand_built_message_reads_like_a_built_one() {
        let mut body = 3u32.to_le_bytes().to_vec();
        body.extend(b"abc\0");
        assert_eq!(
            Args::of_message(&raw_message(b"s", &body)).map(|a| a.collect::<Vec<_>>()),
            Some(vec![Arg::Str("abc")])
        );
    }

    #[test]
    fn variants_nested_beyond_the_limit_end_the_walk() {
        let mut body = Vec::new();
        for _ in 0..10_000 {
            body.extend([1, b'v', 0]);
        }
        body.extend([1, b'y', 0, 5]);
        let msg = raw_message(b"vs", &body);
        let args = Args::of_message(&msg).map(|a| a.collect::<Vec<_>>());
        assert_eq!(args, Some(vec![]));
        let body = Raw::new(&msg[24..], Endian::Little);
        assert_eq!(variant_signatures(body, b"vs"), None);
    }

    #[test]
    fn strings_must_be_utf8_and_terminated() {
        let mut body = 2u32.to_le_bytes().to_vec();
        body.extend([0xff, 0xfe, 0]);
        let bad_utf8 = raw_message(b"s", &body);
        let unterminated = raw_message(b"s", &[2, 0, 0, 0, b'a', b'b', b'c']);
        for msg in [bad_utf8, unterminated] {
            let args = Args::of_message(&msg).map(|a| a.collect::<Vec<_>>());
            assert_eq!(args, Some(vec![]));
        }
    }

    /// Every single-byte corruption and every truncation of a real message is survived.
    #[test]
    fn never_panics_on_corrupt_bytes() -> TestResult {
        let body = (
            vec![(1i32, "x")],
            Variant::from((3u16, "in")),
            "target",
            ObjectPath::try_from("/p")?,
        );
        let msg = signal(Endian::Big).build(&body)?;
        let bytes = msg.data().bytes().to_vec();
        let mut walked = 0;
        for at in 0..bytes.len() {
            for value in [0u8, 1, 0x7f, 0xff, b'a', b'(', b')', b'v', b'{', b's'] {
                let mut corrupt = bytes.clone();
                corrupt[at] = value;
                walked += Args::of_message(&corrupt).map_or(0, |a| a.count());
                if let Some(raw) = Raw::of_message(&corrupt) {
                    walk_fields(raw, |_| true);
                    let sig = body_signature(raw).unwrap_or_default();
                    let body_start = raw.fields_end().map_or(0, |end| end.next_multiple_of(8));
                    let body = corrupt.get(body_start..).unwrap_or_default();
                    variant_signatures(Raw::new(body, raw.endian), sig);
                }
            }
            walked += Args::of_message(&bytes[..at]).map_or(0, |a| a.count());
        }
        assert!(walked > 0);
        assert_eq!(args_of(&msg).len(), 4);
        Ok(())
    }

    #[test]
    fn header_fields_are_walked_in_order_with_their_values() -> TestResult {
        let msg = signal(Endian::Big)
            .sender(":1.5")
            .destination("org.x")
            .build(&("body", 7u32))?;
        let raw = Raw::of_message(msg.data().bytes()).ok_or("endianness")?;
        let mut seen = Vec::new();
        assert!(walk_fields(raw, |field| {
            let value = match field.kind {
                b'u' => raw.u32_at(field.value.start).map(|v| v.to_string()),
                _ => raw
                    .bytes()
                    .get(field.value.clone())
                    .map(|b| String::from_utf8_lossy(b).into_owned()),
            };
            seen.push((field.code, field.kind, value.unwrap_or_default()));
            true
        }));
        seen.sort();
        assert_eq!(
            seen,
            [
                (1, b'o', "/a/b".into()),
                (2, b's', "com.example.Iface".into()),
                (3, b's', "Changed".into()),
                (6, b's', "org.x".into()),
                (7, b's', ":1.5".into()),
                (SIGNATURE_FIELD, b'g', "su".into()),
            ]
        );
        assert_eq!(body_signature(raw), Some(&b"su"[..]));
        Ok(())
    }

    #[test]
    fn a_field_of_another_type_ends_the_field_walk() {
        // Code 50, a variant of type "ay": no defined field has it.
        let mut msg = raw_message(b"", &[]);
        msg.extend([50, 2, b'a', b'y', 0, 0, 0, 0, 2, 0, 0, 0, 1, 2]);
        let len = (msg.len() - FIXED_HEADER) as u32;
        msg[12..16].copy_from_slice(&len.to_le_bytes());
        let raw = Raw::new(&msg, Endian::Little);
        let mut codes = Vec::new();
        assert!(!walk_fields(raw, |field| {
            codes.push(field.code);
            true
        }));
        assert_eq!(codes, [SIGNATURE_FIELD]);
        assert_eq!(body_signature(raw), None);
    }

    #[test]
    fn finds_the_signature_of_every_variant_at_any_depth() -> TestResult {
        let dict = HashMap::from([("k", Variant::from(7u64))]);
        let nested = Variant::Variant(Box::new(Variant::from("deep")));
        let body = (Variant::from(3u16), vec![(1u8, nested)], dict, 9u8);
        let msg = signal(Endian::Little).build(&body)?;
        let body = msg.body();
        let body_bytes = body.data().bytes();
        let found = variant_signatures(Raw::new(body_bytes, Endian::Little), b"va(yv)a{sv}y")
            .ok_or("walk")?;
        let sigs: Vec<&[u8]> = found.iter().map(|r| &body_bytes[r.clone()]).collect();
        assert_eq!(sigs, [&b"q"[..], b"v", b"s", b"t"]);
        // A walk that skips arrays finds where the values end all the same, and visits only the
        // variant outside them.
        struct Count(usize);
        impl Visit for Count {
            const INTO_ARRAYS: bool = false;
            fn variant(&mut self, _: Range<usize>) {
                self.0 += 1;
            }
        }
        let mut count = Count(0);
        let mut sig: &[u8] = b"va(yv)a{sv}y";
        let mut pos = 0;
        while !sig.is_empty() {
            (sig, pos) = Raw::new(body_bytes, Endian::Little)
                .walk(sig, pos, 0, &mut count)
                .ok_or("skip")?;
        }
        assert_eq!(pos, body_bytes.len());
        assert_eq!(count.0, 1);
        Ok(())
    }
}
