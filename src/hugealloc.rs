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
    /// True when `ptr` came from [`map_huge`] (unmapped on drop), false
    /// when from the global allocator.
    mapped: bool,
}

// SAFETY: `ZeroedArray<T>` owns its elements like `Box<[T]>`.
unsafe impl<T: Send> Send for ZeroedArray<T> {}
// SAFETY: shared access only hands out `&[T]`.
unsafe impl<T: Sync> Sync for ZeroedArray<T> {}

impl<T> ZeroedArray<T> {
    /// `len` zeroed elements (tests; the crate's callers use
    /// [`ZeroedArray::try_new`]).
    ///
    /// # Safety
    /// All-zero bytes must be a valid `T`.
    #[cfg(all(test, not(loom)))]
    pub(crate) unsafe fn new(len: usize) -> Self {
        // SAFETY: as the caller promised.
        unsafe { Self::with_pages(len, false) }
    }

    /// `len` zeroed elements, or `None` when the memory cannot be had: a
    /// filter as sized, whose builder reports it ([`crate::ConfigError`])
    /// instead of the process aborting.
    ///
    /// # Safety
    /// All-zero bytes must be a valid `T`.
    #[cfg_attr(
        loom,
        expect(dead_code, reason = "under loom the filter's blocks are a plain Box")
    )]
    pub(crate) unsafe fn try_new(len: usize) -> Option<Self> {
        // SAFETY: as the caller promised.
        unsafe { Self::try_with_pages(len, false) }
    }

    /// `len` zeroed elements for an array that is read before it is
    /// written at random places (a hash table's probe reads a bucket, then
    /// fills it): the part past its last whole 2 MiB (all of an array
    /// under 2 MiB), mapped in 4 KiB pages, is faulted in for writing now
    /// (`MADV_POPULATE_WRITE`, or a write per page).
    /// Lazily, each such page's first read maps the shared zero page and
    /// the write after it copies the page and flushes the other CPUs'
    /// TLBs: `dedup`'s tables (6.3 MB each, a third of them past their last
    /// whole 2 MiB) spent 14% of the run's samples in those flushes. The
    /// huge pages before it stay lazy (one fault each, taken by whichever
    /// thread touches them first): populating the whole array made the
    /// engine bench's first pass zero 350 MB under the shard locks, one
    /// thread at a time, and measured 10–35% slower there.
    ///
    /// # Safety
    /// All-zero bytes must be a valid `T`.
    pub(crate) unsafe fn for_probing(len: usize) -> Self {
        // SAFETY: as the caller promised.
        unsafe { Self::with_pages(len, true) }
    }

    /// # Safety
    /// All-zero bytes must be a valid `T`.
    unsafe fn with_pages(len: usize, populate_tail: bool) -> Self {
        // SAFETY: as the caller promised.
        unsafe { Self::try_with_pages(len, populate_tail) }
            .unwrap_or_else(|| handle_alloc_error(Self::layout(len)))
    }

    /// [`ZeroedArray::for_probing`], or `None` when the memory cannot be
    /// had (a size read from a file).
    ///
    /// # Safety
    /// All-zero bytes must be a valid `T`.
    pub(crate) unsafe fn try_for_probing(len: usize) -> Option<Self> {
        // SAFETY: as the caller promised.
        unsafe { Self::try_with_pages(len, true) }
    }

    /// # Safety
    /// All-zero bytes must be a valid `T`.
    unsafe fn try_with_pages(len: usize, populate_tail: bool) -> Option<Self> {
        let layout = Layout::array::<T>(len).ok()?;
        if layout.size() == 0 {
            return Some(ZeroedArray {
                ptr: NonNull::dangling(),
                len,
                mapped: false,
            });
        }
        #[cfg(target_os = "linux")]
        if layout.size() >= HUGE {
            if let Some(ptr) = map_huge(layout.size(), populate_tail) {
                return Some(ZeroedArray {
                    ptr: ptr.cast(),
                    len,
                    mapped: true,
                });
            }
        }
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let array = ZeroedArray {
            ptr: NonNull::new(raw.cast::<T>())?,
            len,
            mapped: false,
        };
        if populate_tail {
            // All of it is 4 KiB pages. The allocator hands large zeroed
            // blocks out as fresh mappings, whose pages a probe would read
            // (mapping the zero page) before writing (copying it and
            // flushing the other CPUs' TLBs): the claims bench's body
            // indexes, 0.5 MB per slot and shard, spent 8% of its samples
            // in those flushes. A write alone faults a page in once; the
            // array is all zero, so zero is written.
            let base = array.ptr.as_ptr().cast::<u8>();
            for offset in (0..layout.size()).step_by(4096) {
                // SAFETY: `offset` lies inside the array, which no one
                // else holds yet; its bytes are zero already.
                unsafe { base.add(offset).write_volatile(0) };
            }
        }
        Some(array)
    }

    /// Faults every page of the array in for writing now, so that no later
    /// access pays for the page's first touch (the kernel zeroing it, and
    /// on a virtual machine whose host took the memory back, the host
    /// backing it again: 2.1–2.4 ms/MB measured, against 0.084 ms/MB for
    /// memory the guest used recently). Contents are unchanged. Mapped
    /// arrays ask the kernel (`MADV_POPULATE_WRITE`, Linux 5.14 and
    /// later); elsewhere, or where the kernel refuses, each page is read
    /// and written back.
    pub(crate) fn populate(&mut self) {
        let bytes = Self::layout(self.len).size();
        if bytes == 0 {
            return;
        }
        #[cfg(target_os = "linux")]
        if self.mapped {
            // SAFETY: the range is this array's own mapping.
            let done = unsafe {
                libc::madvise(self.ptr.as_ptr().cast(), bytes, libc::MADV_POPULATE_WRITE)
            } == 0;
            if done {
                return;
            }
        }
        let base = self.ptr.as_ptr().cast::<u8>();
        for offset in (0..bytes).step_by(4096) {
            // SAFETY: `offset < bytes`, inside the array, which `&mut self`
            // holds alone; the byte is written back unchanged.
            unsafe {
                let p = base.add(offset);
                p.write_volatile(p.read_volatile());
            }
        }
    }

    fn layout(len: usize) -> Layout {
        Layout::array::<T>(len).expect("array size overflows the address space")
    }
}

