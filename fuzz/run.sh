#!/usr/bin/env bash
# Bounded fuzzing of the backup readers -- NOT part of CI (CI runs the hypothesis budget in
# tests/test_adversarial_fuzz.py). Usage:
#
#   fuzz/run.sh [SECONDS_PER_TARGET]          (default 120)
#
# Runs, each for SECONDS_PER_TARGET:
#   1. the Rust reader under libFuzzer   (cargo +nightly fuzz run reader; skipped without nightly + cargo-fuzz)
#   2. the Rust reader, stable harness   (cargo run --release --no-default-features --bin stable)
#   3. the Python reader under atheris   (fuzz_reader.py, differential against the Rust core;
#                                         without atheris: fuzz_random.py, plain random mutations)
# Seeds: fuzz/corpus/reader (made by make_corpus.py if missing). New corpus units go to a scratch
# directory ($FUZZ_WORK, default a fresh mktemp dir), never into the committed corpus. Findings go to
# fuzz/artifacts/. Exit status 1 if any target found something.
set -uo pipefail
cd "$(dirname "$0")"
SECONDS_PER=${1:-120}
PY=${PYTHON:-python3}
WORK=${FUZZ_WORK:-$(mktemp -d /tmp/datafold-fuzz.XXXXXX)}
mkdir -p artifacts "$WORK/libfuzzer" "$WORK/atheris"
status=0
log() { printf '\n=== %s\n' "$*"; }

if [ -z "$(ls -A corpus/reader 2>/dev/null)" ]; then
    log "making the seed corpus"
    "$PY" make_corpus.py || exit 2
fi

log "1. Rust reader, libFuzzer (cargo fuzz), ${SECONDS_PER}s"
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly fuzz run reader "$WORK/libfuzzer" corpus/reader -- \
        -max_total_time="$SECONDS_PER" -print_final_stats=1 -artifact_prefix=artifacts/libfuzzer- \
        2>&1 | grep -E '^(#[0-9]+ +DONE|Done|stat::|==[0-9]+==|SUMMARY|INFO: (Loaded|seed))|panicked|artifact' \
        || status=1
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "skipped: needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz)"
fi

log "2. Rust reader, stable harness, ${SECONDS_PER}s"
cargo run --quiet --release --no-default-features --bin stable -- "$SECONDS_PER" "${FUZZ_SEED:-$RANDOM}" || status=1

log "3. Python reader (differential against the Rust core), ${SECONDS_PER}s"
if "$PY" -c 'import atheris' 2>/dev/null; then
    "$PY" fuzz_reader.py "$WORK/atheris" corpus/reader -max_total_time="$SECONDS_PER" \
        -print_final_stats=1 -artifact_prefix=artifacts/atheris- 2>&1 \
        | grep -E '^(#[0-9]+ +DONE|Done|stat::|INFO: (Loaded|seed))|Finding|Error|artifact' || status=1
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "atheris is not installed (pip install atheris): plain random mutations instead"
    "$PY" fuzz_random.py "$SECONDS_PER" "${FUZZ_SEED:-$RANDOM}" || status=1
fi

log "done: scratch corpus in $WORK; findings (if any) in fuzz/artifacts/"
ls -1 artifacts 2>/dev/null | sed 's/^/  /'
exit $status
