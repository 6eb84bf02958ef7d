//! The HTTP benchmark (written next).
fn main() {}
