# Two guests at once, each on its own stordom-served disk.
domain_create /scenario/stordom.cfg || return 1
stordom_ready stordom
domain_create /scenario/g1.cfg || return 1
domain_create /scenario/g2.cfg || return 1
wait_gone g1 240
wait_gone g2 120
grants_released stordom
xl shutdown stordom
wait_gone stordom 30
