# cli-tap.sh: the TAP lines of the command-line tools' tests (sourced).
# check DESCRIPTION COMMAND...: "ok N" when the command succeeds, else "not ok N"
# with the first bytes of $tmp/err, when the test keeps its errors there.
n=0
check() {
    what=$1
    shift
    n=$((n + 1))
    if "$@"; then
        echo "ok $n - $what"
    else
        echo "not ok $n - $what"
        [ -s "${tmp:-/nonexistent}/err" ] && head -c 300 "$tmp/err" | sed 's/^/# /'
    fi
}
