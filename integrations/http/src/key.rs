//! The `Idempotency-Key` header's value: an Item Structured Header whose bare
//! item is an sf-string (RFC 8941 §3.3.3; the draft's §2.1), checked without
//! allocating more than the key itself.

use std::borrow::Cow;
use std::fmt;

/// Which spellings of a key the layer accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySyntax {
    /// The draft's syntax only: a quoted sf-string, optionally followed by
    /// parameters (parsed and ignored), e.g.
    /// `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`.
    #[default]
    StructuredString,
    /// The draft's syntax, or an unquoted key of token characters
    /// (`A-Z a-z 0-9 ! # $ % & ' * + - . ^ _ \` | ~ : /`) as many existing
    /// clients send (`Idempotency-Key: 8e03978e-40d5-…`).
    StructuredStringOrBare,
}

/// Why a header value is not a key. Every variant is a `400` (problem type
/// `invalid-key`); the text says what to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The header appears more than once.
    Repeated,
    /// The value is not a quoted string (and bare keys are not accepted,
    /// or it has characters a bare key may not have).
    NotAString,
    /// A character an sf-string may not hold (outside printable ASCII), or
    /// a backslash that escapes neither `"` nor `\`.
    BadCharacter {
        /// Byte offset in the header value.
        at: usize,
    },
    /// The closing quote is missing.
    Unterminated,
    /// Something other than parameters follows the string.
    TrailingCharacters {
        /// Byte offset in the header value.
        at: usize,
    },
    /// A parameter after the string is malformed.
    BadParameter {
        /// Byte offset in the header value.
        at: usize,
    },
    /// The key is the empty string.
    Empty,
    /// The key is longer than the configured maximum.
    TooLong {
        /// The key's length in characters.
        len: usize,
        /// The maximum.
        max: usize,
    },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Repeated => f.write_str("the header is given more than once; send exactly one"),
            KeyError::NotAString => f.write_str(
                "the value must be a structured-field string in double quotes, e.g. \"8e03978e-40d5-43e8-bc93-6894a57f9324\"",
            ),
            KeyError::BadCharacter { at } => write!(
                f,
                "invalid character at byte {at}: a key holds printable ASCII only, and a backslash may escape only '\"' or '\\'"
            ),
            KeyError::Unterminated => f.write_str("the closing double quote is missing"),
            KeyError::TrailingCharacters { at } => write!(
                f,
                "unexpected characters at byte {at} after the quoted key (only ;parameters may follow)"
            ),
            KeyError::BadParameter { at } => write!(f, "malformed parameter at byte {at}"),
            KeyError::Empty => f.write_str("the key is empty"),
            KeyError::TooLong { len, max } => {
                write!(f, "the key is {len} characters long; at most {max} are accepted")
            }
        }
    }
}

impl std::error::Error for KeyError {}

/// Parses one header value into the key it carries (unescaped).
///
/// # Errors
/// [`KeyError`] saying what is wrong.
pub fn parse_key(value: &[u8], syntax: KeySyntax, max_len: usize) -> Result<Vec<u8>, KeyError> {
    parse_key_in(value, syntax, max_len).map(Cow::into_owned)
}

/// [`parse_key`], borrowing the key from `value` when it has no escape
/// (the usual key: the layer then allocates nothing for it).
pub(crate) fn parse_key_in(
    value: &[u8],
    syntax: KeySyntax,
    max_len: usize,
) -> Result<Cow<'_, [u8]>, KeyError> {
    let mut p = Parser { s: value, i: 0 };
    p.skip_spaces();
    let key = match p.peek() {
        Some(b'"') => p.string()?,
        Some(c) if syntax == KeySyntax::StructuredStringOrBare && is_bare(c) => p.bare(),
        _ => return Err(KeyError::NotAString),
    };
    p.parameters()?;
    p.skip_spaces();
    if p.i != value.len() {
        // A bare key followed by something that is not a parameter: it had a
        // character keys may not hold.
        return Err(KeyError::TrailingCharacters { at: p.i });
    }
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: max_len,
        });
    }
    Ok(key)
}