/// The memory this process may use, in bytes: the machine's physical
/// memory (`MemTotal` in `/proc/meminfo`), or the process's cgroup limit
/// (`memory.max`, cgroup v2) when that is lower. `None` where neither can
/// be read (other systems): builders then check only a configured limit,
/// and the allocations they make up front fail with an error rather than
/// an abort.
pub(crate) fn physical_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| mem_total(&m));
        let cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|c| {
                // cgroup v2: one line "0::<path>".
                let path = c
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))?
                    .trim()
                    .to_owned();
                let file = format!("/sys/fs/cgroup{}/memory.max", path.trim_end_matches('/'));
                std::fs::read_to_string(file).ok()
            })
            .and_then(|max| max.trim().parse::<u64>().ok());
        match (total, cgroup) {
            (Some(t), Some(c)) => Some(t.min(c)),
            (t, c) => t.or(c),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
#[cfg(any(target_os = "linux", test))]
fn mem_total(meminfo: &str) -> Option<u64> {
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
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
        // the memory is released the way it was obtained.
        unsafe {
            std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ));
            #[cfg(target_os = "linux")]
            if self.mapped {
                unmap_huge(self.ptr.cast(), layout.size());
                return;
            }
            dealloc(self.ptr.as_ptr().cast(), layout);
        }
    }
}

/// Maps `size` bytes of anonymous, zero-filled memory on a 2 MiB boundary
/// and advises huge pages before anything touches it (advice given after
/// the first write comes too late: the pages are already 4 KiB). The kernel
/// zeroes pages lazily, so untouched parts of a large filter cost nothing.
#[cfg(target_os = "linux")]
fn map_huge(size: usize, populate_tail: bool) -> Option<NonNull<u8>> {
    let mapped = size.checked_add(HUGE)?;
    // SAFETY: an anonymous private mapping with no address hint.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mapped,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let base = base.cast::<u8>();
    let offset = base.align_offset(HUGE);
    // SAFETY: `offset < HUGE`, so the aligned range of `size` bytes lies in
    // the mapping; unmapping the unused head and tail keeps only it.
    unsafe {
        let aligned = base.add(offset);
        if offset > 0 {
            libc::munmap(base.cast(), offset);
        }
        let page = usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)).unwrap_or(4096);
        let (start, len) = unused_tail(offset, size, page);
        if len > 0 {
            libc::munmap(base.add(start).cast(), len);
        }
        libc::madvise(aligned.cast(), size, libc::MADV_HUGEPAGE);
        let whole = size & !(HUGE - 1);
        if populate_tail && whole < size {
            // The 4 KiB tail. Best effort: Linux 5.14 and later; older
            // kernels answer EINVAL and fault the pages in lazily.
            libc::madvise(
                aligned.add(whole).cast(),
                size - whole,
                libc::MADV_POPULATE_WRITE,
            );
        }
        NonNull::new(aligned)
    }
}

