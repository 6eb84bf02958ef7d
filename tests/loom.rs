//! Model checks of the filter's hand-written atomics and rotation under loom:
//! `RUSTFLAGS="--cfg loom" cargo test --release --test loom`.
//!
//! The filter is one block (eight atomic words) over a 6 ns window, so slices
//! are 1 ns and every interleaving of a rotation with queries and inserts is
//! explored.
#![cfg(loom)]

use std::time::Duration;

use loom::sync::Arc;
use loom::thread;
use tiered_dedup::filter::sizing::FilterShape;
use tiered_dedup::{FilterAnswer, Fingerprint, GenerationalBloom, Timestamp};

const KEY: Fingerprint = Fingerprint(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);

fn filter(start: u64) -> Arc<GenerationalBloom> {
    let shape = FilterShape {
        bits_per_key: 64.0,
        hashes: 4,
    };
    let f = GenerationalBloom::with_shape(Duration::from_nanos(6), 1, shape).unwrap();
    f.advance(Timestamp::from_nanos(start));
    Arc::new(f)
}

#[test]
fn smoke() {
    loom::model(|| {
        let f = filter(10);
        assert!(f
            .check_and_insert(KEY, Timestamp::from_nanos(10))
            .is_definitely_new());
        assert!(f.contains(KEY, Timestamp::from_nanos(15)));
    });
}

/// Two threads insert one fresh key in the same slice: exactly one is told
/// it was new.
#[test]
fn one_fresh_key_is_new_once() {
    loom::model(|| {
        let f = filter(10);
        let f2 = Arc::clone(&f);
        let other = thread::spawn(move || f2.check_and_insert(KEY, Timestamp::from_nanos(10)));
        let mine = f.check_and_insert(KEY, Timestamp::from_nanos(10));
        let theirs = other.join().unwrap();
        let news = [mine, theirs]
            .iter()
            .filter(|a| a.is_definitely_new())
            .count();
        assert_eq!(news, 1, "{mine:?} {theirs:?}");
    });
}

/// One thread inserts at slice 10 while another moves to slice 11 and
/// inserts the same key: at most one is new, and the key is present after.
#[test]
fn a_fresh_key_racing_a_rotation_is_kept_and_new_at_most_once() {
    loom::model(|| {
        let f = filter(10);
        let f2 = Arc::clone(&f);
        let other = thread::spawn(move || f2.check_and_insert(KEY, Timestamp::from_nanos(11)));
        let mine = f.check_and_insert(KEY, Timestamp::from_nanos(10));
        let theirs = other.join().unwrap();
        let news = [mine, theirs]
            .iter()
            .filter(|a| a.is_definitely_new())
            .count();
        assert!(news <= 1, "{mine:?} {theirs:?}");
        assert!(f.contains(KEY, Timestamp::from_nanos(11)));
    });
}

/// An insert at slice 16 racing a rotation to 17 (which clears the spare
/// slot and publishes 17) is never lost: the key is present at 17.
#[test]
fn an_insert_racing_a_rotation_is_not_lost() {
    loom::model(|| {
        let f = filter(16);
        let f2 = Arc::clone(&f);
        let rotator = thread::spawn(move || f2.advance(Timestamp::from_nanos(17)));
        f.insert(KEY, Timestamp::from_nanos(16));
        rotator.join().unwrap();
        assert!(f.contains(KEY, Timestamp::from_nanos(17)));
    });
}

/// A key inserted at slice 11 is inside the window at 16 and 17: a query
/// racing the rotation to 17 (which clears slice 10's slot) always finds it,
/// and a key of slice 10 queried at 16 is found or correctly reported
/// expired, never half-cleared into a false answer for slice 16.
#[test]
fn queries_racing_a_rotation_never_miss_a_live_key() {
    loom::model(|| {
        let f = filter(11);
        let old = Fingerprint(KEY.0.rotate_left(17));
        assert_eq!(
            f.check_and_insert(KEY, Timestamp::from_nanos(11)),
            FilterAnswer::DefinitelyNew
        );
        f.advance(Timestamp::from_nanos(16));
        f.insert(old, Timestamp::from_nanos(16));
        let f2 = Arc::clone(&f);
        let rotator = thread::spawn(move || f2.advance(Timestamp::from_nanos(17)));
        assert!(f.contains(KEY, Timestamp::from_nanos(16)));
        assert!(f.contains(old, Timestamp::from_nanos(16)));
        rotator.join().unwrap();
    });
}

/// A batch insert at slice 16 racing a rotation to 17 loses none of its
/// keys: both are present at 17, through single and batch queries.
#[test]
fn a_batch_insert_racing_a_rotation_loses_no_key() {
    loom::model(|| {
        let f = filter(16);
        let other = Fingerprint(KEY.0.rotate_left(17));
        let f2 = Arc::clone(&f);
        let rotator = thread::spawn(move || f2.advance(Timestamp::from_nanos(17)));
        f.insert_batch(&[KEY, other], Timestamp::from_nanos(16));
        rotator.join().unwrap();
        let mut out = Vec::new();
        f.contains_batch(&[KEY, other], Timestamp::from_nanos(17), &mut out);
        assert_eq!(out, [true, true]);
        assert!(f.contains(other, Timestamp::from_nanos(17)));
    });
}

/// A batch query at 16 racing the rotation to 17 (which clears slice 10's
/// slot) finds both keys of slice 11, whichever side of the rotation each
/// of its reads falls on.
#[test]
fn a_batch_query_racing_a_rotation_never_misses_a_live_key() {
    loom::model(|| {
        let f = filter(11);
        let other = Fingerprint(KEY.0.rotate_left(17));
        f.insert_batch(&[KEY, other], Timestamp::from_nanos(11));
        f.advance(Timestamp::from_nanos(16));
        let f2 = Arc::clone(&f);
        let rotator = thread::spawn(move || f2.advance(Timestamp::from_nanos(17)));
        let mut out = Vec::new();
        f.contains_batch(&[KEY, other], Timestamp::from_nanos(16), &mut out);
        assert_eq!(out, [true, true]);
        rotator.join().unwrap();
    });
}
