//! `GrowingBloom`: the filter of an engine without a window, where keys never
//! expire and the filter grows with the key count while keeping its rate.
//!
//! It is a chain of layers built from the same blocked storage. In a layer the
//! eight generation slots are used as fill stages: inserts go to one stage
//! until it holds its capacity, then to the next. When the eight stages of the
//! newest layer are full, a layer twice as large is added with half the
//! per-stage rate, so the rates summed over all stages of all layers stay
//! below the target (`Σ 8 · p/(8·2^(i+1)) < p`), down to a floor of 10⁻⁴ per
//! stage that the 64-bit blocks reach at about 45 bits per key. Used only under
//! the shard lock.

use crate::error::ConfigError;
use crate::fingerprint::Fingerprint;
use crate::time::GENERATIONS;

use super::blocks::BlockedBloom;
use super::generational::SlotSizing;

/// Lowest per-stage rate a layer is sized for (about 45 bits per key).
const STAGE_RATE_FLOOR: f64 = 1e-4;

pub(crate) struct GrowingBloom {
    layers: Vec<Layer>,
    overall_fpr: f64,
    /// Stage now filling in the newest layer, and keys in it.
    stage: usize,
    stage_len: u64,
}

pub(crate) struct Layer {
    pub(crate) bloom: BlockedBloom,
    /// Keys per stage before moving to the next.
    pub(crate) stage_capacity: u64,
}

impl GrowingBloom {
    pub(crate) fn new(initial_keys: u64, overall_fpr: f64) -> Result<Self, ConfigError> {
        let mut g = Self::empty(overall_fpr);
        let capacity = Self::first_stage_capacity(initial_keys);
        g.layers.push(g.make_layer(0, capacity)?);
        Ok(g)
    }

    /// Bytes of the first layer of a filter for `initial_keys`.
    pub(crate) fn initial_bytes(initial_keys: u64, overall_fpr: f64) -> Result<u64, ConfigError> {
        let g = Self::empty(overall_fpr);
        let sizing = g.layer_sizing(0, Self::first_stage_capacity(initial_keys))?;
        Ok(BlockedBloom::bytes_for(sizing.num_blocks))
    }

    fn first_stage_capacity(initial_keys: u64) -> u64 {
        initial_keys.div_ceil(GENERATIONS as u64).max(1)
    }

    fn empty(overall_fpr: f64) -> Self {
        GrowingBloom {
            layers: Vec::new(),
            overall_fpr,
            stage: 0,
            stage_len: 0,
        }
    }

    fn layer_sizing(&self, index: usize, stage_capacity: u64) -> Result<SlotSizing, ConfigError> {
        // Halve the rate per layer down to the layout's practical floor; past
        // it the summed rate creeps up slowly and shows in estimated_fpr().
        let rate = (self.overall_fpr / GENERATIONS as f64 / f64::from(2u32 << index.min(30)))
            .max(STAGE_RATE_FLOOR);
        SlotSizing::for_generation_rate(stage_capacity, rate, self.overall_fpr, 1)
    }

    fn make_layer(&self, index: usize, stage_capacity: u64) -> Result<Layer, ConfigError> {
        let sizing = self.layer_sizing(index, stage_capacity)?;
        // A layer that cannot be allocated is an error at build, and at
        // growth a filter that stops growing (counted), never an abort.
        let bloom = BlockedBloom::try_new(sizing.num_blocks, sizing.hashes).ok_or(
            ConfigError::OutOfMemory {
                bytes: BlockedBloom::bytes_for(sizing.num_blocks),
            },
        )?;
        Ok(Layer {
            bloom,
            stage_capacity,
        })
    }

    /// Starts loading the blocks of `fp` in every layer.
    pub(crate) fn prefetch(&self, fp: Fingerprint) {
        for l in &self.layers {
            l.bloom.prefetch(l.bloom.probe(fp));
        }
    }

    /// True when some stage of some layer holds every probe bit of `fp`.
    pub(crate) fn contains(&self, fp: Fingerprint) -> bool {
        self.layers
            .iter()
            .any(|l| l.bloom.hits(l.bloom.probe(fp)) != 0)
    }

    /// Inserts `fp`; returns false when the filter would not grow (the key
    /// is then kept in the newest stage beyond its capacity).
    pub(crate) fn insert(&mut self, fp: Fingerprint) -> bool {
        let layer = self.layers.last().expect("at least one layer");
        layer
            .bloom
            .insert_exclusive(layer.bloom.probe(fp), self.stage);
        self.stage_len += 1;
        if self.stage_len < layer.stage_capacity {
            return true;
        }
        if self.stage + 1 < GENERATIONS {
            self.stage += 1;
            self.stage_len = 0;
            return true;
        }
        let capacity = layer.stage_capacity.saturating_mul(2);
        match self.make_layer(self.layers.len(), capacity) {
            Ok(next) => {
                self.layers.push(next);
                self.stage = 0;
                self.stage_len = 0;
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub(crate) fn stage(&self) -> (usize, u64) {
        (self.stage, self.stage_len)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bloom.bytes()).sum()
    }

    pub(crate) fn from_parts(
        layers: Vec<Layer>,
        overall_fpr: f64,
        stage: usize,
        stage_len: u64,
    ) -> Self {
        GrowingBloom {
            layers,
            overall_fpr,
            stage,
            stage_len,
        }
    }

    /// The estimated rate of a query: a never-inserted key matching any stage.
    pub(crate) fn estimated_fpr(&self) -> f64 {
        let miss_all: f64 = self
            .layers
            .iter()
            .flat_map(|l| l.bloom.occupancies(4096))
            .map(|o| 1.0 - o.estimated_fpr)
            .product();
        1.0 - miss_all
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::fingerprint::Namespace;

    #[test]
    fn grows_and_keeps_everything() {
        let mut g = GrowingBloom::new(1_000, 0.01).unwrap();
        let ns = Namespace::default();
        for i in 0u64..50_000 {
            assert!(g.insert(ns.fingerprint(&i.to_le_bytes())));
        }
        assert!(g.layers().len() > 3);
        for i in 0u64..50_000 {
            assert!(g.contains(ns.fingerprint(&i.to_le_bytes())));
        }
        let fp = (50_000u64..150_000)
            .filter(|i| g.contains(ns.fingerprint(&i.to_le_bytes())))
            .count();
        assert!(fp < 1_500, "{fp} false positives in 100000");
    }
}
