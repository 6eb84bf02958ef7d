//! Fingerprints: the 128-bit xxh3 hash of (namespace, key) that every tier stores.
//!
//! No tier ever stores a raw key. Two distinct keys are confused only when
//! their fingerprints collide; for `n` distinct keys the probability that any
//! two of them collide is at most `n² / 2¹²⁹`:
//!
//! | keys  | collision probability |
//! |-------|-----------------------|
//! | 10⁹   | ≈ 1.5 × 10⁻²¹         |
//! | 10¹²  | ≈ 1.5 × 10⁻¹⁵         |
//!
//! The namespace enters the hash as the seed of the key's xxh3-128, so the
//! same key in two namespaces gives two unrelated fingerprints and hashing a
//! key costs one pass over its bytes, with no concatenation.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64, xxh3_64_with_seed, Xxh3};

/// The 128-bit identity of one key in one namespace.
///
/// The low half chooses the filter block and the shard, the high half the
/// probe bits inside a block (see [`crate::filter`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Fingerprint(pub u128);

impl Fingerprint {
    /// The low 64 bits (block and shard selection).
    #[inline]
    #[must_use]
    pub fn low(self) -> u64 {
        self.0 as u64
    }

    /// The high 64 bits (probe positions inside a block).
    #[inline]
    #[must_use]
    pub fn high(self) -> u64 {
        (self.0 >> 64) as u64
    }

    /// The fingerprint whose [`Fingerprint::low`] and [`Fingerprint::high`]
    /// are `low` and `high`.
    #[inline]
    pub(crate) fn from_words(low: u64, high: u64) -> Self {
        Fingerprint(u128::from(low) | (u128::from(high) << 64))
    }

    /// The 16 bytes in little-endian order (the form stored in snapshots and
    /// in remote tiers).
    #[must_use]
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    /// The inverse of [`Fingerprint::to_bytes`].
    #[must_use]
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Fingerprint(u128::from_le_bytes(bytes))
    }
}

/// An independent key space (a consumer group, a tenant).
///
/// The same key in two namespaces is two keys. A namespace is reduced to the
/// 64-bit seed of the fingerprint hash once, when it is created.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Namespace {
    seed: u64,
}

impl Namespace {
    /// The namespace called `name`.
    #[must_use]
    pub fn new(name: &str) -> Self {
        Namespace {
            seed: xxh3_64(name.as_bytes()),
        }
    }

    /// The seed that identifies this namespace (stored in snapshots so a state
    /// is never restored into another namespace).
    #[must_use]
    pub fn seed(self) -> u64 {
        self.seed
    }

    /// The fingerprint of `key` in this namespace.
    #[inline]
    #[must_use]
    pub fn fingerprint(self, key: &[u8]) -> Fingerprint {
        Fingerprint(xxh3_128_with_seed(key, self.seed))
    }

    /// A builder for the fingerprint of a key made of several parts, such as
    /// the fields of a payload that together identify an operation.
    #[must_use]
    pub fn content(self) -> ContentKey {
        ContentKey {
            hasher: Xxh3::with_seed(self.seed),
        }
    }
}

impl Default for Namespace {
    /// The namespace called `""`.
    fn default() -> Self {
        Namespace::new("")
    }
}

/// Builds a fingerprint from a sequence of byte fields (the canonical bytes
/// of a payload).
///
/// Each field is framed by its length, so `["ab", "c"]` and `["a", "bc"]` are
/// different keys, and the order of fields matters.
///
/// ```
/// use tiered_dedup::Namespace;
/// let ns = Namespace::new("payments");
/// let a = ns.content().field(b"customer-42").field(b"2026-11-22").finish();
/// let b = ns.content().field(b"customer-4").field(b"22026-11-22").finish();
/// assert_ne!(a, b);
/// ```
#[derive(Clone)]
pub struct ContentKey {
    hasher: Xxh3,
}

impl ContentKey {
    /// Appends one field.
    #[must_use]
    pub fn field(mut self, bytes: &[u8]) -> Self {
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
        self
    }

    /// The fingerprint of the fields appended so far.
    #[must_use]
    pub fn finish(self) -> Fingerprint {
        Fingerprint(self.hasher.digest128())
    }
}

