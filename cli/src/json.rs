//! JSON pointers (RFC 6901) and the one-pass walk that finds their targets in
//! an NDJSON record: the record is validated as it is read, members off the
//! pointers' paths are skipped without being built, and each target is
//! borrowed from the record as raw JSON text.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// A JSON pointer: `""` (the whole value) or `/a/b/0`, with `~1` for `/`
/// and `~0` for `~` inside a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    segments: Vec<String>,
}

impl Pointer {
    /// Parses a pointer, with a hint when the leading `/` is missing.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Pointer {
                text: String::new(),
                segments: Vec::new(),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "a JSON pointer starts with `/`: did you mean `/{text}`?"
            ));
        };
        let segments = rest
            .split('/')
            .map(|seg| {
                let mut out = String::with_capacity(seg.len());
                let mut chars = seg.chars();
                while let Some(c) = chars.next() {
                    match c {
                        '~' => match chars.next() {
                            Some('0') => out.push('~'),
                            Some('1') => out.push('/'),
                            _ => {
                                return Err(format!(
                                "`{text}`: in a JSON pointer `~` is followed by 0 (for ~) or 1 (for /)"
                            ))
                            }
                        },
                        c => out.push(c),
                    }
                }
                Ok(out)
            })
            .collect::<Result<_, _>>()?;
        Ok(Pointer {
            text: text.to_owned(),
            segments,
        })
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            f.write_str("\"\" (the whole record)")
        } else {
            f.write_str(&self.text)
        }
    }
}

/// Several pointers, compiled into a trie of segments so that one walk over
/// a record finds all their targets.
#[derive(Debug)]
pub struct PointerSet {
    /// Node 0 is the root.
    nodes: Vec<Node>,
    len: usize,
}

#[derive(Debug, Default)]
struct Node {
    children: Vec<(String, usize)>,
    /// Indices of the pointers that end here.
    targets: Vec<usize>,
}

impl PointerSet {
    /// The set of `pointers`; target `i` of [`PointerSet::find`] is
    /// `pointers[i]`'s.
    pub fn new<'p>(pointers: impl IntoIterator<Item = &'p Pointer>) -> Self {
        let mut nodes = vec![Node::default()];
        let mut len = 0;
        for (i, p) in pointers.into_iter().enumerate() {
            let mut at = 0;
            for seg in &p.segments {
                at = match nodes[at].children.iter().find(|(s, _)| s == seg) {
                    Some(&(_, child)) => child,
                    None => {
                        nodes.push(Node::default());
                        let child = nodes.len() - 1;
                        nodes[at].children.push((seg.clone(), child));
                        child
                    }
                };
            }
            nodes[at].targets.push(i);
            len = i + 1;
        }
        PointerSet { nodes, len }
    }

    /// Validates `record` as exactly one JSON value and fills `out` with
    /// each pointer's target as raw JSON (`None` where absent). A member
    /// given twice counts by its last occurrence.
    pub fn find<'r>(
        &self,
        record: &'r str,
        out: &mut [Option<&'r RawValue>],
    ) -> Result<(), serde_json::Error> {
        debug_assert_eq!(out.len(), self.len);
        out.fill(None);
        let mut de = serde_json::Deserializer::from_str(record);
        NodeSeed {
            set: self,
            node: 0,
            out,
        }
        .deserialize(&mut de)?;
        de.end()
    }

    /// The number of pointers.
    pub fn len(&self) -> usize {
        self.len
    }
}

/// Deserializes the value at one trie node.
struct NodeSeed<'a, 'r> {
    set: &'a PointerSet,
    node: usize,
    out: &'a mut [Option<&'r RawValue>],
}

impl<'r> DeserializeSeed<'r> for NodeSeed<'_, 'r> {
    type Value = ();

    fn deserialize<D: Deserializer<'r>>(self, d: D) -> Result<(), D::Error> {
        let node = &self.set.nodes[self.node];
        if node.targets.is_empty() {
            if node.children.is_empty() {
                IgnoredAny::deserialize(d)?;
                return Ok(());
            }
            return d.deserialize_any(NodeVisitor(self));
        }
        // A target: borrow its text; walk it again only if another pointer
        // goes deeper (rare: `--key /a --key /a/b`).
        let raw = <&'r RawValue>::deserialize(d)?;
        for &t in &node.targets {
            self.out[t] = Some(raw);
        }
        if !node.children.is_empty() {
            let mut inner = serde_json::Deserializer::from_str(raw.get());
            inner
                .deserialize_any(NodeVisitor(self))
                .map_err(de::Error::custom)?;
        }
        Ok(())
    }
}

/// Visits the value at a node that has children: descends into matching
/// members and elements, skips the rest; scalars have no members.
struct NodeVisitor<'a, 'r>(NodeSeed<'a, 'r>);

impl NodeVisitor<'_, '_> {
    fn child_named(&self, name: &str) -> Option<usize> {
        self.0.set.nodes[self.0.node]
            .children
            .iter()
            .find(|(s, _)| s == name)
            .map(|&(_, c)| c)
    }

    fn child_at(&self, index: usize) -> Option<usize> {
        // A pointer's array index is decimal digits without leading zeros.
        self.0.set.nodes[self.0.node]
            .children
            .iter()
            .find(|(s, _)| {
                (s == "0" || !s.starts_with('0'))
                    && s.bytes().all(|b| b.is_ascii_digit())
                    && s.parse::<usize>() == Ok(index)
            })
            .map(|&(_, c)| c)
    }
}