/// Where the unused end of [`map_huge`]'s mapping (`size + HUGE` bytes) starts,
/// relative to its base, and how long it is, once the `size` bytes at
/// `offset` are kept: from the first page boundary at or after the kept
/// bytes (`munmap` needs a page-aligned start; a start inside the last kept
/// page failed with `EINVAL` and left up to 2 MiB mapped per array).
#[cfg(target_os = "linux")]
fn unused_tail(offset: usize, size: usize, page: usize) -> (usize, usize) {
    let start = (offset + size).next_multiple_of(page);
    (start, (size + HUGE).saturating_sub(start))
}

/// Unmaps what [`map_huge`] returned.
///
/// # Safety
/// `ptr` and `size` come from one `map_huge` call, unmapped once.
#[cfg(target_os = "linux")]
unsafe fn unmap_huge(ptr: NonNull<u8>, size: usize) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        libc::munmap(ptr.as_ptr().cast(), size);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The `field` line's figure in kB of the `/proc` file `path` (0 when
    /// absent).
    #[cfg(target_os = "linux")]
    fn proc_kb(path: &str, field: &str) -> u64 {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// The kernel backs `madvise`d regions with huge pages (THP `always` or
    /// `madvise`).
    #[cfg(target_os = "linux")]
    fn huge_pages_on() -> bool {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        mode.contains("[always]") || mode.contains("[madvise]")
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let meminfo = "MemTotal:       24522760 kB\nMemFree:        21000000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_522_760 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        #[cfg(target_os = "linux")]
        assert!(physical_memory().is_some_and(|b| b > 1 << 20));
    }

    /// An array larger than any machine's memory is `None`, not an abort.
    #[test]
    fn an_impossible_array_is_none() {
        // SAFETY: zero is a valid u64.
        let huge = unsafe { ZeroedArray::<u64>::try_new(1 << 60) };
        assert!(huge.is_none());
        // SAFETY: zero is a valid u64.
        assert!(unsafe { ZeroedArray::<u64>::try_new(1000) }.is_some());
    }

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

    /// Where the kernel honours `madvise` (THP `always` or `madvise`), a
    /// large array is backed by huge pages once touched.
    #[test]
    #[cfg(target_os = "linux")]
    fn large_arrays_get_huge_pages_where_the_kernel_allows() {
        if !huge_pages_on() {
            return; // the kernel gives none to anyone: nothing to check
        }
        let huge_kb = || proc_kb("/proc/self/smaps_rollup", "AnonHugePages:");
        let before = huge_kb();
        // SAFETY: zero is a valid u64.
        let mut a = unsafe { ZeroedArray::<u64>::new((64 << 20) / 8) };
        for i in (0..a.len()).step_by(512) {
            a[i] = 1;
        }
        let after = huge_kb();
        assert!(
            after >= before + 32 * 1024,
            "only {} kB of huge pages for 64 MB",
            after - before
        );
    }

    /// The unused end of a mapping starts on a page boundary right after
    /// the kept bytes and runs to the mapping's end.
    #[test]
    #[cfg(target_os = "linux")]
    fn the_unused_tail_is_page_aligned_and_reaches_the_end() {
        let page = 4096;
        for offset in [0, page, 17 * page, HUGE - page] {
            for size in [1, page - 1, page, 6_287_360, 6_287_368, HUGE, 3 * HUGE + 5] {
                let (start, len) = unused_tail(offset, size, page);
                assert_eq!(start % page, 0, "offset {offset}, size {size}");
                assert!(start >= offset + size && start < offset + size + page);
                assert!(start + len >= size + HUGE, "offset {offset}, size {size}");
                assert!(len == 0 || start < size + HUGE);
            }
        }
    }

    /// Making and dropping arrays leaves no mapping behind (each left up to
    /// 2 MiB mapped when the tail's start was not page-aligned: 1000
    /// arrays grew the address space by about 1 GB).
    #[test]
    #[cfg(target_os = "linux")]
    fn dropped_arrays_leave_no_mappings() {
        let vm_kb = || proc_kb("/proc/self/status", "VmSize:");
        let before = vm_kb();
        for i in 0..1000 {
            // 24-byte buckets: sizes that are not a multiple of a page.
            // SAFETY: zero is a valid [u64; 3].
            let a = unsafe { ZeroedArray::<[u64; 3]>::new(100_001 + i) };
            std::hint::black_box(&a);
        }
        let after = vm_kb();
        // Other tests map and unmap concurrently: allow them 200 MB.
        assert!(
            after < before + 200 * 1024,
            "address space {before} kB before, {after} kB after"
        );
    }

    /// Minor page faults this thread has taken so far.
    #[cfg(target_os = "linux")]
    fn faults() -> i64 {
        // SAFETY: getrusage writes the struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
            usage.ru_minflt
        }
    }

    /// Faults taken reading and then writing one element per 4 KiB page.
    #[cfg(target_os = "linux")]
    fn probe(a: &mut ZeroedArray<u64>) -> i64 {
        let before = faults();
        for i in (0..a.len()).step_by(512) {
            let read = std::hint::black_box(a[i]);
            a[i] = read + 1;
        }
        faults() - before
    }

    /// A populated array, mapped or from the allocator, takes no faults
    /// when it is used afterwards, and keeps what it held.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_populated_array_takes_no_faults_and_keeps_its_contents() {
        // 1 MiB comes from the allocator (a fresh mapping of the C library's,
        // in 4 KiB pages); 6 MiB and 400 KiB from a mapping of ours: three
        // huge pages and a 4 KiB tail.
        for len in [(1 << 20) / 8, (6 << 20) / 8 + 100 * 512] {
            // SAFETY: zero is a valid u64.
            let lazy = probe(&mut unsafe { ZeroedArray::<u64>::new(len) });
            // The allocator may hand out memory it had faulted in already.
            assert!(
                lazy >= 64 || len < HUGE / 8,
                "only {lazy} faults in a lazy array of {len}"
            );
            // SAFETY: zero is a valid u64.
            let mut a = unsafe { ZeroedArray::<u64>::new(len) };
            a[0] = 41;
            a[len - 1] = 43;
            a.populate();
            assert_eq!((a[0], a[len - 1]), (41, 43));
            assert!(a[1..len - 1].iter().all(|&x| x == 0));
            let taken = probe(&mut a);
            assert!(taken < 4, "{taken} faults in a populated array of {len}");
            assert_eq!(a[0], 42);
        }
    }

    /// An array made for probing that is too small for huge pages (here
    /// 1 MiB, which the C library hands out as a fresh mapping) is faulted
    /// in whole when made: probing it takes no fault. Lazily each page
    /// faults twice, the second time flushing the other CPUs' TLBs.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_small_array_for_probing_takes_no_faults() {
        let len = (1 << 20) / 8;
        // SAFETY: zero is a valid u64.
        let mut a = unsafe { ZeroedArray::<u64>::for_probing(len) };
        let probed = probe(&mut a);
        assert!(
            probed < 8,
            "{probed} faults probing a small array made for probing"
        );
        assert!(a
            .iter()
            .enumerate()
            .all(|(i, &x)| x == u64::from(i % 512 == 0)));
    }

    /// An array made for probing has its 4 KiB tail (here the 1 MiB past
    /// 2 MiB) faulted in: probing it, each page read and then written,
    /// takes a fault or two for the huge page. Lazily, each 4 KiB page of
    /// the tail faults twice: the read maps the zero page, the write copies
    /// it and flushes the other CPUs' TLBs. Needs Linux 5.14 or later
    /// (`MADV_POPULATE_WRITE`).
    #[test]
    #[cfg(target_os = "linux")]
    fn an_array_for_probing_takes_no_faults_in_its_tail() {
        // Without huge pages the first 2 MiB fault lazily too; before 5.14
        // the kernel has no MADV_POPULATE_WRITE. Nothing to check then.
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut version = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u32>().ok());
        let (major, minor) = (version.next().unwrap_or(0), version.next().unwrap_or(0));
        if !huge_pages_on() || (major, minor) < (5, 14) {
            eprintln!(
                "skipped: kernel {} or transparent huge pages off",
                release.trim()
            );
            return;
        }
        let len = (3 << 20) / 8;
        // SAFETY: zero is a valid u64.
        let lazy = probe(&mut unsafe { ZeroedArray::<u64>::new(len) });
        // SAFETY: zero is a valid u64.
        let probed = probe(&mut unsafe { ZeroedArray::<u64>::for_probing(len) });
        assert!(
            probed < 16,
            "{probed} faults probing an array made for probing"
        );
        assert!(lazy >= 256, "only {lazy} faults probing a lazy one");
    }
}
