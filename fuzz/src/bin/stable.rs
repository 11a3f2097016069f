//! The reader fuzz target on stable Rust, without libFuzzer: runs `datafold_fuzz::check` over the
//! seed corpus, then over random mutations of it (xorshift, no coverage feedback) for a bounded
//! time. A panicking input is saved to fuzz/artifacts/stable-<n> and the run goes on.
//!
//!     cargo run --release --no-default-features --bin stable -- [SECONDS] [SEED] [CORPUS_DIR]
//!
//! Exit code 1 if anything panicked.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use datafold_fuzz::{check, Mutator};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let corpus_dir = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| here.join("corpus/reader"));
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&corpus_dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e} (run make_corpus.py)", corpus_dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| std::fs::read(e.path()).expect("read seed"))
        .collect();
    corpus.sort();
    assert!(!corpus.is_empty(), "empty corpus {}", corpus_dir.display());

    // Quiet panics: report them ourselves, once per distinct message.
    std::panic::set_hook(Box::new(|_| {}));
    let artifacts = here.join("artifacts");
    let mut findings: Vec<String> = Vec::new();
    let run = |data: &[u8], findings: &mut Vec<String>| {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| check(data))) {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            if !findings.contains(&msg) {
                std::fs::create_dir_all(&artifacts).ok();
                let path = artifacts.join(format!("stable-{}", findings.len()));
                std::fs::write(&path, data).ok();
                println!("FINDING {}: {msg}", path.display());
                findings.push(msg);
            }
        }
    };
    for seed_input in &corpus {
        run(seed_input, &mut findings);
    }
    let mut m = Mutator::new(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs: u64 = 0;
    while Instant::now() < deadline {
        for _ in 0..64 {
            let base = &corpus[m.below(corpus.len())];
            let input = m.mutate(base, &corpus);
            run(&input, &mut findings);
            runs += 1;
        }
    }
    println!(
        "stable runner: {} seeds + {runs} mutated inputs in {seconds} s (seed {seed}); {} distinct panics",
        corpus.len(),
        findings.len()
    );
    if !findings.is_empty() {
        std::process::exit(1);
    }
}
