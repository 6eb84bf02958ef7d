//! From a record's bytes to what the engine judges: its key fingerprint and,
//! under event time, its timestamp — or the reason it is bad input.

use std::fmt;

use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use tiered_dedup::{Fingerprint, Namespace, Timestamp};

use crate::cli::TimeUnit;
use crate::event_time::{parse_event_time, TimeError};
use crate::json::{describe_error, key_text, KeyText, Pointer, PointerSet};

/// The kinds of bad input, each counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BadKind {
    /// An NDJSON record that is not UTF-8.
    NotUtf8,
    /// An NDJSON record that is not exactly one JSON value.
    InvalidJson,
    /// A key pointer that is absent or null.
    MissingKey,
    /// The time pointer is absent or null.
    MissingTime,
    /// A time that is neither RFC 3339 nor a non-negative number.
    BadTime,
    /// `--output annotate` on a record that is not an object.
    NotObject,
    /// Older than the watermark minus the allowed lateness.
    Late,
    /// Later than `--max-future` past the watermark and the wall clock.
    Future,
    /// Longer than `--max-record-bytes`.
    TooLong,
}

impl BadKind {
    /// Every kind, in the order the summary lists them.
    pub const ALL: [BadKind; 9] = [
        BadKind::NotUtf8,
        BadKind::InvalidJson,
        BadKind::MissingKey,
        BadKind::MissingTime,
        BadKind::BadTime,
        BadKind::NotObject,
        BadKind::Late,
        BadKind::Future,
        BadKind::TooLong,
    ];

    /// The kind's name in messages and `--help`.
    pub fn name(self) -> &'static str {
        match self {
            BadKind::NotUtf8 => "not-utf8",
            BadKind::InvalidJson => "invalid-json",
            BadKind::MissingKey => "missing-key",
            BadKind::MissingTime => "missing-time",
            BadKind::BadTime => "bad-time",
            BadKind::NotObject => "not-object",
            BadKind::Late => "late",
            BadKind::Future => "future",
            BadKind::TooLong => "too-long",
        }
    }

    /// Position in [`BadKind::ALL`].
    pub fn index(self) -> usize {
        BadKind::ALL
            .iter()
            .position(|&k| k == self)
            .unwrap_or_default()
    }
}

/// A record that cannot be judged, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRecord {
    /// What is wrong.
    pub kind: BadKind,
    /// The details, for the message.
    pub detail: String,
}

impl BadRecord {
    pub(crate) fn new(kind: BadKind, detail: impl Into<String>) -> Self {
        BadRecord {
            kind,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.name(), self.detail)
    }
}

/// What the engine needs of a good record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgeable {
    /// The key's fingerprint in the namespace.
    pub fingerprint: Fingerprint,
    /// The event time, under `--time-field`.
    pub time: Option<Timestamp>,
}

/// How records become keys.
#[derive(Debug)]
pub enum Extractor {
    /// `--format lines`: the key is the line's bytes.
    Lines {
        /// The namespace keys are hashed in.
        namespace: Namespace,
    },
    /// `--format ndjson`.
    Ndjson(NdjsonKeys),
}

/// The NDJSON side of [`Extractor`].
#[derive(Debug)]
pub struct NdjsonKeys {
    namespace: Namespace,
    /// Key pointers first, then the time pointer (if any).
    pointers: PointerSet,
    key_pointers: Vec<Pointer>,
    time: Option<(Pointer, TimeUnit)>,
    /// `--output annotate` adds a member, so the record must be an object.
    need_object: bool,
}

impl Extractor {
    /// The extractor for `--format ndjson` with these pointers.
    pub fn ndjson(
        namespace: Namespace,
        keys: &[Pointer],
        time: Option<(Pointer, TimeUnit)>,
        need_object: bool,
    ) -> Self {
        let pointers = PointerSet::new(keys.iter().chain(time.as_ref().map(|(p, _)| p)));
        Extractor::Ndjson(NdjsonKeys {
            namespace,
            pointers,
            key_pointers: keys.to_vec(),
            time,
            need_object,
        })
    }

    /// The fingerprint (and time) of `record`, the bytes of one line
    /// without its newline.
    pub fn extract(&self, record: &[u8]) -> Result<Judgeable, BadRecord> {
        match self {
            Extractor::Lines { namespace } => Ok(Judgeable {
                fingerprint: namespace.fingerprint(record),
                time: None,
            }),
            Extractor::Ndjson(keys) => keys.extract(record),
        }
    }
}

/// JSON whitespace.
fn trim_json(s: &str) -> &str {
    s.trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n'))
}

