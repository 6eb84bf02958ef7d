//! The filter tier: a rotating, cache-line-blocked Bloom filter that answers
//! most keys without touching the exact tier.
//!
//! - [`GenerationalBloom`] is the windowed filter: eight generation slots per
//!   64-byte block, so one query reads one cache line for all generations.
//! - An engine shard wraps it in a windowed filter that adds overflow layers
//!   under bursts (more keys in a slice than sized for) and frees them when
//!   their slices expire.
//! - The growing filter of an engine without a window chains such layers.
//! - [`sizing`] holds the exact false-positive formula of the layout and the
//!   sizing that meets a target rate.

mod blocks;
mod generational;
mod growing;
pub mod sizing;
mod windowed;

pub use blocks::SlotOccupancy;
pub use generational::{FilterAnswer, GenerationalBloom};

pub(crate) use blocks::{BlockedBloom, Probe};
pub(crate) use generational::SlotSizing;
pub(crate) use growing::{GrowingBloom, Layer};
pub(crate) use windowed::{OverflowLayer, Placement, WindowedFilter};