/// Anything that can identify an operation: raw bytes, strings, or a
/// ready-made fingerprint.
pub trait Key {
    /// The fingerprint of this key in `namespace`.
    fn fingerprint(&self, namespace: Namespace) -> Fingerprint;
}

impl Key for [u8] {
    #[inline]
    fn fingerprint(&self, namespace: Namespace) -> Fingerprint {
        namespace.fingerprint(self)
    }
}

impl Key for str {
    #[inline]
    fn fingerprint(&self, namespace: Namespace) -> Fingerprint {
        namespace.fingerprint(self.as_bytes())
    }
}

impl Key for String {
    #[inline]
    fn fingerprint(&self, namespace: Namespace) -> Fingerprint {
        namespace.fingerprint(self.as_bytes())
    }
}

impl Key for Vec<u8> {
    #[inline]
    fn fingerprint(&self, namespace: Namespace) -> Fingerprint {
        namespace.fingerprint(self)
    }
}

impl<const N: usize> Key for [u8; N] {
    #[inline]
    fn fingerprint(&self, namespace: Namespace) -> Fingerprint {
        namespace.fingerprint(self)
    }
}

impl Key for u64 {
    #[inline]
    fn fingerprint(&self, namespace: Namespace) -> Fingerprint {
        namespace.fingerprint(&self.to_le_bytes())
    }
}

/// A fingerprint computed by the caller (for instance by [`ContentKey`]) is
/// used as it is; the namespace it was made in is the caller's concern.
impl Key for Fingerprint {
    #[inline]
    fn fingerprint(&self, _namespace: Namespace) -> Fingerprint {
        *self
    }
}

impl<K: Key + ?Sized> Key for &K {
    #[inline]
    fn fingerprint(&self, namespace: Namespace) -> Fingerprint {
        (**self).fingerprint(namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_separate_keys() {
        let a = Namespace::new("a");
        let b = Namespace::new("b");
        assert_ne!(a.fingerprint(b"k"), b.fingerprint(b"k"));
        assert_eq!(a.fingerprint(b"k"), "k".fingerprint(a));
    }

    #[test]
    fn content_fields_are_framed() {
        let ns = Namespace::default();
        let ab_c = ns.content().field(b"ab").field(b"c").finish();
        let a_bc = ns.content().field(b"a").field(b"bc").finish();
        assert_ne!(ab_c, a_bc);
        let again = ns.content().field(b"ab").field(b"c").finish();
        assert_eq!(ab_c, again);
    }

    #[test]
    fn bytes_round_trip() {
        let fp = Namespace::default().fingerprint(b"x");
        assert_eq!(Fingerprint::from_bytes(fp.to_bytes()), fp);
    }
}

/// Hashes a [`Fingerprint`] as its high half, which is already a uniform
/// hash (the low half chose the shard, so its low bits repeat within one):
/// the maps the engine keys by fingerprint skip SipHash.
#[derive(Default)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for fingerprints (they write one `u128`).
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = (n >> 64) as u64;
    }
}

/// A map keyed by fingerprint, hashed by [`FingerprintHasher`].
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) type FingerprintMap<V> = HashMap<Fingerprint, V, BuildHasherDefault<FingerprintHasher>>;

/// Hashes a byte string with one seeded xxh3 call: std's SipHash took
/// about 245 instructions for a 20-byte key (callgrind), xxh3 a fraction
/// of that. The seed is drawn once per process, so keys from outside
/// (broker messages) cannot be chosen to collide; the maps that use it
/// live for one batch, so a collision costs at most a batch's keys.
#[derive(Default)]
pub(crate) struct BytesHasher(u64);

impl Hasher for BytesHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxh3_64_with_seed(bytes, self.0 ^ process_seed());
    }
    // The length `Hash for [u8]` writes first: folded into the seed.
    fn write_usize(&mut self, n: usize) {
        self.0 ^= n as u64;
    }
}

/// A random seed, drawn once per process.
fn process_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(0x7464_u64)
    })
}

/// A map keyed by byte strings, hashed by [`BytesHasher`].
pub(crate) type BytesMap<'a, V> = HashMap<&'a [u8], V, BuildHasherDefault<BytesHasher>>;
