//! `DashMapPartition`: the design card's `DashMap`, one per generation slot.
//!
//! Kept as an interchangeable backend and measured against
//! [`super::MemoryPartition`]: the shard lock already serialises access, so
//! the map's own shard locks are pure overhead here (see `docs/benchmarks.md`).

use std::hash::{BuildHasherDefault, Hasher};

use dashmap::DashMap;

use crate::claims::PayloadFingerprint;
use crate::error::ExactTierError;
use crate::fingerprint::Fingerprint;
use crate::time::{Timestamp, GENERATIONS};

use super::bodies::{BodyStore, RecordBody};
use super::{table_hash, ExactPartition, Mark};

/// Passes the fingerprint's high half through as the hash.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A fingerprint whose `Hash` writes only [`table_hash`].
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key(Fingerprint);

impl std::hash::Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(table_hash(self.0));
    }
}

type Map = DashMap<Key, u64, BuildHasherDefault<PassThrough>>;

/// The exact tier of one shard as one `DashMap` per slot.
pub struct DashMapPartition {
    slots: [Map; GENERATIONS],
    bodies: BodyStore,
}

impl DashMapPartition {
    /// An empty partition expecting about `per_slot` entries per slot.
    #[must_use]
    pub fn with_capacity(per_slot: usize) -> Self {
        let _ = per_slot;
        DashMapPartition {
            slots: std::array::from_fn(|_| Map::default()),
            bodies: BodyStore::default(),
        }
    }
}

impl ExactPartition for DashMapPartition {
    fn lookup(
        &mut self,
        fp: Fingerprint,
        slot: usize,
    ) -> Result<Option<Timestamp>, ExactTierError> {
        Ok(self.slots[slot]
            .get(&Key(fp))
            .map(|v| Timestamp::from_nanos(*v)))
    }

    fn mark(&mut self, fp: Fingerprint, slot: usize, at: Timestamp) -> Result<(), ExactTierError> {
        self.slots[slot].insert(Key(fp), at.as_nanos());
        Ok(())
    }

    fn put_body(
        &mut self,
        mark: &Mark,
        payload: Option<PayloadFingerprint>,
        result: &[u8],
    ) -> Result<(), ExactTierError> {
        self.bodies.put(
            mark.slot,
            mark.fingerprint,
            mark.at.as_nanos(),
            payload,
            result,
        );
        Ok(())
    }

    fn body(
        &mut self,
        fp: Fingerprint,
        slot: usize,
        at: Timestamp,
    ) -> Result<Option<RecordBody>, ExactTierError> {
        Ok(self.bodies.get(slot, fp, Some(at.as_nanos())))
    }

    fn bodies(&self) -> Vec<(usize, Fingerprint, Timestamp, RecordBody)> {
        self.bodies
            .iter()
            .map(|(slot, fp, at, body)| (slot, fp, Timestamp::from_nanos(at), body))
            .collect()
    }

    fn forget(&mut self, fp: Fingerprint) -> Result<bool, ExactTierError> {
        let mut found = self.bodies.remove(fp);
        for map in &self.slots {
            found |= map.remove(&Key(fp)).is_some();
        }
        Ok(found)
    }

    fn clear_slots(&mut self, slots: u8) {
        self.bodies.clear_slots(slots);
        for (g, map) in self.slots.iter_mut().enumerate() {
            if slots & (1 << g) != 0 {
                *map = Map::default();
            }
        }
    }

    fn len(&self) -> u64 {
        self.slots.iter().map(|m| m.len() as u64).sum()
    }

    fn bytes(&self) -> usize {
        // Entry (16 + 8) plus a control byte per bucket; DashMap does not
        // expose its tables' capacity exactly, so count capacity().
        self.slots.iter().map(|m| m.capacity() * 25).sum::<usize>() + self.bodies.bytes()
    }

    fn entries(&self) -> Option<Vec<(usize, Fingerprint, Timestamp)>> {
        let mut out = Vec::new();
        for (slot, map) in self.slots.iter().enumerate() {
            out.extend(
                map.iter()
                    .map(|e| (slot, e.key().0, Timestamp::from_nanos(*e.value()))),
            );
        }
        Some(out)
    }
}
