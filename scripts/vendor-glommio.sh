#!/usr/bin/env bash
# vendor/glommio is glommio 0.9.0 as published on crates.io, trimmed, plus the ordered patch
# series in vendor/glommio-patches/ (one file per change; README.md there says what each does).
#
# Usage: scripts/vendor-glommio.sh check     rebuild into a temporary directory and fail if
#                                             vendor/glommio differs from it (CI runs this)
#        scripts/vendor-glommio.sh rebuild   replace vendor/glommio with the rebuild
#        scripts/vendor-glommio.sh test      run glommio's own unit tests of the patched
#                                             modules in vendor/glommio (with wake-first)
#
# To change a patch: rebuild, edit vendor/glommio, then turn the change into a patch file
# (e.g. in a scratch git repository of the rebuilt tree) and keep `check` green.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-check}
version=0.9.0
sha256=e1f8bc1fce949d18098dc0a4e861314e40351a0144ebf61e59bdb5254a2273b2
patches=vendor/glommio-patches

crate_file() {
  local cached
  cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/glommio-$version.crate 2>/dev/null | head -1 || true)
  if [ -n "$cached" ]; then
    echo "$cached"
    return
  fi
  local f=$work/glommio-$version.crate
  curl -fsSL -o "$f" "https://static.crates.io/crates/glommio/glommio-$version.crate"
  echo "$f"
}

rebuild_into() { # directory
  local out=$1 crate
  crate=$(crate_file)
  echo "$sha256  $crate" | sha256sum -c --quiet - || { echo "vendor-glommio: checksum mismatch for $crate" >&2; exit 1; }
  tar -xzf "$crate" -C "$work"
  mv "$work/glommio-$version" "$out"
  # Not vendored: upstream's benches and integration tests, liburing's tests, man pages,
  # examples and packaging.
  rm -rf "$out"/benches "$out"/tests "$out"/Cargo.toml.orig "$out"/.cargo_vcs_info.json \
    "$out"/liburing/{debian,examples,liburing.spec,make-debs.sh,man,test}
  for p in "$patches"/[0-9][0-9][0-9][0-9]-*.patch; do
    patch -d "$out" -p1 --quiet --no-backup-if-mismatch --forward < "$p" ||
      { echo "vendor-glommio: $p does not apply" >&2; exit 1; }
  done
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
case "$mode" in
  check)
    rebuild_into "$work/glommio"
    if ! diff -r "$work/glommio" vendor/glommio >"$work/diff" 2>&1; then
      echo "vendor-glommio: vendor/glommio is not glommio $version plus $patches:" >&2
      head -40 "$work/diff" >&2
      exit 1
    fi
    echo "vendor-glommio: vendor/glommio = glommio $version + $(ls "$patches"/*.patch | wc -l) patches"
    ;;
  rebuild)
    rebuild_into "$work/glommio"
    rm -rf vendor/glommio
    mv "$work/glommio" vendor/glommio
    echo "vendor-glommio: vendor/glommio rebuilt"
    ;;
  test)
    # The unit tests of the modules the series touches: the executor and task queues (1, 4, 7,
    # 8), the rings and timers (1, 3, 4, 6), cross-executor wake-ups (2), sockets polled on
    # the main ring (1, 6). Built in their own target directory.
    # Built from a copy, so that the vendored tree gets no lock file, in their own target
    # directory (kept between runs).
    cp -r vendor/glommio "$work/glommio"
    target=${GLOMMIO_TEST_TARGET:-$PWD/target/glommio-tests}
    (cd "$work/glommio" && CARGO_TARGET_DIR=$target cargo test --lib --features wake-first --no-run)
    # Skipped: tcp_connect_timeout_error connects to 10.255.255.1, off this machine (tests stay
    # on loopback); the three busy-looping shares tests hang now and then in upstream glommio
    # itself, without any patch (1 run of `executor::` in 6 here, 2026-12-01; DataDog/glommio#477),
    # and test nothing the series touches (the share accounting between task queues).
    run_tests() {
      (cd "$work/glommio" && CARGO_TARGET_DIR=$target timeout -k 10 "${GLOMMIO_TEST_TIMEOUT:-300}" \
        cargo test --lib --features wake-first -- "${@:2}" \
        executor:: sys::uring timer:: channels::shared_channel net::tcp_socket task:: \
        --skip net::tcp_socket::tests::tcp_connect_timeout_error \
        --skip executor::test::test_shares_high_disparity_fat_task \
        --skip executor::test::test_shares_low_disparity_fat_task \
        --skip executor::test::test_dynamic_shares)
    }
    # The run takes about 20 s. Should a test still hang, the run is retried once, so a stuck
    # test costs minutes, not the CI budget, and a second hang fails the step.
    set +e
    run_tests "$@"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "vendor-glommio: the tests did not finish within ${GLOMMIO_TEST_TIMEOUT:-300} s; running them once more" >&2
      run_tests "$@"
      rc=$?
    fi
    set -e
    exit "$rc"
    ;;
  *) echo "usage: $0 check|rebuild|test" >&2; exit 2 ;;
esac