impl<'r> Visitor<'r> for NodeVisitor<'_, 'r> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'r>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(child) = map.next_key_seed(MemberName(&self))? {
            match child {
                Some(node) => map.next_value_seed(NodeSeed {
                    set: self.0.set,
                    node,
                    out: &mut *self.0.out,
                })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'r>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        loop {
            let more = match self.child_at(index) {
                Some(node) => seq
                    .next_element_seed(NodeSeed {
                        set: self.0.set,
                        node,
                        out: &mut *self.0.out,
                    })?
                    .is_some(),
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// A member name, matched against a node's children without allocating.
struct MemberName<'v, 'a, 'r>(&'v NodeVisitor<'a, 'r>);

impl<'r> DeserializeSeed<'r> for MemberName<'_, '_, '_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'r>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'r> Visitor<'r> for MemberName<'_, '_, '_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, name: &str) -> Result<Option<usize>, E> {
        Ok(self.0.child_named(name))
    }
}

/// What a key value is made of.
pub enum KeyText<'r> {
    /// The bytes the key is compared by.
    Bytes(Cow<'r, [u8]>),
    /// The value is `null`.
    Null,
}

/// The bytes a key value is compared by: a string's content, any other
/// value's JSON text (objects and arrays compact, members sorted by name, so
/// that member order and spacing do not matter).
pub fn key_text(raw: &RawValue) -> KeyText<'_> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => KeyText::Bytes(match string_content(raw) {
            Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
            Cow::Owned(s) => Cow::Owned(s.into_bytes()),
        }),
        Some(b'n') => KeyText::Null,
        Some(b'{' | b'[') => {
            // Valid JSON already: parsing cannot fail.
            let value: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            let mut out = Vec::with_capacity(text.len());
            write_canonical(&value, &mut out);
            KeyText::Bytes(Cow::Owned(out))
        }
        _ => KeyText::Bytes(Cow::Borrowed(text.as_bytes())),
    }
}

/// The content of a raw JSON string, borrowed unless it has escapes.
pub fn string_content(raw: &RawValue) -> Cow<'_, str> {
    struct Content;
    impl<'r> Visitor<'r> for Content {
        type Value = Cow<'r, str>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E>(self, s: &'r str) -> Result<Cow<'r, str>, E> {
            Ok(Cow::Borrowed(s))
        }
        fn visit_str<E>(self, s: &str) -> Result<Cow<'r, str>, E> {
            Ok(Cow::Owned(s.to_owned()))
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.deserialize_str(Content).unwrap_or_default()
}

/// Compact JSON with object members sorted by name.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (name, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Serializing a string into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, name);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

/// A serde_json error without the "at line 1" a one-line record makes
/// redundant: `expected value at column 7`.
pub fn describe_error(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let message = full
        .rfind(" at line ")
        .map_or(full.as_str(), |i| &full[..i]);
    if e.column() == 0 {
        message.to_owned()
    } else {
        format!("{message} at column {}", e.column())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(pointers: &[&str], record: &str) -> Result<Vec<Option<String>>, String> {
        let pointers: Vec<Pointer> = pointers
            .iter()
            .map(|p| Pointer::parse(p).unwrap())
            .collect();
        let set = PointerSet::new(&pointers);
        let mut out = vec![None; set.len()];
        set.find(record, &mut out).map_err(|e| describe_error(&e))?;
        Ok(out.iter().map(|r| r.map(|r| r.get().to_owned())).collect())
    }

    #[test]
    fn pointers_parse_and_unescape() {
        let p = Pointer::parse("/a~1b/c~0d/0").unwrap();
        assert_eq!(p.segments, ["a/b", "c~d", "0"]);
        assert!(Pointer::parse("id").unwrap_err().contains("/id"));
        assert!(Pointer::parse("/a~2").is_err());
        assert!(Pointer::parse("").unwrap().segments.is_empty());
    }

    #[test]
    fn finds_nested_targets_in_one_walk() {
        let r = r#"{"id":"x","meta":{"rid":7,"t":[1,{"z":null}]},"skip":[{"id":1}]}"#;
        assert_eq!(
            targets(
                &["/id", "/meta/rid", "/meta/t/1/z", "/nope", "/meta/t/01"],
                r
            )
            .unwrap(),
            [
                Some("\"x\"".into()),
                Some("7".into()),
                Some("null".into()),
                None,
                None
            ]
        );
        assert_eq!(
            targets(&["/meta", "/meta/rid"], r).unwrap(),
            [
                Some(r#"{"rid":7,"t":[1,{"z":null}]}"#.into()),
                Some("7".into())
            ]
        );
        assert_eq!(targets(&[""], " [1, 2] ").unwrap(), [Some("[1, 2]".into())]);
        // Last occurrence wins.
        assert_eq!(
            targets(&["/a"], r#"{"a":1,"a":2}"#).unwrap(),
            [Some("2".into())]
        );
    }

    #[test]
    fn invalid_json_is_refused_even_off_the_path() {
        assert!(targets(&["/id"], r#"{"id":1,"x":[1,}"#).is_err());
        assert!(targets(&["/id"], r#"{"id":1} {"id":2}"#).is_err());
        assert!(targets(&["/id"], "").is_err());
        let e = targets(&["/id"], r#"{"id":1,,}"#).unwrap_err();
        assert!(e.contains("column"), "{e}");
    }

    #[test]
    fn key_text_is_canonical() {
        let text = |s: &str| match key_text(&RawValue::from_string(s.to_owned()).unwrap()) {
            KeyText::Bytes(b) => Some(String::from_utf8(b.into_owned()).unwrap()),
            KeyText::Null => None,
        };
        assert_eq!(text(r#""a\"b""#).unwrap(), "a\"b");
        assert_eq!(text("7").unwrap(), "7");
        assert_eq!(
            text(r#"{ "b": 1, "a": [ 2, {"d":1,"c":2} ] }"#).unwrap(),
            r#"{"a":[2,{"c":2,"d":1}],"b":1}"#
        );
        assert_eq!(text("null"), None);
    }
}
