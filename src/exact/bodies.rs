//! `BodyStore`: what a committed claim stores beyond its time — the payload
//! fingerprint and the result bytes — for the local tiers, grouped by the
//! same eight generation slots as their entries so that a slot's bodies are
//! dropped whole when its slice expires (no scan).
//!
//! Bodies are appended to one byte arena per slot (chunks of 1 MiB), which
//! an open-addressing index of fingerprints points into: a commit allocates
//! nothing of its own, the index can be prefetched like the exact tier's
//! tables, and a slot's bodies are freed with it. Only claims committed with a payload
//! fingerprint or a non-empty result have a body; a key recorded by `check`
//! has none, so the store costs nothing until claims use it.

use std::sync::Arc;

use crate::claims::PayloadFingerprint;
use crate::fingerprint::Fingerprint;

use super::table::FingerprintTable;
use crate::time::GENERATIONS;

/// What a committed claim stores beside its record: the payload
/// fingerprint it was claimed with and the result it was committed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordBody {
    /// The claim's payload fingerprint (`None`: never a conflict).
    pub payload: Option<PayloadFingerprint>,
    /// The bytes stored at commit.
    pub result: Arc<[u8]>,
}

impl RecordBody {
    /// True when there is nothing to store: no payload and no result (a
    /// plain mark says all of it).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.payload.is_none() && self.result.is_empty()
    }
}

/// A body's header in its slot's arena, before the result bytes: the
/// acquisition time of its record (u64), the payload tag (u8) and
/// fingerprint (u64), the result's length (u32).
const HEADER: usize = 8 + 1 + 8 + 4;

/// One slot's bodies: an index from fingerprint to the offset of the body
/// in the arena (a [`FingerprintTable`], so the claim and commit paths can
/// prefetch it), and the arena of headers and results, appended.
struct Slot {
    index: FingerprintTable,
    /// Bodies, appended to the last chunk; a replaced or removed body's
    /// bytes stay until the slot is dropped. Chunks are never reallocated
    /// (a growing `Vec` copied every body about twice).
    chunks: Vec<Vec<u8>>,
    /// Bytes in all chunks.
    bytes: usize,
}

/// The largest chunk (a bigger body gets a chunk of its own size).
const CHUNK: usize = 1 << 20;

impl Default for Slot {
    fn default() -> Self {
        Slot {
            index: FingerprintTable::new(),
            chunks: Vec::new(),
            bytes: 0,
        }
    }
}

impl Slot {
    /// Room for `len` more bytes in the last chunk (a new chunk if not);
    /// the position they start at, as (chunk << 32) | offset.
    fn reserve(&mut self, len: usize) -> u64 {
        let fits = self
            .chunks
            .last()
            .is_some_and(|c| c.capacity() - c.len() >= len);
        if !fits {
            // Chunks double from 4 KiB to 1 MiB: a slot with few bodies
            // stays small.
            let size = self
                .chunks
                .last()
                .map_or(4 << 10, |c| (c.capacity() * 2).min(CHUNK))
                .max(len);
            self.chunks.push(Vec::with_capacity(size));
            self.bytes += size;
        }
        let chunk = self.chunks.len() - 1;
        ((chunk as u64) << 32) | self.chunks[chunk].len() as u64
    }

