//! Physical limits of the machine for the cost model of `dedup`.
use std::hint::black_box;
use std::io::Read;
use std::time::Instant;

fn best<F: FnMut() -> f64>(rounds: usize, mut f: F) -> f64 {
    (0..rounds).map(|_| f()).fold(f64::INFINITY, f64::min)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn main() {
    let path = std::env::args().nth(1).expect("lines file");
    let file = std::fs::read(&path).unwrap();
    let lines: Vec<&[u8]> = file
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let n = lines.len();
    println!("file: {} bytes, {} lines", file.len(), n);

    // xxh3-128 of each line (16 bytes), as Namespace::fingerprint does.
    let ns = best(5, || {
        let t = Instant::now();
        let mut acc = 0u128;
        for l in &lines {
            acc ^= xxhash_rust::xxh3::xxh3_128_with_seed(l, 7);
        }
        black_box(acc);
        t.elapsed().as_nanos() as f64 / n as f64
    });
    println!("xxh3_128 of a 16-byte line: {ns:.2} ns");

    // memchr over the whole buffer, per byte, and per line found.
    let mut ends: Vec<usize> = Vec::with_capacity(n);
    ends.resize(n, 0);
    let ns = best(5, || {
        ends.clear();
        let t = Instant::now();
        ends.extend(memchr::memchr_iter(b'\n', &file));
        black_box(&ends);
        t.elapsed().as_nanos() as f64
    });
    println!(
        "memchr_iter over the file, ends collected: {:.3} ns/byte, {:.2} ns/line",
        ns / file.len() as f64,
        ns / n as f64
    );
    let ns = best(5, || {
        let t = Instant::now();
        let mut at = 0;
        let mut c = 0;
        while let Some(i) = memchr::memchr(b'\n', &file[at..]) {
            at += i + 1;
            c += 1;
        }
        black_box(c);
        t.elapsed().as_nanos() as f64
    });
    println!("memchr called once per line: {:.2} ns/line", ns / n as f64);

    // Page-cache read in 512 KiB reads (the file was just read: cached).
    let ms = best(5, || {
        let mut f = std::fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; 1 << 19];
        let t = Instant::now();
        while f.read(&mut buf).unwrap() > 0 {}
        t.elapsed().as_secs_f64() * 1e3
    });
    println!(
        "page-cache read, 512 KiB reads: {:.3} ms/MB",
        ms / (file.len() as f64 / 1e6)
    );

    // Copy (memcpy) of the file, per MB: what an output buffer costs.
    let mut dst = vec![0u8; file.len()];
    let ms = best(5, || {
        let t = Instant::now();
        dst.copy_from_slice(&file);
        black_box(&dst);
        t.elapsed().as_secs_f64() * 1e3
    });
    println!("memcpy: {:.3} ms/MB", ms / (file.len() as f64 / 1e6));

    // First touch of fresh anonymous memory (2 MiB-aligned, MADV_HUGEPAGE), per MB.
    let size = 128usize << 20;
    let ms = best(3, || unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert!(p != libc::MAP_FAILED);
        libc::madvise(p, size, libc::MADV_HUGEPAGE);
        let t = Instant::now();
        let b = p as *mut u8;
        let mut i = 0;
        while i < size {
            b.add(i).write_volatile(1);
            i += 4096;
        }
        let el = t.elapsed().as_secs_f64() * 1e3;
        libc::munmap(p, size);
        println!("  first touch round: {:.3} ms/MB", el / (size as f64 / 1e6));
        el
    });
    println!(
        "first touch of fresh memory (THP advised): {:.3} ms/MB",
        ms / (size as f64 / 1e6)
    );

    // Random DRAM reads over a 128 MB table (the size of dedup's tables):
    // independent (misses in flight) and dependent (one at a time).
    let words = size / 8;
    let table: Vec<u64> = {
        let mut r = Rng(1);
        (0..words).map(|_| r.next()).collect()
    };
    let mut r = Rng(99);
    let idx: Vec<usize> = (0..n).map(|_| (r.next() as usize) % words).collect();
    let ns = best(3, || {
        let t = Instant::now();
        let mut s = 0u64;
        for &i in &idx {
            s = s.wrapping_add(table[i]);
        }
        black_box(s);
        t.elapsed().as_nanos() as f64 / n as f64
    });
    println!("random read, 128 MB, independent (misses in flight): {ns:.2} ns");
    let ns = best(3, || {
        let t = Instant::now();
        let mut s = 0u64;
        for k in 0..n / 4 {
            let i = (idx[k] ^ (s as usize & 1)) % words;
            s = s.wrapping_add(table[i]);
        }
        black_box(s);
        t.elapsed().as_nanos() as f64 / (n / 4) as f64
    });
    println!("random read, 128 MB, dependent (one miss at a time): {ns:.2} ns");
    // With software prefetch 16 ahead, as the engine's batches do.
    let ns = best(3, || {
        let t = Instant::now();
        let mut s = 0u64;
        for k in 0..n {
            if k + 16 < n {
                unsafe {
                    core::arch::x86_64::_mm_prefetch(
                        table.as_ptr().add(idx[k + 16]) as *const i8,
                        core::arch::x86_64::_MM_HINT_T0,
                    )
                };
            }
            s = s.wrapping_add(table[idx[k]]);
        }
        black_box(s);
        t.elapsed().as_nanos() as f64 / n as f64
    });
    println!("random read, 128 MB, prefetched 16 ahead: {ns:.2} ns");
}
