//! `dedup fpr`, run as a process on small sizes: every experiment writes a
//! CSV table and an SVG chart that parse, and every measured rate lies
//! within a sound tolerance of the rate the crate's formulas predict.
//!
//! The tolerance for one measurement of `hits` false positives among `n`
//! never-inserted keys at predicted rate `p` is
//! `|hits − n·p| ≤ 0.05·n·p + 6·√(n·p·(1 − p)) + 1`: six binomial standard
//! deviations for the queries (a chance of about 2·10⁻⁹ per point of
//! failing by luck), plus 5% for the filter itself (its fill varies from one
//! set of keys to another; every filter here has over 10⁴ blocks, so that
//! spread is about 1%) and for the formula's approximations (generations
//! combined as independent; measured below 1.1%). The streams are seeded, so
//! a run is also reproducible. A measurement that queried inserted keys
//! (rate near 1) or a wrong formula (the standard Bloom formula is 2–10×
//! off for the blocked layout) falls far outside it.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// Runs `dedup fpr args… --out dir --threads 2`; returns stdout.
fn fpr(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dedup"))
        .arg("fpr")
        .args(args)
        .arg("--out")
        .arg(dir)
        .args(["--threads", "2"])
        .output()
        .expect("spawn dedup");
    assert!(
        out.status.success(),
        "dedup fpr {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The rows of a CSV file as maps from column to cell.
fn read_csv(path: &Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells.len(), header.len(), "ragged row: {line}");
            header
                .iter()
                .cloned()
                .zip(cells.iter().map(|c| (*c).to_owned()))
                .collect()
        })
        .collect()
}

fn num(row: &HashMap<String, String>, column: &str) -> f64 {
    row.get(column)
        .unwrap_or_else(|| panic!("no column {column}"))
        .parse()
        .unwrap_or_else(|e| panic!("{column}: {e}"))
}

/// Checks that an SVG file is one well-formed `<svg>` element (every tag
/// closed in order) and returns its text content and element counts.
fn read_svg(path: &Path) -> (String, HashMap<String, usize>) {
    let svg = std::fs::read_to_string(path).unwrap();
    assert!(svg.trim_start().starts_with("<svg"), "not an SVG document");
    let (mut open, mut texts, mut counts) = (Vec::<String>::new(), String::new(), HashMap::new());
    let mut rest = svg.as_str();
    while let Some(start) = rest.find('<') {
        if !open.is_empty() {
            texts.push_str(&rest[..start]);
        }
        let end = rest[start..].find('>').expect("unclosed tag") + start;
        let tag = &rest[start + 1..end];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                open.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
        } else {
            let name = tag.split_whitespace().next().unwrap().trim_end_matches('/');
            *counts.entry(name.to_owned()).or_insert(0) += 1;
            if !tag.ends_with('/') {
                open.push(name.to_owned());
            }
        }
        rest = &rest[end + 1..];
        if open.is_empty() {
            assert!(rest.trim().is_empty(), "content after </svg>");
        }
    }
    assert!(open.is_empty(), "unclosed elements: {open:?}");
    (texts, counts)
}

/// The tolerance of the module docs.
fn within_tolerance(hits: f64, queries: f64, predicted: f64) -> bool {
    let expected = queries * predicted;
    let sd = (expected * (1.0 - predicted)).sqrt();
    (hits - expected).abs() <= 0.05 * expected + 6.0 * sd + 1.0
}

/// Asserts every row's `false_positives` within tolerance of its `predicted`.
fn assert_rows_match_formula(rows: &[HashMap<String, String>]) {
    assert!(!rows.is_empty());
    for row in rows {
        let (hits, queries, predicted) = (
            num(row, "false_positives"),
            num(row, "queries"),
            num(row, "predicted"),
        );
        assert!(
            within_tolerance(hits, queries, predicted),
            "measured {hits}/{queries} = {:.6} vs predicted {predicted:.6}: {row:?}",
            hits / queries
        );
    }
}

#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = fpr(
        dir.path(),
        &[
            "bloom",
            "--shapes",
            "10/7",
            "--keys",
            "20k",
            "--queries",
            "100k",
        ],
    );
    assert!(stdout.contains("bits_per_key"), "{stdout}");
    assert!(dir.path().join("bloom.csv").is_file());
    assert!(dir.path().join("bloom.svg").is_file());
}

