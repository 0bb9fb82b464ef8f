# stordom as an HVM guest (issue 9's first step): booted by OVMF and GRUB,
# it serves a stock Linux guest's disk like the PVH stordom.
now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
t0=$(now_ms)
# The device model's own log says why it did not start, if it did not.
dm_log() { sed 's/^/[dom0] qemu-dm: /' /var/log/xen/qemu-dm-stordom.log 2>/dev/null | tail -n 40; }
domain_create /scenario/stordom.cfg || { dm_log; return 1; }
sd=$(xl domid stordom)
say "xl create of the HVM stordom returned after $(( $(now_ms) - t0 )) ms"
# Firmware under nested TCG takes minutes: the ready line, not the create,
# is the wait.
if ! stordom_ready stordom 400; then
    say "stordom's serial output (OVMF, GRUB):"
    sed 's/^/[dom0] serial: /' /var/log/xen/stordom-serial.log 2>/dev/null | tail -n 40
    dm_log
    return 1
fi
say "HVM stordom (domid $sd) serving $(( $(now_ms) - t0 )) ms after xl create"
# Its first lines go to the emulated serial port (the PV console comes
# up later in its boot).
serial=/var/log/xen/stordom-serial.log
if line=$(grep -a -m1 "multiboot2 boot" $serial); then
    result hvm-boot pass "$line; $(grep -a -m1 'boot complete' "$(domain_console stordom)")"
else
    result hvm-boot fail "no multiboot2 boot line in stordom's serial output"
fi
grep -a "INFO\|WARN\|ERROR" $serial | sed 's/^/[dom0] serial: /' | head -n 40
domain_create /scenario/g1.cfg || return 1
served_by g1 "$sd"
wait_gone g1 240
grants_released stordom
xl shutdown stordom
wait_gone stordom 60
