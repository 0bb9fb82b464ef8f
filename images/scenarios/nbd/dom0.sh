# stordom serving disks that live on an NBD server (issue 13), dom0 side:
# netback and a bridge; qemu-nbd serving a file on dom0's tmpfs to the
# bridge; udhcpd leasing stordom its address; stordom with a vif. g1 runs fio integrity on target=nbd:... and
# stordom's /metrics must match its totals; g2 runs mkfs+fsck and then
# the soak job while dom0 kills the NBD server (SIGKILL) and starts it
# again, NBD_KILLS times, then restarts stordom in place twice (an
# operator's request, the panic hook): the guest must see no error.
STORDOM_IP=10.0.0.2

dom0_bridge || return 1
if nbd_server_start; then
    result nbd-server pass "qemu-nbd (pid $NBD_PID) serving $NBD_FILE (${NBD_MIB} MiB) as disk0 on 10.0.0.1:10809"
else
    result nbd-server fail "qemu-nbd did not listen on 10.0.0.1:10809"
    return 1
fi

# stordom's address from DHCP: the pool is the one address.
cat >/tmp/udhcpd.conf <<EOC
start 10.0.0.2
end 10.0.0.2
interface xenbr0
lease_file /tmp/udhcpd.leases
option subnet 255.255.255.0
option lease 600
EOC
touch /tmp/udhcpd.leases
if udhcpd -S /tmp/udhcpd.conf; then
    result dhcp-server pass "udhcpd on xenbr0 leasing 10.0.0.2"
else
    result dhcp-server fail "udhcpd did not start"
    return 1
fi

domain_create /scenario/stordom.cfg || return 1
sd=$(xl domid stordom)
stordom_ready stordom || return 1
vif_on_bridge "$sd" || return 1
restart_control "$sd" || return 1

domain_create /scenario/g1.cfg || return 1
served_by g1 "$sd"
metrics_match_fio g1 $STORDOM_IP || return 1
xl destroy g1
wait_gone g1 30

domain_create /scenario/g2.cfg || return 1
served_by g2 "$sd"
if ! console_line g2 "soak: $SOAK_SECS s on xvda" 600; then
    result nbd-kills fail "g2's soak never started"
    xl destroy g2
    return 1
fi
# Kills spread over the soak's first half, each followed by a pause
# before the server is back (stordom reconnects with backoff, replays).
kills=0
for k in $(seq 1 $NBD_KILLS); do
    nap $NBD_KILL_EVERY
    kill -9 $NBD_PID && wait $NBD_PID 2>/dev/null
    say "NBD server killed ($k of $NBD_KILLS) during g2's soak"
    nap $NBD_DOWN_SECS
    nbd_server_start || { result nbd-kills fail "qemu-nbd did not come back after kill $k"; break; }
    say "NBD server back (pid $NBD_PID)"
    kills=$k
done
[ $kills = $NBD_KILLS ] && result nbd-kills pass "$kills kills, each ${NBD_DOWN_SECS} s down"
# Then stordom itself restarts in place under the same verify (issue 12
# with a vif): the new instance takes up the vif again, asks DHCP, connects
# to the export and answers what the ring holds unanswered.
k=0
for how in "operator request from the nbd scenario" panic; do
    nap $NBD_KILL_EVERY
    k=$((k + 1))
    restart_in_place "$sd" $k "$how"
done
# g2's vbd connected at its start and once more in each new instance
# (the kills' reconnections log "reconnected", not this).
g2=$(xl domid g2)
n=$(grep -c "nbd: $g2/51712: connected to 10\.0\.0\.1:10809" "$(domain_console stordom)")
if [ "$n" = $((1 + k)) ]; then
    result nbd-after-restarts pass "g2's vbd connected to the export $n times: at its start and after each of $k restarts"
else
    result nbd-after-restarts fail "g2's vbd connected to the export $n times, not $((1 + k)) (its start and $k restarts)"
fi
wait_gone g2 $((SOAK_SECS + 300))
# Each kill cost a connection, and stordom made a new one each time.
n=$(grep -c "nbd: [0-9/]*: reconnected; [0-9]* requests replayed" "$(domain_console stordom)")
if [ "$n" = "$kills" ]; then
    result nbd-reconnects pass "$n reconnections for $kills kills"
else
    result nbd-reconnects fail "$n reconnections for $kills kills"
fi

xl shutdown stordom
wait_gone stordom 30
kill $NBD_PID 2>/dev/null
