//! Runs `check` on one input file (to reproduce a finding with a backtrace):
//!     RUST_BACKTRACE=1 cargo run --release --no-default-features --example one -- fuzz/artifacts/FILE
fn main() {
    let path = std::env::args().nth(1).expect("usage: one FILE");
    let data = std::fs::read(&path).expect("read input");
    datafold_fuzz::check(&data);
    println!("{path}: no finding");
}
