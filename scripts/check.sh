#!/bin/sh
# scripts/check.sh: install dependencies, build, and run every test (make check).
# Ends with one line "N passed, N failed, N skipped" over all test cases.
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
./setup.sh || exit 1
scripts/build.sh || exit 1
cd build
make -j"$(nproc)" check ${DS_CHECK_FLAGS:-}
rc=$?
# one summary line over every test case, from the TAP results of all test programs
pass=0 fail=0 skip=0
for trs in $(find . -name '*.trs'); do
    p=$(grep -c '^:test-result: PASS' "$trs"); f=$(grep -c -E '^:test-result: (FAIL|ERROR|XPASS)' "$trs")
    s=$(grep -c -E '^:test-result: (SKIP|XFAIL)' "$trs")
    pass=$((pass + p)); fail=$((fail + f)); skip=$((skip + s))
done
[ $rc -eq 0 ] || [ $fail -gt 0 ] || fail=1
[ $rc -eq 0 ] || cat test-suite.log | tail -60
echo "$pass passed, $fail failed, $skip skipped"
[ $rc -eq 0 ] && [ $fail -eq 0 ]
