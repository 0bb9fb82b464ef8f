# Two stordom builds, the same guest and job on each, rounds alternating
# (one guest at a time, so they do not compete for the host's two cores);
# each round's serving profile too.
create_backend_timed /scenario/stordom.cfg stordom "serve: watching backend/vbd; ready" 60 || return 1
# stordom-b: its own ELF, and its own command line and xl config lines
# when they are given.
cmdline_b=STORDOM_CMDLINE
[ -z "$STORDOM_CMDLINE_B" ] || cmdline_b=STORDOM_CMDLINE_B
sed -e 's/^name = .*/name = "stordom-b"/' -e 's|stordom\.elf|stordom-b.elf|' \
    -e "s/@STORDOM_CMDLINE@/@$cmdline_b@/" /scenario/stordom.cfg >/tmp/ab-stordom-b.cfg
printf '%s\n' "$AB_STORDOM_XL_B" >>/tmp/ab-stordom-b.cfg
create_backend_timed /tmp/ab-stordom-b.cfg stordom-b "serve: watching backend/vbd; ready" 60 || return 1
[ -z "$AB_STORDOM_XL_B" ] || xl vcpu-list stordom-b | sed 's/^/[dom0] /'
ab_rounds 150 || return 1
xl shutdown stordom
xl shutdown stordom-b
wait_gone stordom 30
wait_gone stordom-b 30
