# Two stordom builds, the same guest and job on each, rounds alternating
# (one guest at a time, so they do not compete for the host's two cores);
# each round's serving profile too.
create_backend_timed /scenario/stordom.cfg stordom "serve: watching backend/vbd; ready" 60 || return 1
# stordom-b: its own ELF, and its own command line when one is given.
cmdline_b=STORDOM_CMDLINE
[ -z "$STORDOM_CMDLINE_B" ] || cmdline_b=STORDOM_CMDLINE_B
sed -e 's/^name = .*/name = "stordom-b"/' -e 's|stordom\.elf|stordom-b.elf|' \
    -e "s/@STORDOM_CMDLINE@/@$cmdline_b@/" /scenario/stordom.cfg >/tmp/ab-stordom-b.cfg
sed -e 's/^name = .*/name = "g-stordom-b"/' -e 's/backend=stordom,/backend=stordom-b,/' \
    /scenario/g-stordom.cfg >/tmp/ab-g-stordom-b.cfg
create_backend_timed /tmp/ab-stordom-b.cfg stordom-b "serve: watching backend/vbd; ready" 60 || return 1
for round in 1 2 3; do
    for be in stordom stordom-b; do
        cfg=/scenario/g-stordom.cfg
        [ $be = stordom ] || cfg=/tmp/ab-g-stordom-b.cfg
        stordom_profile_mark $be
        create_guest_timed $cfg g-$be $be || return 1
        wait_gone g-$be 150
        stordom_profile_report $be
    done
done
xl shutdown stordom
xl shutdown stordom-b
wait_gone stordom 30
wait_gone stordom-b 30
