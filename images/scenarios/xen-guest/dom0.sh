# stordom as a Xen guest, dom0 side.
t0=$(now_ms)
domain_create /scenario/stordom.cfg || return 1
domid=$(xl domid stordom)
base=/local/domain/$domid/data/stordom-test

# Wait for stordom to announce it is watching.
n=0
until [ "$(xenstore-read $base/ready 2>/dev/null)" = 1 ]; do
    n=$((n + 1)); [ $n -gt 600 ] && { result selftest-ready fail "stordom never wrote $base/ready"; break; }
    sleep 0.1
done
say "stordom ready after $(( $(now_ms) - t0 )) ms from xl create"

# Offer 4 pages with pattern seed 7; gntshare holds them until its stdin closes.
mkfifo /tmp/gnt.in
/usr/local/bin/gntshare "$domid" 4 7 </tmp/gnt.in >/tmp/gnt.out 2>/tmp/gnt.err &
exec 3>/tmp/gnt.in
n=0
until [ -s /tmp/gnt.out ]; do
    n=$((n + 1)); [ $n -gt 100 ] && break
    sleep 0.1
done
refs=$(cat /tmp/gnt.out)
[ -n "$refs" ] || say "gntshare failed: $(cat /tmp/gnt.err)"
say "offering grants $refs to domain $domid"
xenstore-write $base/grant "0 7 $refs"

wait_gone stordom 90
exec 3>&-
res=$(xenstore-read $base/result 2>/dev/null)
# The domain is gone, so read its result from its console instead.
if grep -q "xen-selftest: PASS" "$(domain_console stordom)"; then
    result selftest-result pass
else
    result selftest-result fail "no PASS on stordom's console ($res)"
fi

# A panicking stordom must crash (on_crash=preserve keeps it listed).
domain_create /scenario/stordom-panic.cfg || return 1
n=0
state=""
while [ $n -lt 60 ]; do
    state=$(xl list stordom-panic 2>/dev/null | awk 'NR==2 {print $5}')
    case "$state" in *c*) break ;; esac
    sleep 0.5; n=$((n + 1))
done
xl list
case "$state" in
    *c*) result crash-state:stordom-panic pass "state $state" ;;
    *) result crash-state:stordom-panic fail "state '$state'" ;;
esac
sleep 1
xl destroy stordom-panic
