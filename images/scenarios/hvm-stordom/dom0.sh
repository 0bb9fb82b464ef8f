# stordom as an HVM guest (issue 9's first step): booted by OVMF and GRUB,
# it serves a stock Linux guest's disk like the PVH stordom.
now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
t0=$(now_ms)
domain_create /scenario/stordom.cfg || return 1
sd=$(xl domid stordom)
say "xl create of the HVM stordom returned after $(( $(now_ms) - t0 )) ms"
# Firmware under nested TCG takes minutes: the ready line, not the create,
# is the wait.
if ! stordom_ready stordom 400; then
    say "stordom's serial output (OVMF, GRUB):"
    sed 's/^/[dom0] serial: /' /var/log/xen/stordom-serial.log 2>/dev/null | tail -n 40
    return 1
fi
say "HVM stordom (domid $sd) serving $(( $(now_ms) - t0 )) ms after xl create"
grep -q "multiboot2 boot" "$(domain_console stordom)" \
    && result hvm-boot pass "$(grep -m1 'multiboot2 boot' "$(domain_console stordom)")" \
    || result hvm-boot fail "no multiboot2 boot line on stordom's console"
domain_create /scenario/g1.cfg || return 1
g1=$(xl domid g1)
be=$(xenstore-read /local/domain/$g1/device/vbd/51712/backend 2>/dev/null)
case "$be" in
    /local/domain/$sd/backend/vbd/*) result backend:g1 pass "$be" ;;
    *) result backend:g1 fail "backend path '$be'" ;;
esac
wait_gone g1 240
grants_released stordom
xl shutdown stordom
wait_gone stordom 60