impl NdjsonKeys {
    fn extract(&self, record: &[u8]) -> Result<Judgeable, BadRecord> {
        let text = std::str::from_utf8(record).map_err(|e| {
            BadRecord::new(
                BadKind::NotUtf8,
                format!("invalid UTF-8 at byte {}", e.valid_up_to() + 1),
            )
        })?;
        let trimmed = trim_json(text);
        if self.pointers.len() == 0 {
            // The whole record is the key: only validate it.
            serde_json::from_str::<IgnoredAny>(text)
                .map_err(|e| BadRecord::new(BadKind::InvalidJson, describe_error(&e)))?;
            self.check_object(trimmed)?;
            return Ok(Judgeable {
                fingerprint: self.namespace.fingerprint(trimmed.as_bytes()),
                time: None,
            });
        }
        let mut found: [Option<&RawValue>; 8] = [None; 8];
        let mut found_vec;
        let targets: &mut [Option<&RawValue>] = if self.pointers.len() <= found.len() {
            &mut found[..self.pointers.len()]
        } else {
            found_vec = vec![None; self.pointers.len()];
            &mut found_vec
        };
        self.pointers
            .find(text, targets)
            .map_err(|e| BadRecord::new(BadKind::InvalidJson, describe_error(&e)))?;
        self.check_object(trimmed)?;
        let n_keys = self.key_pointers.len();
        let fingerprint = if n_keys == 0 {
            self.namespace.fingerprint(trimmed.as_bytes())
        } else if n_keys == 1 {
            let bytes = self.key_bytes(0, targets[0])?;
            self.namespace.fingerprint(&bytes)
        } else {
            let mut content = self.namespace.content();
            for (i, raw) in targets[..n_keys].iter().enumerate() {
                content = content.field(&self.key_bytes(i, *raw)?);
            }
            content.finish()
        };
        let time = match &self.time {
            None => None,
            Some((pointer, unit)) => {
                let missing =
                    || BadRecord::new(BadKind::MissingTime, format!("no time at {pointer}"));
                let raw = targets[n_keys].ok_or_else(missing)?;
                Some(parse_event_time(raw, *unit).map_err(|e| match e {
                    TimeError::Null => missing(),
                    TimeError::Bad(why) => BadRecord::new(BadKind::BadTime, why),
                })?)
            }
        };
        Ok(Judgeable { fingerprint, time })
    }

    fn key_bytes<'r>(
        &self,
        i: usize,
        raw: Option<&'r RawValue>,
    ) -> Result<std::borrow::Cow<'r, [u8]>, BadRecord> {
        let missing = |what: &str| {
            BadRecord::new(
                BadKind::MissingKey,
                format!("{what} at {}", self.key_pointers[i]),
            )
        };
        match raw.map(key_text) {
            None => Err(missing("no key")),
            Some(KeyText::Null) => Err(missing("null key")),
            Some(KeyText::Bytes(b)) => Ok(b),
        }
    }

    fn check_object(&self, trimmed: &str) -> Result<(), BadRecord> {
        if self.need_object && !trimmed.starts_with('{') {
            return Err(BadRecord::new(
                BadKind::NotObject,
                "--output annotate adds a member, but the record is not a JSON object",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ndjson(keys: &[&str], time: Option<&str>) -> Extractor {
        let keys: Vec<Pointer> = keys.iter().map(|k| Pointer::parse(k).unwrap()).collect();
        Extractor::ndjson(
            Namespace::default(),
            &keys,
            time.map(|t| (Pointer::parse(t).unwrap(), TimeUnit::S)),
            false,
        )
    }

    fn kind(e: &Extractor, record: &[u8]) -> Option<BadKind> {
        e.extract(record).err().map(|b| b.kind)
    }

    #[test]
    fn keys_follow_the_documented_rules() {
        let e = ndjson(&["/id"], None);
        let fp = |r: &str| e.extract(r.as_bytes()).unwrap().fingerprint;
        let ns = Namespace::default();
        assert_eq!(fp(r#"{"id":"abc","x":1}"#), ns.fingerprint(b"abc"));
        assert_eq!(fp(r#"{"id":"7"}"#), fp(r#"{"id":7}"#));
        assert_eq!(
            fp(r#"{"id":{"a":1,"b":2}}"#),
            fp(r#"{"id":{"b":2, "a":1}}"#)
        );
        assert_ne!(fp(r#"{"id":1}"#), fp(r#"{"id":1.0}"#));
        let whole = ndjson(&[], None);
        assert_eq!(
            whole.extract(b" {\"a\":1}\r").unwrap().fingerprint,
            ns.fingerprint(b"{\"a\":1}")
        );
    }

    #[test]
    fn composite_keys_are_framed() {
        let e = ndjson(&["/a", "/b"], None);
        let fp = |r: &str| e.extract(r.as_bytes()).unwrap().fingerprint;
        assert_ne!(fp(r#"{"a":"ab","b":"c"}"#), fp(r#"{"a":"a","b":"bc"}"#));
        assert_eq!(fp(r#"{"a":"x","b":1}"#), fp(r#"{"b":1,"a":"x","c":0}"#));
    }

    #[test]
    fn each_bad_kind() {
        let e = ndjson(&["/id"], Some("/t"));
        assert_eq!(
            kind(&e, b"{\"id\":\"\xff\",\"t\":1}"),
            Some(BadKind::NotUtf8)
        );
        assert_eq!(kind(&e, b"{\"id\":1,\"t\":1"), Some(BadKind::InvalidJson));
        assert_eq!(kind(&e, b""), Some(BadKind::InvalidJson));
        assert_eq!(kind(&e, b"{\"t\":1}"), Some(BadKind::MissingKey));
        assert_eq!(
            kind(&e, b"{\"id\":null,\"t\":1}"),
            Some(BadKind::MissingKey)
        );
        assert_eq!(kind(&e, b"{\"id\":1}"), Some(BadKind::MissingTime));
        assert_eq!(
            kind(&e, b"{\"id\":1,\"t\":null}"),
            Some(BadKind::MissingTime)
        );
        assert_eq!(
            kind(&e, b"{\"id\":1,\"t\":\"yesterday\"}"),
            Some(BadKind::BadTime)
        );
        assert_eq!(kind(&e, b"{\"id\":1,\"t\":-5}"), Some(BadKind::BadTime));
        assert_eq!(
            e.extract(b"{\"id\":1,\"t\":2.5}").unwrap().time,
            Some(Timestamp::from_millis(2500))
        );
        let annotate = Extractor::ndjson(Namespace::default(), &[], None, true);
        assert_eq!(kind(&annotate, b"[1]"), Some(BadKind::NotObject));
        assert_eq!(kind(&annotate, b" {}"), None);
    }
}