    /// Starts loading the header of the body at `position` (and the line
    /// after it: a 100-byte result spans two or three).
    #[inline]
    fn prefetch_body(&self, position: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Some(chunk) = self.chunks.get((position >> 32) as usize) {
            let ptr = chunk
                .as_ptr()
                .wrapping_add((position & 0xFFFF_FFFF) as usize)
                .cast::<i8>();
            // SAFETY: prefetch is a hint and never faults.
            unsafe {
                std::arch::x86_64::_mm_prefetch(ptr, std::arch::x86_64::_MM_HINT_T0);
                std::arch::x86_64::_mm_prefetch(
                    ptr.wrapping_add(64),
                    std::arch::x86_64::_MM_HINT_T0,
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = position;
    }

    /// The body at `position` if it belongs to the record accepted at `at`
    /// (`None`: any record).
    fn body_at(&self, position: u64, at: Option<u64>) -> Option<RecordBody> {
        let (stored_at, payload, result) = self.read(position);
        at.is_none_or(|at| stored_at == at).then(|| RecordBody {
            payload,
            result: Arc::from(result),
        })
    }

    /// The body at `position`: its record's time and the body.
    fn read(&self, position: u64) -> (u64, Option<PayloadFingerprint>, &[u8]) {
        let chunk = &self.chunks[(position >> 32) as usize];
        let a = &chunk[(position & 0xFFFF_FFFF) as usize..];
        let word = |i: usize| u64::from_le_bytes(a[i..i + 8].try_into().expect("8 bytes"));
        let at = word(0);
        let payload = (a[8] == 1).then(|| PayloadFingerprint(word(9)));
        let len = u32::from_le_bytes(a[17..21].try_into().expect("4 bytes")) as usize;
        (at, payload, &a[HEADER..HEADER + len])
    }
}

/// Bodies by generation slot, then fingerprint.
#[derive(Default)]
pub(crate) struct BodyStore {
    slots: [Slot; GENERATIONS],
    len: usize,
    /// Bodies a slot's index is first sized for (its tier's expected keys
    /// per slot): growing from nothing rehashed every body about three
    /// times.
    per_slot: usize,
    /// A body's slot follows from its record's time alone (one table for
    /// the window, bodies filed by the slice they were accepted in): a
    /// body not in its slot is nowhere, and the others are not searched
    /// (seven cache misses for each record committed without a body).
    slot_from_time: bool,
}

impl BodyStore {
    /// True when no body is stored (the claim path skips the lookup).
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Says that callers name the one slot a body can be in
    /// ([`BodyStore::get`] looks nowhere else).
    pub(crate) fn file_by_time(&mut self) {
        self.slot_from_time = true;
    }

    /// Sizes each slot's index, when first used, for `bodies` (a hint).
    #[inline]
    pub(crate) fn expect_per_slot(&mut self, bodies: usize) {
        self.per_slot = bodies;
    }

    /// Starts loading the index bucket a [`BodyStore::put`] of `fp` into
    /// `slot` (or a [`BodyStore::get`] that finds it there) reads.
    #[inline]
    pub(crate) fn prefetch(&self, slot: usize, fp: Fingerprint) {
        self.slots[slot].index.prefetch(fp);
    }

    /// Stores the body of `fp`'s record accepted at `at`, in `slot`. A
    /// body of an earlier record of `fp` in another slot stays until its
    /// slot is dropped (it belongs to another time, so it is never
    /// returned for this record).
    pub(crate) fn put(
        &mut self,
        slot: usize,
        fp: Fingerprint,
        at: u64,
        payload: Option<PayloadFingerprint>,
        result: &[u8],
    ) {
        let per_slot = self.per_slot;
        let slot = &mut self.slots[slot];
        if !slot.index.is_allocated() && per_slot > 0 {
            slot.index = FingerprintTable::with_capacity(per_slot);
        }
        let len = u32::try_from(result.len()).expect("results are capped far below 4 GiB");
        let position = slot.reserve(HEADER + result.len());
        let chunk = slot.chunks.last_mut().expect("reserved");
        // The header in one write (five appends cost a capacity check and
        // a length update each).
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(&at.to_le_bytes());
        header[8] = u8::from(payload.is_some());
        header[9..17].copy_from_slice(&payload.map_or(0, |p| p.0).to_le_bytes());
        header[17..].copy_from_slice(&len.to_le_bytes());
        chunk.extend_from_slice(&header);
        chunk.extend_from_slice(result);
        let before = slot.index.len();
        slot.index.insert(fp, position);
        self.len += slot.index.len() - before;
    }

    /// The body of `fp`'s record accepted at `at` (`None` for `at`: any
    /// record, for a tier that keeps no times). `slot` is where it most
    /// likely is; the others are searched after it, unless bodies are
    /// filed by time ([`BodyStore::file_by_time`]).
    pub(crate) fn get(&self, slot: usize, fp: Fingerprint, at: Option<u64>) -> Option<RecordBody> {
        if self.len == 0 {
            return None;
        }
        let others = (!self.slot_from_time).then_some((0..GENERATIONS).filter(move |&s| s != slot));
        let order = std::iter::once(slot).chain(others.into_iter().flatten());
        for s in order {
            let slot = &self.slots[s];
            if let Some(body) = slot.index.get(fp).and_then(|p| slot.body_at(p, at)) {
                return Some(body);
            }
        }
        None
    }

    /// [`BodyStore::get`] of each of `wanted` (`(slot, fingerprint, at)`),
    /// in order, into `out`, with what each reads loaded ahead: every index
    /// bucket first, then the first lines of every body found in its slot.
    /// One by one, each body cost two cache misses in a row (its index
    /// bucket, then its header): 14% of the claims bench's samples for
    /// the tenth of its claims that answer completed.
    pub(crate) fn get_batch(
        &self,
        wanted: &[(usize, Fingerprint, Option<u64>)],
        out: &mut Vec<Option<RecordBody>>,
    ) {
        out.clear();
        if self.len == 0 {
            out.resize(wanted.len(), None);
            return;
        }
        for &(slot, fp, _) in wanted {
            self.prefetch(slot, fp);
        }
        let positions: Vec<Option<u64>> = wanted
            .iter()
            .map(|&(slot, fp, _)| {
                let slot = &self.slots[slot];
                let position = slot.index.get(fp);
                if let Some(p) = position {
                    slot.prefetch_body(p);
                }
                position
            })
            .collect();
        for (&(slot, fp, at), position) in wanted.iter().zip(positions) {
            let body = position.and_then(|p| self.slots[slot].body_at(p, at));
            // Elsewhere, or another record's: searched the slow way, where
            // there is an elsewhere (filed by time, its slot was all).
            let search = body.is_none() && !self.slot_from_time;
            out.push(if search { self.get(slot, fp, at) } else { body });
        }
    }

    /// Removes whatever is stored for `fp`; true if something was.
    pub(crate) fn remove(&mut self, fp: Fingerprint) -> bool {
        if self.len == 0 {
            return false;
        }
        let mut found = false;
        for slot in &mut self.slots {
            if slot.index.remove(fp) {
                self.len -= 1;
                found = true;
            }
        }
        found
    }

    /// Drops the bodies of the slots in `slots` (bit `g` = slot `g`).
    pub(crate) fn clear_slots(&mut self, slots: u8) {
        if self.len == 0 {
            return;
        }
        for (g, slot) in self.slots.iter_mut().enumerate() {
            if slots & (1 << g) != 0 && slot.index.len() > 0 {
                self.len -= slot.index.len();
                *slot = Slot::default();
            }
        }
    }

    /// Bodies stored.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes of memory used: indexes and arenas.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.iter().map(|s| s.index.bytes() + s.bytes).sum()
    }

    /// Every body as `(slot, fingerprint, acquired at, body)`, for
    /// snapshots.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, Fingerprint, u64, RecordBody)> + '_ {
        self.slots.iter().enumerate().flat_map(|(s, slot)| {
            slot.index.iter().map(move |(fp, position)| {
                let (at, payload, result) = slot.read(position);
                let body = RecordBody {
                    payload,
                    result: Arc::from(result),
                };
                (s, fp, at, body)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(payload: u64, result: &[u8]) -> RecordBody {
        RecordBody {
            payload: Some(PayloadFingerprint(payload)),
            result: result.into(),
        }
    }

    fn put(store: &mut BodyStore, slot: usize, fp: Fingerprint, at: u64, b: &RecordBody) {
        store.put(slot, fp, at, b.payload, &b.result);
    }

    #[test]
    fn a_body_belongs_to_the_record_it_was_stored_with() {
        let mut store = BodyStore::default();
        let fp = Fingerprint(7);
        put(&mut store, 3, fp, 100, &body(1, b"abc"));
        assert_eq!(store.get(3, fp, Some(100)), Some(body(1, b"abc")));
        // Found outside its likely slot too.
        assert_eq!(store.get(0, fp, Some(100)), Some(body(1, b"abc")));
        // A later record of the same key has no body.
        assert_eq!(store.get(3, fp, Some(200)), None);
        assert_eq!(store.get(3, fp, None), Some(body(1, b"abc")));
        assert_eq!(store.len(), 1);
        // A later record's body in another slot: each found for its own
        // record, whichever slot is searched first.
        put(&mut store, 4, fp, 300, &body(2, b"de"));
        assert_eq!(store.get(3, fp, Some(300)), Some(body(2, b"de")));
        assert_eq!(store.get(4, fp, Some(100)), Some(body(1, b"abc")));
        // Replaced in its own slot.
        put(&mut store, 4, fp, 400, &body(3, b""));
        assert_eq!(store.get(4, fp, Some(400)), Some(body(3, b"")));
        assert_eq!(store.len(), 2);
        assert!(store.remove(fp));
        assert!(store.is_empty());
        assert!(!store.remove(fp));
    }

    #[test]
    fn filed_by_time_a_body_is_looked_for_in_its_slot_only() {
        let mut store = BodyStore::default();
        store.file_by_time();
        let fp = Fingerprint(7);
        put(&mut store, 3, fp, 100, &body(1, b"abc"));
        assert_eq!(store.get(3, fp, Some(100)), Some(body(1, b"abc")));
        // Its time names slot 3: asked for another slot, the store does
        // not search (a record of another time has no body here).
        assert_eq!(store.get(0, fp, Some(100)), None);
        let mut out = Vec::new();
        store.get_batch(
            &[(3, fp, Some(100)), (0, fp, Some(100)), (3, fp, Some(200))],
            &mut out,
        );
        assert_eq!(out, vec![Some(body(1, b"abc")), None, None]);
    }

    #[test]
    fn a_batch_answers_as_one_get_each() {
        let mut store = BodyStore::default();
        for i in 0..200u128 {
            put(
                &mut store,
                (i % 8) as usize,
                Fingerprint(i),
                i as u64,
                &body(i as u64, &[i as u8; 5]),
            );
        }
        // Right slot, wrong slot (searched), wrong time, absent key.
        let wanted: Vec<(usize, Fingerprint, Option<u64>)> = (0..250u128)
            .map(|i| {
                (
                    (i % 8) as usize ^ usize::from(i % 3 == 0),
                    Fingerprint(i),
                    Some(i as u64 + u64::from(i % 5 == 0)),
                )
            })
            .collect();
        let mut out = Vec::new();
        store.get_batch(&wanted, &mut out);
        let one_by_one: Vec<_> = wanted
            .iter()
            .map(|&(s, fp, at)| store.get(s, fp, at))
            .collect();
        assert_eq!(out, one_by_one);
        assert!(out.iter().filter(|b| b.is_some()).count() > 100);
    }

    #[test]
    fn clearing_a_slot_drops_its_bodies_and_their_bytes() {
        let mut store = BodyStore::default();
        for i in 0..100u128 {
            put(
                &mut store,
                (i % 8) as usize,
                Fingerprint(i),
                1,
                &body(0, &[0; 10]),
            );
        }
        store.clear_slots(0b0000_0101);
        // Slots 0 and 2 held 13 bodies each (i = 0, 8, …, 96 and 2, …, 98).
        assert_eq!(store.len(), 74);
        assert!(store.get(0, Fingerprint(8), None).is_none());
        assert!(store.get(1, Fingerprint(9), None).is_some());
        assert_eq!(store.iter().count(), 74);
    }
}