#[test]
fn plain_bloom_filter_matches_the_standard_formula_and_the_published_table() {
    let dir = tempfile::tempdir().unwrap();
    fpr(dir.path(), &["bloom", "--keys", "200k", "--queries", "4M"]);
    let rows = read_csv(&dir.path().join("bloom.csv"));
    assert_eq!(rows.len(), 6, "the six shapes of the published table");
    assert_rows_match_formula(&rows);
    for row in &rows {
        // The table's one or two significant digits.
        let ratio = num(row, "measured") / num(row, "published");
        assert!((0.8..1.2).contains(&ratio), "{row:?}");
    }
    let (text, counts) = read_svg(&dir.path().join("bloom.svg"));
    assert!(text.contains("bits per key") && text.contains("false-positive rate"));
    assert!(text.contains("published table") && text.contains('%'));
    assert!(counts["circle"] >= 6, "{counts:?}");
}

#[test]
fn blocked_layout_matches_its_formula_not_the_standard_one() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "blocked",
        "--keys",
        "100k",
        "--bits-per-key",
        "8,12,16",
        "--fill",
        "0.5,1,2",
        "--generations",
        "1,7",
        "--queries",
        "4M",
    ];
    fpr(dir.path(), &args);
    let rows = read_csv(&dir.path().join("blocked.csv"));
    assert_eq!(rows.len(), 3 * 3 * 2);
    assert_rows_match_formula(&rows);
    // The standard formula underestimates this layout: most cases lie
    // outside the tolerance around it.
    let off = rows
        .iter()
        .filter(|r| {
            !within_tolerance(
                num(r, "false_positives"),
                num(r, "queries"),
                num(r, "standard_formula"),
            )
        })
        .count();
    assert!(off >= rows.len() - 2, "{off} of {}", rows.len());
    let (text, counts) = read_svg(&dir.path().join("blocked.svg"));
    assert!(text.contains("predicted false-positive rate"));
    assert!(text.contains("measured false-positive rate"));
    assert!(counts["circle"] >= rows.len(), "{counts:?}");
}

#[test]
fn rotation_follows_the_formula_through_fill_and_clearing() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "rotation",
        "--keys-per-window",
        "300k",
        "--windows",
        "2",
        "--samples-per-slice",
        "2",
        "--queries",
        "200k",
    ];
    fpr(dir.path(), &args);
    let rows = read_csv(&dir.path().join("rotation.csv"));
    // 2 windows × 6 slices × 3 samples.
    assert_eq!(rows.len(), 36);
    assert_rows_match_formula(&rows);
    let first = &rows[0];
    assert_eq!(
        num(first, "false_positives"),
        0.0,
        "an empty filter claims nothing"
    );
    // Steady state: the rate peaks near the configured 1% before each
    // rotation and drops after it.
    let late: Vec<f64> = rows[rows.len() / 2..]
        .iter()
        .map(|r| num(r, "predicted"))
        .collect();
    let (lo, hi) = late
        .iter()
        .fold((1.0f64, 0.0f64), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    assert!(hi <= 0.01 * 1.001 && hi > 0.009, "{hi}");
    assert!(lo < 0.9 * hi, "no drop at rotation: {lo} {hi}");
    for row in &rows {
        let estimated = num(row, "estimated_by_filter");
        let predicted = num(row, "predicted");
        assert!(
            (estimated - predicted).abs() <= 0.15 * predicted + 1e-4,
            "estimated_fpr {estimated} vs {predicted}"
        );
    }
    let (text, _) = read_svg(&dir.path().join("rotation.svg"));
    assert!(text.contains("time since the first key") && text.contains("configured target"));
}

#[test]
fn large_filters_keep_their_rate_and_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "large",
        "--min-bits-log2",
        "20",
        "--max-bits-log2",
        "22",
        "--queries",
        "1M",
        "--recheck",
        "50k",
    ];
    fpr(dir.path(), &args);
    let rows = read_csv(&dir.path().join("large.csv"));
    assert_eq!(rows.len(), 2);
    assert_rows_match_formula(&rows);
    for row in &rows {
        assert_eq!(num(row, "false_negatives"), 0.0);
        assert!(num(row, "generation_bits") >= 2f64.powi(20));
    }
    let (text, _) = read_svg(&dir.path().join("large.svg"));
    assert!(
        text.contains("2^20") && text.contains("2^22"),
        "axis labels"
    );
}

#[test]
fn bad_experiment_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["fpr", "blocked", "--generations", "8"][..],
        &["fpr", "bloom", "--shapes", "10"],
        &["fpr", "rotation", "--target", "1.5"],
        &[
            "fpr",
            "large",
            "--min-bits-log2",
            "30",
            "--max-bits-log2",
            "20",
        ],
        &["fpr"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dedup"))
            .args(args)
            .arg("--out")
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}