/// Token characters (RFC 9110 tchar) plus `:` and `/` (RFC 8941 sf-token).
fn is_bare(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&c)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }

    /// An sf-string at a `"` (RFC 8941 §4.2.5): printable ASCII, `\"` and
    /// `\\` the only escapes.
    fn string(&mut self) -> Result<Cow<'a, [u8]>, KeyError> {
        self.i += 1;
        // The usual key: printable, no escape, then the closing quote —
        // borrowed whole.
        let rest: &'a [u8] = &self.s[self.i..];
        if let Some(end) = rest
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || !(0x20..=0x7e).contains(&c))
        {
            if rest[end] == b'"' {
                self.i += end + 1;
                return Ok(Cow::Borrowed(&rest[..end]));
            }
        }
        // At most the rest of the value: one allocation, no regrowth.
        let mut out = Vec::with_capacity(rest.len());
        loop {
            let Some(c) = self.peek() else {
                return Err(KeyError::Unterminated);
            };
            match c {
                b'"' => {
                    self.i += 1;
                    return Ok(Cow::Owned(out));
                }
                b'\\' => match self.s.get(self.i + 1) {
                    Some(&e @ (b'"' | b'\\')) => {
                        out.push(e);
                        self.i += 2;
                    }
                    None => return Err(KeyError::Unterminated),
                    Some(_) => return Err(KeyError::BadCharacter { at: self.i }),
                },
                0x20..=0x7e => {
                    out.push(c);
                    self.i += 1;
                }
                _ => return Err(KeyError::BadCharacter { at: self.i }),
            }
        }
    }

    fn bare(&mut self) -> Cow<'a, [u8]> {
        let start = self.i;
        while self.peek().is_some_and(is_bare) {
            self.i += 1;
        }
        Cow::Borrowed(&self.s[start..self.i])
    }

    /// `*( ";" *SP key [ "=" bare-item ] )` (RFC 8941 §4.2.3.2), values
    /// checked for shape and dropped: the draft defines no parameter.
    fn parameters(&mut self) -> Result<(), KeyError> {
        while self.peek() == Some(b';') {
            self.i += 1;
            self.skip_spaces();
            match self.peek() {
                Some(c) if c.is_ascii_lowercase() || c == b'*' => self.i += 1,
                _ => return Err(KeyError::BadParameter { at: self.i }),
            }
            while self.peek().is_some_and(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.*".contains(&c)
            }) {
                self.i += 1;
            }
            if self.peek() == Some(b'=') {
                self.i += 1;
                self.bare_item()?;
            }
        }
        Ok(())
    }

    /// A parameter's value: string, token, number, byte sequence, boolean.
    fn bare_item(&mut self) -> Result<(), KeyError> {
        let at = self.i;
        let bad = KeyError::BadParameter { at };
        match self.peek() {
            Some(b'"') => self.string().map(drop).map_err(|_| bad),
            Some(b'?') => {
                self.i += 1;
                match self.peek() {
                    Some(b'0' | b'1') => {
                        self.i += 1;
                        Ok(())
                    }
                    _ => Err(bad),
                }
            }
            Some(b':') => {
                self.i += 1;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c))
                {
                    self.i += 1;
                }
                if self.peek() == Some(b':') {
                    self.i += 1;
                    Ok(())
                } else {
                    Err(bad)
                }
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                self.i += 1;
                let digits = |p: &mut Self| {
                    let start = p.i;
                    while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                        p.i += 1;
                    }
                    p.i - start
                };
                let whole = usize::from(c != b'-') + digits(self);
                if whole == 0 || whole > 15 {
                    return Err(bad);
                }
                if self.peek() == Some(b'.') {
                    self.i += 1;
                    let frac = digits(self);
                    if frac == 0 || frac > 3 || whole > 12 {
                        return Err(bad);
                    }
                }
                Ok(())
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'*' => {
                self.i += 1;
                while self.peek().is_some_and(is_bare) {
                    self.i += 1;
                }
                Ok(())
            }
            _ => Err(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict(v: &str) -> Result<Vec<u8>, KeyError> {
        parse_key(v.as_bytes(), KeySyntax::StructuredString, 255)
    }

    #[test]
    fn the_drafts_examples_parse() {
        assert_eq!(
            strict("\"8e03978e-40d5-43e8-bc93-6894a57f9324\"").unwrap(),
            b"8e03978e-40d5-43e8-bc93-6894a57f9324"
        );
        assert_eq!(strict("  \"a b\"  ").unwrap(), b"a b");
        assert_eq!(strict(r#""q\"uote\\d""#).unwrap(), br#"q"uote\d"#);
        assert_eq!(
            strict("\"k\";a=1;b;c=?0;d=\"x\";e=:aGk=:;f=tok/1;g=-1.5").unwrap(),
            b"k"
        );
    }

    #[test]
    fn malformed_values_are_refused_with_a_reason() {
        assert_eq!(strict("abc"), Err(KeyError::NotAString));
        assert_eq!(strict(""), Err(KeyError::NotAString));
        assert_eq!(strict("\"abc"), Err(KeyError::Unterminated));
        assert_eq!(strict("\"a\\"), Err(KeyError::Unterminated));
        assert_eq!(strict("\"a\\n\""), Err(KeyError::BadCharacter { at: 2 }));
        assert_eq!(strict("\"a\tb\""), Err(KeyError::BadCharacter { at: 2 }));
        assert_eq!(strict("\"\""), Err(KeyError::Empty));
        assert_eq!(
            strict("\"a\" x"),
            Err(KeyError::TrailingCharacters { at: 4 })
        );
        assert_eq!(
            strict("\"a\",\"b\""),
            Err(KeyError::TrailingCharacters { at: 3 })
        );
        assert_eq!(strict("\"a\";A=1"), Err(KeyError::BadParameter { at: 4 }));
        assert_eq!(
            strict("\"a\";a=1.2345"),
            Err(KeyError::BadParameter { at: 6 })
        );
        assert_eq!(
            parse_key(b"\"abcdef\"", KeySyntax::StructuredString, 5),
            Err(KeyError::TooLong { len: 6, max: 5 })
        );
        assert!(parse_key(&[b'"', 0xc3, 0xa9, b'"'], KeySyntax::StructuredString, 9).is_err());
    }

    #[test]
    fn bare_keys_only_when_allowed() {
        let lenient = |v: &str| parse_key(v.as_bytes(), KeySyntax::StructuredStringOrBare, 255);
        assert_eq!(lenient("8e03978e-40d5").unwrap(), b"8e03978e-40d5");
        assert_eq!(lenient("\"quoted\"").unwrap(), b"quoted");
        assert!(lenient("a b").is_err());
        assert!(lenient("a,b").is_err());
        assert_eq!(strict("8e03978e-40d5"), Err(KeyError::NotAString));
    }

    /// The sf-string grammar, one byte at a time: what `Parser::string`
    /// must answer (with where it stopped) for any input after a `"`.
    fn reference_string(s: &[u8]) -> (Result<Vec<u8>, KeyError>, usize) {
        let mut i = 1;
        let mut out = Vec::new();
        loop {
            match s.get(i).copied() {
                None => return (Err(KeyError::Unterminated), i),
                Some(b'"') => return (Ok(out), i + 1),
                Some(b'\\') => match s.get(i + 1) {
                    Some(&e @ (b'"' | b'\\')) => {
                        out.push(e);
                        i += 2;
                    }
                    None => return (Err(KeyError::Unterminated), i),
                    Some(_) => return (Err(KeyError::BadCharacter { at: i }), i),
                },
                Some(c @ 0x20..=0x7e) => {
                    out.push(c);
                    i += 1;
                }
                Some(_) => return (Err(KeyError::BadCharacter { at: i }), i),
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn strings_parse_as_the_grammar_says(
            tail in proptest::collection::vec(
                proptest::sample::select(vec![b'a', b'"', b'\\', b' ', b'~', 0x7f, 0x1f, b';', 0xc3]),
                0..16,
            )
        ) {
            let mut s = vec![b'"'];
            s.extend_from_slice(&tail);
            let mut p = Parser { s: &s, i: 0 };
            let got = p.string().map(Cow::into_owned);
            let (want, stop) = reference_string(&s);
            proptest::prop_assert_eq!(&got, &want);
            if want.is_ok() {
                proptest::prop_assert_eq!(p.i, stop);
            }
        }
    }
}
