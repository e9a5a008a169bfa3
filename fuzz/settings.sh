# Sourced by fuzz/run and fuzz/ci (bash): how each target is fuzzed. `settings TARGET` sets
#   seeds    the committed seed folders (relative to fuzz/), read but never written
#   dict     the libFuzzer dictionary (dicts/NAME.dict), or empty for none
#   max_len  the largest input, above the limit the code under test applies
# A target not named here (a new one) gets ../gateway/tests/corpus/TARGET as its seeds and
# dicts/TARGET.dict, where they exist: so fuzz/ci runs it without an edit here.
# shellcheck shell=bash

# The flags of every build and run: no sanitizer (the code under test is safe Rust, so a
# sanitizer would cost speed and find nothing the panics do not), debug assertions on (so that
# arithmetic overflow panics as it does in tests), 16 codegen units instead of cargo-fuzz's 1
# (a cold build in 268 s instead of 473 s on the shared 2-core machine, at the same speed of
# fuzzing within the noise: README.md, "In CI"). The stable toolchain takes cargo-fuzz's
# nightly flags with RUSTC_BOOTSTRAP=1.
fuzz_flags=(--sanitizer none --debug-assertions --codegen-units 16)
export RUSTC_BOOTSTRAP=1

settings() {
    local target=$1
    seeds=() dict="" max_len=4096
    case "$target" in
        codec | sources) seeds=(../gateway/tests/corpus/"$target") dict=json max_len=5000 ;;
        config) seeds=(../gateway/tests/corpus/config ../config) dict=toml max_len=8192 ;;
        readings)
            seeds=(../gateway/tests/corpus/readings ../gateway/tests/corpus/expected ../config/examples)
            dict=readings
            ;;
        packet | session) seeds=(../gateway/tests/corpus/"$target") dict=mqtt ;;
        *)
            if [ -d ../gateway/tests/corpus/"$target" ]; then seeds=(../gateway/tests/corpus/"$target"); fi
            if [ -f dicts/"$target".dict ]; then dict=$target; fi
            ;;
    esac
}

# The libFuzzer options for one target after `settings`, run for SECONDS.
libfuzzer_options() {
    local seconds=$1
    options=(-max_len="$max_len" -timeout=10 -max_total_time="$seconds" -print_final_stats=1)
    if [ -n "$dict" ]; then options+=(-dict=dicts/"$dict".dict); fi
}
