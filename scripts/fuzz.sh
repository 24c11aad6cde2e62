#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer via cargo-fuzz) of every network-facing
# parser: the MQTT codec, the telemetry payload decoders, rule SQL, CoAP
# messages and the endpoint, Sparkplug B payloads, ChirpStack events, the
# cluster's frames.
#
#   scripts/fuzz.sh SECONDS             each target for SECONDS, seeded with the
#                                       checked-in corpus; new inputs go to a
#                                       scratch directory (CI: the corpus is
#                                       left as it is)
#   scripts/fuzz.sh SECONDS --campaign  the same, then merging into the
#                                       checked-in corpus the new inputs that
#                                       reach new coverage (libFuzzer -merge=1;
#                                       nothing is deleted), for a commit
#
# cargo-fuzz needs nightly compiler flags (-Zsanitizer=address); with only a
# stable toolchain on the machine, RUSTC_BOOTSTRAP=1 allows them. A crash
# fails the run; its input is kept under target/fuzz-artifacts/ and printed
# (add it to the corpus once fixed, so `cargo test` replays it for ever).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:?usage: scripts/fuzz.sh SECONDS [--campaign]}
campaign=${2:-}
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
export RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$PWD/target/fuzz"
root=$PWD
summary=()
for dir in crates/*/fuzz; do
  targets=$(sed -n '/^\[\[bin\]\]/,/^path/{s/^name *= *"\(.*\)"/\1/p}' "$dir/Cargo.toml")
  for t in $targets; do
    corpus="$root/$dir/corpus/$t"
    mkdir -p "$corpus"
    artifacts="$root/target/fuzz-artifacts/${dir#crates/}/$t/"
    mkdir -p "$artifacts"
    scratch=$(mktemp -d "$root/target/fuzz-scratch.XXXX")
    dirs=("$scratch" "$corpus")
    before=$(ls "$corpus" | wc -l)
    echo "== ${dir%/fuzz} $t: ${secs} s from $before corpus inputs"
    log="$root/target/fuzz-$(basename "${dir%/fuzz}")-$t.log"
    if ! (cd "$dir" && cargo fuzz run "$t" -j1 -- "${dirs[@]}" -max_total_time="$secs" \
          -artifact_prefix="$artifacts" -print_final_stats=1 >"$log" 2>&1); then
      tail -40 "$log"
      echo "fuzz: ${dir%/fuzz} $t FAILED; inputs in $artifacts" >&2
      exit 1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    if [[ "$campaign" == "--campaign" ]]; then
      # Into the checked-in corpus: only the new inputs that reach coverage
      # it does not (libFuzzer's merge); the named seeds stay.
      (cd "$dir" && cargo fuzz run "$t" -j1 -- -merge=1 "$corpus" "$scratch" >>"$log" 2>&1)
    fi
    rm -rf "$scratch"
    after=$(ls "$corpus" | wc -l)
    summary+=("| ${dir%/fuzz} | $t | $secs s | ${execs:-?} | ${rate:-?}/s | ${cov:-?} | $before → $after | 0 |")
  done
done
echo
echo "| crate | target | time | executions | rate | coverage (edges) | corpus | crashes |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${summary[@]}"
