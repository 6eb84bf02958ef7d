//! Large zeroed arrays on 2 MiB boundaries, advised to the kernel as huge
//! pages (`MADV_HUGEPAGE`, Linux).
//!
//! The filter and the exact tier are read at random positions across
//! hundreds of megabytes: with 4 KiB pages nearly every access also misses
//! the TLB, and the page walk can miss cache too. Transparent huge pages in
//! `madvise` mode (the common default) only back regions that ask for them.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Arrays at least this large get the huge-page alignment and advice.
const HUGE: usize = 2 << 20;

/// An owned, zero-initialised `[T]`. `T` must be valid as all-zero bytes.
pub(crate) struct ZeroedArray<T> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: `ZeroedArray<T>` owns its elements like `Box<[T]>`.
unsafe impl<T: Send> Send for ZeroedArray<T> {}
// SAFETY: shared access only hands out `&[T]`.
unsafe impl<T: Sync> Sync for ZeroedArray<T> {}

impl<T> ZeroedArray<T> {
    /// `len` zeroed elements.
    ///
    /// # Safety
    /// All-zero bytes must be a valid `T`.
    pub(crate) unsafe fn new(len: usize) -> Self {
        let layout = Self::layout(len);
        if layout.size() == 0 {
            return ZeroedArray {
                ptr: NonNull::dangling(),
                len,
            };
        }
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
            handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if layout.size() >= HUGE {
            // SAFETY: the range is our own fresh allocation; the advice is
            // only a hint and failure is harmless.
            unsafe {
                libc::madvise(raw.cast(), layout.size(), libc::MADV_HUGEPAGE);
            }
        }
        ZeroedArray { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        let layout = Layout::array::<T>(len).expect("array size overflows the address space");
        if layout.size() >= HUGE {
            layout.align_to(HUGE).expect("2 MiB is a valid alignment")
        } else {
            layout
        }
    }
}

impl<T> Deref for ZeroedArray<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points to `len` initialised elements we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> DerefMut for ZeroedArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for ZeroedArray<T> {
    fn drop(&mut self) {
        let layout = Self::layout(self.len);
        if layout.size() == 0 {
            return;
        }
        // SAFETY: the elements are initialised and dropped exactly once;
        // the memory was allocated with this same layout.
        unsafe {
            std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ));
            dealloc(self.ptr.as_ptr().cast(), layout);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn small_and_huge_arrays_are_zeroed_and_writable() {
        for len in [0usize, 1, 1000, (4 << 20) / 8 + 3] {
            // SAFETY: zero is a valid u64.
            let mut a = unsafe { ZeroedArray::<u64>::new(len) };
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&x| x == 0));
            if let Some(last) = a.last_mut() {
                *last = 7;
            }
            if len >= HUGE / 8 {
                assert_eq!(a.as_ptr() as usize % HUGE, 0);
            }
        }
    }
}
