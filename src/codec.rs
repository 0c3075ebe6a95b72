//! The byte-level pieces every record codec is made of, checked both ways.
//!
//! Records are little-endian fixed-width integers and length-prefixed
//! texts. Writing, a value that does not fit its length prefix is an error
//! (a record is checked against its codec's limits before it is written,
//! never cut short by an `as u8`); reading, a short record, an invalid text
//! or bytes left over at the end are errors. A record that does not decode
//! means the store is corrupt: the node stops (at start, with a message
//! naming the record) or refuses (while serving), never panics and never
//! guesses.

use crate::domain::Id;
use crate::Error;

/// Builds a record; see the module documentation.
#[derive(Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    pub fn new() -> Writer {
        Writer(Vec::new())
    }

    pub fn byte(&mut self, byte: u8) {
        self.0.push(byte);
    }

    pub fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    pub fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    pub fn i64(&mut self, value: i64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    /// A count or length that must fit in one byte.
    pub fn count_u8(&mut self, what: &str, count: usize) -> Result<(), Error> {
        let count = u8::try_from(count)
            .map_err(|_| Error::InvalidInput(format!("{what} is {count}; the record holds at most {}", u8::MAX)))?;
        self.0.push(count);
        Ok(())
    }

    /// A text with a two-byte length: at most [`TEXT_LEN_MAX`] bytes.
    pub fn text(&mut self, what: &str, text: &str) -> Result<(), Error> {
        let len = u16::try_from(text.len()).map_err(|_| {
            Error::InvalidInput(format!("{what} is {} bytes long; a record holds at most {TEXT_LEN_MAX}", text.len()))
        })?;
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }

    /// A text with a one-byte length (ids): at most 255 bytes.
    pub fn short_text(&mut self, what: &str, text: &str) -> Result<(), Error> {
        self.count_u8(&format!("the length of {what}"), text.len())?;
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }

    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// The longest text a record holds (its length is a `u16`).
pub const TEXT_LEN_MAX: usize = u16::MAX as usize;

/// Reads a record; every call fails on a short record instead of panicking.
pub struct Reader<'a>(&'a [u8]);

/// The error of a record (or key) that does not decode: why.
pub fn corrupt(why: impl std::fmt::Display) -> Error {
    Error::Fatal(format!("corrupt record: {why}"))
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader(bytes)
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.0.len() < n {
            return Err(corrupt(format!("{} bytes left where {n} are needed", self.0.len())));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn byte(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn i64(&mut self) -> Result<i64, Error> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn utf8(bytes: &[u8]) -> Result<String, Error> {
        String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("a text is not UTF-8"))
    }

    /// A text written by [`Writer::text`].
    pub fn text(&mut self) -> Result<String, Error> {
        let len = u16::from_le_bytes(self.array()?) as usize;
        Self::utf8(self.take(len)?)
    }

    /// A text written by [`Writer::short_text`].
    pub fn short_text(&mut self) -> Result<String, Error> {
        let len = self.byte()? as usize;
        Self::utf8(self.take(len)?)
    }

    /// An id written by [`Writer::text`].
    pub fn id(&mut self) -> Result<Id, Error> {
        parse_id(&self.text()?)
    }

    /// An id written by [`Writer::text`], or `None` for the empty text.
    pub fn optional_id(&mut self) -> Result<Option<Id>, Error> {
        let text = self.text()?;
        if text.is_empty() {
            return Ok(None);
        }
        parse_id(&text).map(Some)
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.0.len()
    }

    /// The record must end here.
    pub fn done(&self) -> Result<(), Error> {
        if !self.0.is_empty() {
            return Err(corrupt(format!("{} trailing bytes", self.0.len())));
        }
        Ok(())
    }
}

/// An id read from a record (or a key).
pub fn parse_id(text: &str) -> Result<Id, Error> {
    Id::parse("id", text).map_err(corrupt)
}

/// An id that ends a key after `prefix`.
pub fn id_from_key(prefix: &[u8], key: &[u8]) -> Result<Id, Error> {
    let rest = key.strip_prefix(prefix).ok_or_else(|| corrupt("the key has another prefix"))?;
    parse_id(std::str::from_utf8(rest).map_err(|_| corrupt("the key is not UTF-8"))?)
}

/// A key as a person reads it: printable ASCII as is, other bytes escaped.
pub fn show_key(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

/// The error of a record that does not decode, naming it: the store is
/// corrupt, and the node must not start (or answer) from it.
pub fn corrupt_record(key: &[u8], error: Error) -> Error {
    let why = match error {
        Error::Fatal(why) => why,
        other => other.to_string(),
    };
    Error::Fatal(format!(
        "the record {:?} is corrupt ({why}); the node does not start from a store it cannot read",
        show_key(key)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_too_long_for_their_prefix_are_errors_not_truncated() {
        let mut w = Writer::new();
        assert!(w.text("a reason", &"x".repeat(TEXT_LEN_MAX)).is_ok());
        assert!(matches!(w.text("a reason", &"x".repeat(TEXT_LEN_MAX + 1)), Err(Error::InvalidInput(_))));
        assert!(matches!(w.short_text("an id", &"x".repeat(256)), Err(Error::InvalidInput(_))));
        assert!(matches!(w.count_u8("legs", 256), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn short_and_trailing_bytes_are_errors() {
        let mut w = Writer::new();
        w.text("t", "hello").unwrap();
        w.u64(7);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.text().unwrap(), "hello");
        assert_eq!(r.u64().unwrap(), 7);
        assert!(r.done().is_ok());
        let mut r = Reader::new(&bytes[..bytes.len() - 1]);
        r.text().unwrap();
        assert!(matches!(r.u64(), Err(Error::Fatal(_))));
        let mut longer = bytes.clone();
        longer.push(0);
        let mut r = Reader::new(&longer);
        r.text().unwrap();
        r.u64().unwrap();
        assert!(matches!(r.done(), Err(Error::Fatal(_))));
        assert!(Reader::new(&[0xff, 0xff]).text().is_err(), "a length past the end");
        assert!(Reader::new(&[1, 0, 0xff]).text().is_err(), "not UTF-8");
    }
}
